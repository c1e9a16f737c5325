"""Resume as the README prints it, with the shipped configs as they are: no fixed ``dirpath``, the logger on,
a new ``version_N`` folder per run. ``--ckpt_path last`` must find the run, continue it exactly, and never
restart silently; a checkpoint never overrides the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from rel_helpers import ROOT, assert_one_line_error
from rel_resume import drpo, max_weight_diff, rewards

QUICKSTART = ["fit", "--config", "configs/quickstart.yaml", "--seed_everything", "7"]
RUN = Path("runs/quickstart/drpo")
_MODEL = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["model"]
UPDATES = _MODEL.get("ppo_epochs", 1) * _MODEL.get("num_minibatches", 1)  # optimizer steps per rollout


def test_readme_resume_on_quickstart_equals_the_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    assert drpo(straight, *QUICKSTART, "--trainer.max_steps", "4").returncode == 0
    first = drpo(split, *QUICKSTART, "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = drpo(split, *QUICKSTART, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {RUN}/version_0/checkpoints/last.ckpt (step 2)" in resumed.stderr
    saved = torch.load(split / RUN / "version_1/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert max_weight_diff(straight / RUN / "version_0/checkpoints/last.ckpt",
                           split / RUN / "version_1/checkpoints/last.ckpt") <= 1e-6
    # The resumed run drew the same prompts and samples: each part logged the uninterrupted run's rewards at the
    # same step numbers, and together they logged all of them.
    expected = rewards(straight / RUN / "version_0/metrics.csv")
    before, after = (rewards(split / RUN / f"version_{v}/metrics.csv") for v in (0, 1))
    assert before and after and {**before, **after} == expected and not before.keys() & after.keys()


def test_ckpt_path_last_without_a_checkpoint_is_one_line_not_a_fresh_start(tmp_path):
    result = drpo(tmp_path, *QUICKSTART, "--trainer.max_steps", "2", "--ckpt_path", "last")
    assert_one_line_error(result.returncode, result.stderr, "ckpt_path: last: no last checkpoint in",
                          "runs/quickstart/drpo")
    assert not (tmp_path / "runs/quickstart/drpo/version_0/metrics.csv").exists()  # nothing trained


def _sigterm_config(tmp_path: Path, call: int) -> Path:
    """36 training rows in batches of 4 (9 batches an epoch), no validation; a second reward of weight 0
    sends SIGTERM during its ``call``-th batch."""
    data = tmp_path / "rows.jsonl"
    if not data.exists():
        rows = [{"prompt": f"{a}+{a + 7}=", "answer": str(2 * a + 7)} for a in range(10, 46)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / f"sigterm_{call}.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0},
        "model": {
            "rewards": [{"class_path": "exact_match", "init_args": {"answer_column": "answer"}},
                        {"class_path": "rel_resume.SigtermAtCall", "init_args": {"call": call}}],
            "reward_weights": [1.0, 0.0],
        },
        "data": {"task": None, "path": str(data), "batch_size": 4, "val_fraction": 0.0},
    }))
    return config


def test_sigterm_on_the_last_batch_of_an_epoch_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    steps = ["--trainer.max_steps", str(12 * UPDATES)]
    done = drpo(straight, *QUICKSTART, "--config", str(_sigterm_config(tmp_path, 0)), *steps)
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = drpo(split, *QUICKSTART, "--config", str(_sigterm_config(tmp_path, 9)), *steps)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    last = split / RUN / "version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 9 * UPDATES  # stopped after the 9th of 9 batches
    resumed = drpo(split, *QUICKSTART, "--config", str(_sigterm_config(tmp_path, 0)), *steps, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_weight_diff(straight / RUN / "version_0/checkpoints/last.ckpt",
                           split / RUN / "version_1/checkpoints/last.ckpt") <= 1e-6
    expected = rewards(straight / RUN / "version_0/metrics.csv")
    before, after = (rewards(split / RUN / f"version_{v}/metrics.csv") for v in (0, 1))
    assert len(after) == 3 and {**before, **after} == expected and not before.keys() & after.keys()


def test_a_checkpoint_never_overrides_the_config(tmp_path):
    """Its stored hyperparameters cannot switch trust_remote_code on, swap the model folder or undo the command
    line; the changed training settings are named in one warning line; `last` and FILE behave the same."""
    one_rollout = ["--trainer.max_steps", str(UPDATES), "--trainer.num_sanity_val_steps", "0"]
    assert drpo(tmp_path, *QUICKSTART, *one_rollout).returncode == 0
    last = tmp_path / RUN / "version_0/checkpoints/last.ckpt"
    # A folder whose config.json maps the model to its own Python file; running it leaves a marker.
    evil = tmp_path / "evil_model"
    evil.mkdir()
    marker = tmp_path / "code_ran"
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"].update(trust_remote_code=True, model_name_or_path=str(evil),
                                          model_kwargs={"device_map": "meta"}, export_dir=str(tmp_path / "stolen"))
    planted = tmp_path / "planted.ckpt"
    torch.save(checkpoint, planted)
    overrides = ["--trainer.max_steps", str(2 * UPDATES), "--trainer.num_sanity_val_steps", "0",
                 "--model.num_generations", "4", "--model.kl_beta", "0.5"]
    for ckpt in (str(planted), "last"):
        if ckpt == "last":  # make the planted checkpoint the newest `last` of the run folder
            newest = max((tmp_path / RUN).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
            planted.replace(newest)
        result = drpo(tmp_path, *QUICKSTART, *overrides, "--ckpt_path", ckpt)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not marker.exists() and not (tmp_path / "stolen").exists()
        warnings = [line for line in result.stderr.splitlines() if line.startswith("drpo: warning:")]
        assert len(warnings) == 1
        assert "model.num_generations 4 (checkpoint: 8)" in warnings[0]
        assert "model.kl_beta 0.5 (checkpoint: 0.0)" in warnings[0]
        runs = sorted((tmp_path / RUN).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        saved = yaml.safe_load((runs[-1] / "config.yaml").read_text())["model"]
        assert (saved["num_generations"], saved["kl_beta"]) == (4, 0.5)
        assert (saved["trust_remote_code"], saved["model_name_or_path"]) == (False, "quickstart")
        assert torch.load(runs[-1] / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2 * UPDATES


SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_checkpoints_atomically_with_last_and_sigterm(config):
    """Fault-tolerant checkpointing in every config: RLCheckpoint (atomic, `last`, a save on SIGTERM) and,
    for single-file checkpoints, AtomicCheckpointIO."""
    trainer = yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"]
    callbacks = [c for c in trainer.get("callbacks") or [] if "Checkpoint" in c["class_path"]]
    assert [c["class_path"] for c in callbacks] == ["drpo_lightning.checkpoint.RLCheckpoint"]
    assert callbacks[0]["init_args"]["save_last"] is True
    strategy = trainer.get("strategy")
    sharded = isinstance(strategy, dict) and strategy.get("init_args", {}).get("state_dict_type") == "sharded"
    plugins = [p["class_path"] for p in trainer.get("plugins") or []]
    # A sharded checkpoint is a folder: RLCheckpoint publishes it atomically itself.
    assert sharded or "drpo_lightning.checkpoint.AtomicCheckpointIO" in plugins


# The shipped configs that run on a CPU as they are. The GPU configs resolve `last` the same way (a fixed
# dirpath), and reasoning_gym.yaml needs a local model folder with a context longer than the quickstart policy's.
CPU_CONFIGS = {
    "drpo_8bit.yaml": "runs/8bit/drpo",
    "drpo_int8_lora.yaml": "runs/int8_lora/drpo",
    "drpo_qlora.yaml": "runs/qlora/drpo",
}


@pytest.mark.parametrize("config", sorted(CPU_CONFIGS))
def test_ckpt_path_last_resumes_every_shipped_cpu_config(config, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = CPU_CONFIGS[config]
    args = ["fit", "--config", f"configs/{config}", "--trainer.num_sanity_val_steps", "0"]
    first = drpo(tmp_path, *args, "--trainer.max_steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = drpo(tmp_path, *args, "--trainer.max_steps", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run}/version_0/checkpoints/last.ckpt (step 1)" in resumed.stderr
    assert torch.load(tmp_path / run / "version_1/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


def _deltas(metrics_csv: Path) -> dict[int, float]:
    import csv

    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["drpo/delta"]) for r in csv.DictReader(f) if r.get("drpo/delta")}


def test_readme_resume_continues_the_adapted_drpo_delta(tmp_path):
    """DRPO with target_divergence 1e-4 halves delta after every rollout (0.2, 0.1, 0.05): a resume through
    the README's command must go on from the delta the checkpoint holds, not restart at 0.2."""
    adaptive = ["--model.objective.init_args.target_divergence", "1e-4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    steps = 3 * UPDATES
    assert drpo(straight, *QUICKSTART, *adaptive, "--trainer.max_steps", str(steps)).returncode == 0
    first = drpo(split, *QUICKSTART, *adaptive, "--trainer.max_steps", str(UPDATES))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(split / RUN / "version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["drpo_objective"] == {"delta": pytest.approx(0.1)}
    resumed = drpo(split, *QUICKSTART, *adaptive, "--trainer.max_steps", str(steps), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "drpo: the objective continues from the checkpoint's state {'delta': 0.1}" in resumed.stderr
    expected = _deltas(straight / RUN / "version_0/metrics.csv")
    assert sorted(expected.values(), reverse=True) == pytest.approx([0.2, 0.1, 0.05])
    before, after = (_deltas(split / RUN / f"version_{v}/metrics.csv") for v in (0, 1))
    assert {**before, **after} == pytest.approx(expected) and sorted(after.values()) == pytest.approx([0.05, 0.1])
    assert max_weight_diff(straight / RUN / "version_0/checkpoints/last.ckpt",
                           split / RUN / "version_1/checkpoints/last.ckpt") <= 1e-6
