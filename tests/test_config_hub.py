"""Every shipped YAML parses: each `drpo fit` config resolves through the CLI, and each sweep grid expands
into runs whose configs resolve too (one per setting x objective cell)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rl_helpers import make_tiny_model

from drpo_lightning.cli import main
from drpo_lightning.sweep import load_grid

ROOT = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GRIDS = sorted((ROOT / "configs" / "study").glob("*.yaml"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "m", arch="qwen2")


def resolved(capsys, config: Path, model_dir: str) -> dict:
    args = ["fit", "--config", str(config), "--print_config"]
    if yaml.safe_load(config.read_text())["model"].get("model_name_or_path", "quickstart") != "quickstart":
        args.insert(3, f"--model.model_name_or_path={model_dir}")  # configs for real models name a local folder
    assert main(args) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_configs_to_check():
    names = {p.name for p in FIT_CONFIGS}
    assert {"quickstart.yaml", "drpo_fsdp.yaml", "drpo_ddp.yaml", "drpo_8bit.yaml", "drpo_qlora.yaml",
            "drpo_int8_lora.yaml"} <= names
    assert GRIDS, "the stability study grid ships in configs/study/"


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: p.name)
def test_every_fit_config_resolves(config, capsys, model_dir):
    printed = resolved(capsys, config, model_dir)
    assert printed["model"]["objective"]["class_path"].startswith("drpo_lightning.objectives.")
    assert printed["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("grid_path", GRIDS, ids=lambda p: p.name)
def test_every_grid_cell_resolves(grid_path, capsys, tmp_path, model_dir):
    grid = load_grid(grid_path, out_dir=str(tmp_path / "out"))
    seeds = grid.meta["seeds"]
    assert len(grid.runs) % len(seeds) == 0 and len(seeds) >= 3
    cells = [r for r in grid.runs if r.seed == seeds[0]]
    for run in cells:
        path = tmp_path / f"{run.setting}-{run.objective}.yaml"
        path.write_text(yaml.safe_dump(run.config))
        printed = resolved(capsys, path, model_dir)
        assert printed["seed_everything"] == seeds[0] == printed["data"]["seed"], run.name
        assert printed["model"]["export_dir"] == ""
        # the setting's and the objective's overrides survive resolution
        model, wanted = printed["model"], run.config["model"]
        for key in ("ppo_epochs", "num_minibatches"):
            assert model[key] == wanted.get(key, 1), (run.name, key)
        assert model["optimizer"]["init_args"]["lr"] == wanted["optimizer"]["init_args"]["lr"], run.name
        rollout, wanted_rollout = model["rollout"]["init_args"], wanted["rollout"]["init_args"]
        if "engine" in wanted_rollout:  # a worker: the engine it runs carries the sampling settings
            assert rollout["max_staleness"] == wanted_rollout["max_staleness"], run.name
            rollout, wanted_rollout = rollout["engine"]["init_args"], wanted_rollout["engine"]["init_args"]
        assert rollout["precision"] == wanted_rollout["precision"], run.name
        objective = wanted["objective"]
        assert model["objective"]["class_path"].rsplit(".", 1)[1].lower() == objective["class_path"], run.name
        for arg, value in objective.get("init_args", {}).items():
            assert model["objective"]["init_args"][arg] == value, (run.name, arg)
