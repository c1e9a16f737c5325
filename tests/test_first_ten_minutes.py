"""What a new user sees in a first run: clean output, a bar counting rollouts, a closing summary, plots.

The end-to-end tests run the real ``drpo fit`` (a subprocess, as a user types it) on the shipped quickstart
config shrunk to seconds; the others drive the callbacks in-process on the tiny test model.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
from rl_helpers import build, namespace

from drpo_lightning import summary
from drpo_lightning.progress import StepProgressBar, planned_rollouts, trust_region_text
from drpo_lightning.summary import RunSummary

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

NOISE = {
    "loading-weights-bar": "Loading weights",  # transformers' bar while a checkpoint loads
    "writing-shards-bar": "Writing model shards",  # transformers' bar while the export is saved
    "leafspec-deprecation": "LeafSpec",  # torch deprecated LeafSpec; Lightning's _pytree.py uses it
    "litlogger-tip": "💡 Tip",  # Lightning's cloud advertisements
    "flops-column": "FLOPs",  # the model summary's FLOPs column, always 0 for an RL module
    "epoch-counter": "Epoch 0/",  # Lightning's bar: "Epoch 0/-2" when max_steps ends the run
    "v-num": "v_num",  # Lightning's bar: the logger version
    "gradient-checkpointing-deprecation": "is_gradient_checkpointing",  # transformers, read by peft
    "bitsandbytes-kernel-download": "Failed to load CPU gemm_4bit_forward",  # bitsandbytes on AVX512-BF16 CPUs
}
"""What `drpo fit` must not print: a user can do nothing about any of it."""


def drpo(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DRPO_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "drpo_lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def small_quickstart(*extra: str) -> list[str]:
    """The shipped quickstart (logger, checkpoints, export, validation before and during training) with 2
    rollout steps of 2 x 2 completions, 2 updates each, and 8 held-out prompts."""
    return ["fit", "--config", str(QUICKSTART), "--trainer.max_steps=4", "--model.ppo_epochs=2",
            "--model.num_minibatches=1", "--trainer.val_check_interval=1", "--data.task_size=16",
            "--data.val_size=8", "--data.batch_size=2", "--model.num_generations=2",
            "--model.val_num_samples=2", "--model.rollout.init_args.max_new_tokens=3", *extra]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    result = drpo(cwd, *small_quickstart())
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


@pytest.mark.parametrize("what", list(NOISE))
def test_fit_prints_none_of_the_noise(quickstart_run, what):
    _, result = quickstart_run
    assert NOISE[what] not in result.stdout + result.stderr, (result.stdout + result.stderr)[-4000:]


def test_qlora_fit_prints_no_library_noise(tmp_path):
    """bitsandbytes (4-bit CPU kernels) and peft (reads is_gradient_checkpointing) add their own lines."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    result = drpo(tmp_path, "fit", "--config", str(ROOT / "configs" / "drpo_qlora.yaml"), "--trainer.max_steps=1",
                  "--data.task_size=8", "--data.val_size=4", "--data.batch_size=2", "--model.num_generations=2",
                  "--model.rollout.init_args.max_new_tokens=3")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert [what for what, line in NOISE.items() if line in output] == [], output[-4000:]
    assert "(peft adapter folder)" in output


def test_fit_bar_counts_rollouts_and_ends_at_the_configured_total(quickstart_run):
    """ppo_epochs 2 and max_steps 4 (updates) is 2 rollout steps: the bar ends at 2/2 and 4/4, not at 2/4."""
    _, result = quickstart_run
    bar = [line for line in result.stdout.splitlines() if line.startswith("rollout ")]
    assert bar, result.stdout[-3000:]
    assert bar[-1].startswith("rollout 2/2 · update 4/4 · reward "), bar[-1]
    assert "val/accuracy " in bar[-1] and "corrected " in bar[-1], bar[-1]
    counters = [re.match(r"rollout (\d+)/2 · update (\d+)/4 · ", line) for line in bar]
    assert all(m and int(m.group(2)) == 2 * int(m.group(1)) for m in counters), bar  # each line is one state


def test_fit_ends_with_the_summary_and_writes_the_plots(quickstart_run):
    cwd, result = quickstart_run
    run = Path("runs/quickstart/drpo/version_0")
    tail = result.stdout[result.stdout.index("drpo fit finished"):]
    assert tail.startswith("drpo fit finished: 2 rollout steps, 4 optimizer updates (2 per rollout), 0 skipped")
    before = next(line for line in result.stdout.splitlines() if "held-out accuracy before training" in line)
    facts = json.loads((cwd / run / "summary.json").read_text())
    assert f"{facts['accuracy_before']:.3f}" == before.rsplit(" ", 1)[1]
    assert f"held-out accuracy (mean@2): {facts['accuracy_before']:.3f} -> {facts['accuracy_after']:.3f}" in tail
    # the "after" number is the last val/accuracy of metrics.csv
    with open(cwd / run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/accuracy")]
    assert float(rows[-1]["val/accuracy"]) == pytest.approx(facts["accuracy_after"], abs=1e-6)
    assert (facts["rollouts"], facts["updates"], facts["skipped_updates"]) == (2, 4, 0)
    assert facts["tokens_per_second"] > 0 and facts["wall_seconds"] > 0
    for where in (run / "metrics.csv", run / "checkpoints", "last.ckpt", run / "export", run / "plots"):
        assert str(where) in tail, (where, tail)
    for name in ("reward.png", "accuracy.png", "trust_region.png"):
        assert (cwd / run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_plot_run_redraws_a_finished_run_from_its_metrics_csv(quickstart_run, tmp_path, capsys):
    cwd, _ = quickstart_run
    # a folder above the run is enough: its newest run is drawn
    assert summary.main([str(cwd / "runs/quickstart"), "--out", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png", "reward.png",
                                                                     "trust_region.png"]
    assert "version_0: wrote" in capsys.readouterr().out


def test_read_metrics_csv_counts_rollout_steps_and_keeps_the_objective_columns(tmp_path):
    """metrics.csv's step is the 0-based index of the logging rollout; validation rows share it."""
    path = tmp_path / "metrics.csv"
    path.write_text("drpo/corrective_frac,epoch,reward,step,val/accuracy,perf/step_s\n"
                    "0.0,0,0.25,0,,1.5\n0.01,0,0.5,1,,1.5\n,0,,1,0.75,\n")
    series = summary.read_metrics_csv(path)
    assert series["reward"] == {1: 0.25, 2: 0.5}
    assert series["val/accuracy"] == {2: 0.75}
    assert summary.objective_metrics(series) == ["drpo/corrective_frac"]


def test_plot_run_on_an_interrupted_run_and_on_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("dppo/masked_frac,epoch,reward,step\n0.1,0,0.25,0\n0.2,0,0.5,1\n")
    assert summary.main([str(run)]) == 0  # no validation yet, no summary.json: reward and trust region
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["reward.png", "trust_region.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert summary.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"drpo: error: {empty}: no metrics.csv"), err


def test_tensorboard_logger_run_has_summary_and_plot_run_reads_its_events(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    result = drpo(tmp_path, *small_quickstart(
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir=runs/tb", "--trainer.logger.name=drpo"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs/tb/drpo/version_0"
    assert list(run.glob("events.out.tfevents.*")) and not (run / "metrics.csv").exists()
    assert "tensorboard --logdir runs/tb/drpo/version_0" in result.stdout
    assert (run / "plots" / "accuracy.png").is_file()  # drawn from the callback's own copy of the metrics
    assert summary.main([str(run), "--out", str(tmp_path / "again")]) == 0
    series, _ = summary.load_run(run)
    assert sorted(series["reward"]) == [1, 2] and sorted(series["val/accuracy"])[-1] == 2
    assert 0 in series["val/accuracy"]  # the accuracy before training, from summary.json


def _tiny_fit(tmp_path, model_dir, callbacks, *, val: bool, **trainer_kwargs):
    args = namespace(model_dir=model_dir, out=tmp_path, engine="hf", steps=4, ppo_epochs=2,
                     num_prompts=8, batch_size=2, val_every=1 if val else 0)
    module, data = build(args, model_dir)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                         limit_val_batches=1 if val else 0, val_check_interval=1 if val else None,
                         check_val_every_n_epoch=None if val else 1, default_root_dir=tmp_path,
                         **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return module


def test_summary_without_logger_and_without_validation(tmp_path, tiny_model_dir, capsys):
    _tiny_fit(tmp_path, tiny_model_dir, [RunSummary()], val=False, enable_progress_bar=False)
    out = capsys.readouterr().out
    text = out[out.index("drpo fit finished"):]
    assert text.startswith("drpo fit finished: 2 rollout steps, 4 optimizer updates (2 per rollout)")
    assert "held-out accuracy: not measured (validation is off" in text
    assert "metrics      not written (trainer.logger is off)" in text
    assert (tmp_path / "plots" / "reward.png").is_file() and not (tmp_path / "plots" / "accuracy.png").exists()


class CtrlCAtRollout(pl.Callback):
    def __init__(self, rollout: int) -> None:
        self.rollout = rollout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.rollout:
            raise KeyboardInterrupt


def test_ctrl_c_ends_with_an_interrupted_summary_and_plots(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C ends with exit(1)
        _tiny_fit(tmp_path, tiny_model_dir, [RunSummary(), CtrlCAtRollout(1)], val=False,
                  enable_progress_bar=False)
    out = capsys.readouterr().out
    assert "drpo fit interrupted: 1/2 rollout steps, 2 optimizer updates (2 per rollout)" in out, out
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True
    assert (tmp_path / "plots" / "reward.png").is_file()


def test_an_error_ends_with_the_error_only(tmp_path, tiny_model_dir, capsys):
    class Broken(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        _tiny_fit(tmp_path, tiny_model_dir, [RunSummary(), Broken()], val=False, enable_progress_bar=False)
    assert "drpo fit" not in capsys.readouterr().out
    assert not (tmp_path / "summary.json").exists()


def test_terminal_bar_redraws_one_line_and_prints_the_last_state_once(tmp_path, tiny_model_dir, capsys):
    _tiny_fit(tmp_path, tiny_model_dir, [StepProgressBar(interactive=True, refresh_seconds=0)], val=True)
    out = capsys.readouterr().out
    # every state is drawn over the previous one (\r); only the final state ends with a new line
    assert out.count("\n") == 1 and out.endswith("\n"), repr(out)
    final = out.rsplit("\r\x1b[2K", 1)[1]
    assert final.startswith("rollout 2/2 · update 4/4 · reward ") and "val/accuracy" in final, repr(final)


def test_planned_rollouts_translate_max_steps_into_rollout_steps():
    def trainer(max_steps, max_epochs=-1, batches=float("inf")):
        return SimpleNamespace(max_steps=max_steps, max_epochs=max_epochs, num_training_batches=batches)

    def module(epochs, minibatches):
        return SimpleNamespace(hparams={"ppo_epochs": epochs, "num_minibatches": minibatches})

    assert planned_rollouts(trainer(4), module(2, 1)) == 2
    assert planned_rollouts(trainer(200), module(1, 2)) == 100
    assert planned_rollouts(trainer(3), module(2, 1)) == 2  # Lightning stops after the rollout passing 3
    assert planned_rollouts(trainer(-1, 3, 5), module(1, 4)) == 15
    assert planned_rollouts(trainer(100, 1, 20), module(1, 1)) == 20  # one epoch of 20 batches ends first
    assert planned_rollouts(trainer(-1), module(1, 1)) is None


def test_trust_region_text_names_each_objective_share():
    assert trust_region_text({"drpo/corrective_frac": 0.004, "reward": 0.5}) == "corrected 0.40%"
    assert trust_region_text({"ppo/clip_frac_low": 0.01, "ppo/clip_frac_high": 0.02}) == "clipped 3.00%"
    assert trust_region_text({"dppo/masked_frac": 0.125}) == "masked 12.50%"
    assert trust_region_text({"spo/outside_frac": 0.5, "completion/truncated_frac": 1.0}) == "spo/outside_frac 50.00%"
    assert trust_region_text({"reward": 1.0, "completion/truncated_frac": 1.0}) is None


QUIET_PROBE = """
import logging, sys, warnings
from drpo_lightning import quiet
quiet.install()
logging.basicConfig(stream=sys.stdout, format="%(message)s")
for name, message in [("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from x"),
                      ("bitsandbytes.backends.cpu.ops", "another bitsandbytes warning"),
                      ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging")]:
    logging.getLogger(name).warning(message)
warnings.simplefilter("default")
quiet.install()  # re-applied after a reset: the filters are idempotent
for message in ["`isinstance(treespec, LeafSpec)` is deprecated, use ...",
                "`is_gradient_checkpointing` is deprecated and will be removed in v6.", "a FutureWarning of yours"]:
    warnings.warn(message, FutureWarning)
import os
print("HF_HUB_DISABLE_PROGRESS_BARS", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "DRPO_VERBOSE"])
def test_quiet_drops_only_the_listed_messages(verbose):
    env = {k: v for k, v in os.environ.items() if k not in ("DRPO_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    if verbose:
        env["DRPO_VERBOSE"] = "1"
    result = subprocess.run([sys.executable, "-c", QUIET_PROBE], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "another bitsandbytes warning" in output and "a FutureWarning of yours" in output
    for dropped in ("gemm_4bit_forward", "💡 Tip", "LeafSpec", "is_gradient_checkpointing"):
        assert (dropped in output) is verbose, (dropped, output)
    assert f"HF_HUB_DISABLE_PROGRESS_BARS {None if verbose else '1'}" in output
