"""The `drpo` command: config forms for every plugin kind, help, errors, and a short quickstart run."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drpo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def print_config(capsys, *args: str) -> dict:
    assert main(["fit", "--config", str(QUICKSTART), *args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)["model"]


@pytest.mark.parametrize(
    ("key", "name", "class_path"),
    [
        ("objective", "ppo", "drpo_lightning.objectives.ppo.PPO"),
        ("rollout", "hf", "drpo_lightning.rollouts.hf.HFRollout"),
        ("advantage", "rloo", "drpo_lightning.advantages.rloo.RLOOAdvantage"),
    ],
)
def test_registered_name_form(capsys, key, name, class_path):
    model = print_config(capsys, f"--model.{key}={name}")
    assert model[key]["class_path"] == class_path


def test_short_class_name_and_full_path_forms(capsys, tmp_path):
    cfg = tmp_path / "forms.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "objective": {"class_path": "DPPO", "init_args": {"divergence": "kl", "delta_low": 0.05}},
                    "advantage": {"class_path": "drpo_lightning.advantages.dr_grpo.DrGRPOAdvantage"},
                    "rewards": ["format", {"class_path": "ExactMatch"}],
                }
            }
        )
    )
    model = print_config(capsys, "--config", str(cfg))
    assert model["objective"]["class_path"] == "drpo_lightning.objectives.dppo.DPPO"
    assert model["objective"]["init_args"]["divergence"] == "kl"
    assert model["objective"]["init_args"]["delta_low"] == 0.05
    assert model["advantage"]["class_path"].endswith("DrGRPOAdvantage")
    assert [r["class_path"].rsplit(".", 1)[1] for r in model["rewards"]] == ["FormatReward", "ExactMatch"]


def test_unknown_plugin_name_is_one_line_listing_the_alternatives(capsys):
    code = main(["fit", "--config", str(QUICKSTART), "--model.objective=drpoo", "--print_config"])
    err = capsys.readouterr().err
    assert code == 2
    line = err.splitlines()[0]
    assert line.startswith("drpo: error: model.objective: unknown objective 'drpoo'; available: ")
    assert "drpo (drpo-lightning" in line and "ppo (drpo-lightning" in line


def test_wrong_type_is_one_line_naming_the_key(capsys):
    code = main(["fit", "--config", str(QUICKSTART), "--model.num_generations=eight"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[0].startswith("drpo: error: model.num_generations: ")


def test_objective_help_lists_its_arguments(capsys):
    assert main(["fit", "--model.objective.help", "DRPO"]) == 0
    out = capsys.readouterr().out
    assert "--model.objective.delta" in out
    assert "loss_agg_mode" in out


def test_plugins_command_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("drpo", "dppo", "ppo", "hf", "exact_match", "grpo"):
        assert f"  {name} " in out


def test_user_error_is_one_line_without_traceback(tmp_path):
    # A real process: what a user sees on the terminal, exit code included.
    proc = subprocess.run(
        [sys.executable, "-m", "drpo_lightning.cli", "fit", "--config", str(QUICKSTART),
         f"--model.model_name_or_path={tmp_path / 'missing'}"],
        capture_output=True, text=True, timeout=300,
    )
    err = proc.stderr
    assert proc.returncode == 2, err
    assert [line for line in err.splitlines() if line.startswith("drpo: error: model.model_name_or_path: ")]
    assert "Traceback" not in err


def test_quickstart_fit_runs_logs_checkpoints_and_exports(tmp_path):
    code = main([
        "fit", "--config", str(QUICKSTART),
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks.init_args.every_n_train_steps=1", f"--trainer.callbacks.init_args.dirpath={tmp_path / 'ckpt'}",
        "--data.val_size=32", "--data.val_batch_size=32", "--data.batch_size=8",
        f"--model.export_dir={tmp_path / 'export'}", "--model.num_minibatches=1",
    ])
    assert code == 0
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        metrics = list(csv.DictReader(f))
    rewards = [float(r["reward"]) for r in metrics if r.get("reward")]
    assert len(rewards) == 2
    assert any(r.get("val/accuracy") for r in metrics)
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert (tmp_path / "export" / "config.json").exists()
    assert (tmp_path / "export" / "tokenizer.json").exists()


def test_top_level_help_lists_every_subcommand_under_the_product_name(capsys):
    from drpo_lightning.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("drpo-lightning ")
    assert "Lightning Trainer command line tool" not in out
    for name in ("fit", "validate", "test", "plugins", "sweep", "plot-weights", "plot-run", "rollout-worker"):
        assert f"\n  {name} " in out and name in COMMANDS
    assert "predict" not in out  # Lightning's predict means nothing for an RL policy: not offered


def test_version_and_unknown_commands(capsys):
    from importlib.metadata import version

    from drpo_lightning.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"drpo-lightning {version('drpo-lightning')} (torch ")
    assert main(["predict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["drpo: error: unknown command 'predict'; the commands are fit, validate, test, plugins, sweep, "
                   "plot-weights, plot-run, rollout-worker (drpo --help)"]


def _plugin_help_cases():
    from drpo_lightning.registry import REGISTRIES, load_all

    load_all()
    keys = {"objectives": "objective", "rollouts": "rollout", "advantages": "advantage", "rewards": "rewards"}
    return [(keys[kind], name) for kind, registry in REGISTRIES.items() if kind in keys
            for name in registry.available()]


@pytest.mark.parametrize("key, name", _plugin_help_cases())
def test_every_plugins_help_is_plain_text(key, name, capsys):
    """`drpo fit --model.<key>.help <name>`: no Sphinx roles or double backticks, and objectives list the
    allowed loss_agg_mode values."""
    from drpo_lightning.cli import main

    assert main(["fit", f"--model.{key}.help", name]) == 0
    out = capsys.readouterr().out
    assert f"--model.{key}." in out
    for markup in (":class:", ":func:", ":meth:", "``"):
        assert markup not in out, (markup, out)
    if key == "objective":
        assert "{token-mean,seq-mean-token-sum,seq-mean-token-mean,seq-mean-token-sum-norm}" in out
