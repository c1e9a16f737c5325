"""`drpo plugins`: every kind listed (tasks included), broken plugins flagged, the autoload switches."""

from __future__ import annotations

from importlib.metadata import entry_points as real_entry_points
from types import SimpleNamespace
from unittest import mock

import pytest

from drpo_lightning.cli import main
from drpo_lightning.objectives.base import Objective
from drpo_lightning.registry import REGISTRIES, load_all


class ThirdPartyObjective(Objective):
    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        return -advantages * (logprobs - old_logprobs).exp(), {}


def fake_ep(name: str, target, package: str, version: str = "1.0"):
    def load():
        if isinstance(target, Exception):
            raise target
        return target

    return SimpleNamespace(
        name=name,
        value=f"{package.replace('-', '_')}.mod:{name}",
        dist=SimpleNamespace(name=package, version=version),
        load=load,
    )


@pytest.fixture
def installed(monkeypatch):
    """Pretend extra entry points are installed, per group, beside the real ones; restore afterwards."""
    extra: dict[str, list] = {}

    def entry_points(group):
        return [*real_entry_points(group=group), *extra.get(group, [])]

    monkeypatch.delenv("DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("DRPO_LIGHTNING_PLUGINS", raising=False)
    with (
        mock.patch("drpo_lightning.registry.entry_points", side_effect=entry_points),
        mock.patch("importlib.metadata.entry_points", side_effect=entry_points),
    ):
        yield extra
    monkeypatch.undo()
    load_all(reload=True)


def run_plugins(capsys, *args: str) -> tuple[int, str, str]:
    load_all(reload=True)  # the environment of this test, as a fresh `drpo` process would see it
    code = main(["plugins", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_kind_is_listed_with_its_package(installed, capsys):
    code, out, err = run_plugins(capsys)
    assert code == 0 and not err
    for kind in ("objectives", "rollouts", "rewards", "advantages", "tasks"):
        assert f"\n{kind}:\n" in out
    assert set(REGISTRIES) == {"objectives", "rollouts", "rewards", "advantages", "tasks"}
    tasks_section = out.split("\ntasks:\n", 1)[1]
    assert "  arithmetic " in tasks_section and "drpo_lightning.tasks:ArithmeticTask" in tasks_section
    assert "drpo-lightning" in tasks_section


def test_broken_plugin_is_flagged_by_name_without_hiding_the_others(installed, capsys):
    installed["drpo_lightning.objectives"] = [
        fake_ep("shiny", ImportError("No module named 'torch_nightly_only'"), "drpo-shiny"),
        fake_ep("fine", ThirdPartyObjective, "drpo-fine", "2.0"),
    ]
    installed["drpo_lightning.tasks"] = [fake_ep("wrong_kind", ThirdPartyObjective, "drpo-odd")]
    code, out, err = run_plugins(capsys)
    assert code == 0  # listed and flagged, not a failure of the command (use --strict for that)
    assert (
        "  shiny            BROKEN: import of drpo_shiny.mod:shiny failed: ImportError: No module named 'torch_nightly_only'"
        in out
    )
    assert "  fine " in out and "drpo-fine 2.0" in out  # the working third-party plugin is still there
    assert "  drpo " in out and "  arithmetic " in out
    assert "wrong_kind       BROKEN:" in out and "must be a subclass of drpo_lightning.tasks.Task" in out
    assert "2 broken plugin(s): objectives/shiny, tasks/wrong_kind" in err
    code, out, _ = run_plugins(capsys, "-v", "--strict")
    assert code == 1 and "Traceback" in out and "torch_nightly_only" in out


def test_autoload_switch_and_allow_list(installed, capsys, monkeypatch):
    installed["drpo_lightning.objectives"] = [fake_ep("extra_obj", ThirdPartyObjective, "drpo-extra")]
    installed["drpo_lightning.tasks"] = [fake_ep("broken_task", ImportError("boom"), "drpo-broken")]
    monkeypatch.setenv("DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD", "1")
    code, out, _ = run_plugins(capsys)
    assert code == 0  # a plugin that is not loaded cannot be broken
    assert "autoload off: built-ins only" in out
    assert (
        "  extra_obj        not loaded: autoload is off and drpo-extra is not in DRPO_LIGHTNING_PLUGINS"
        in out
    )
    assert "  broken_task      not loaded" in out
    assert "  drpo " in out and "  arithmetic " in out  # built-ins always load

    monkeypatch.setenv("DRPO_LIGHTNING_PLUGINS", "drpo_extra")  # distribution names are normalised
    code, out, _ = run_plugins(capsys)
    assert code == 0 and "autoload off: built-ins + drpo_extra only" in out
    assert "  extra_obj        drpo_extra.mod:extra_obj" in out and "drpo-extra 1.0" in out

    monkeypatch.setenv("DRPO_LIGHTNING_PLUGINS", "drpo-extra,drpo-broken")
    code, out, err = run_plugins(capsys)
    assert code == 0 and "broken_task      BROKEN: import of drpo_broken.mod:broken_task failed" in out

    monkeypatch.delenv("DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.delenv("DRPO_LIGHTNING_PLUGINS")
    code, out, err = run_plugins(capsys)
    assert code == 0 and "autoload off" not in out and "  extra_obj " in out and "tasks/broken_task" in err


def test_help(capsys):
    assert main(["plugins", "--help"]) == 0
    assert "tasks" in capsys.readouterr().out
