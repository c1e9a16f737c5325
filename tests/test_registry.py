"""The plugin registry: entry-point loading, errors that list alternatives, idempotence, allow-list."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest

from drpo_lightning.objectives.base import Objective
from drpo_lightning.registry import (
    ADVANTAGES,
    OBJECTIVES,
    REWARDS,
    ROLLOUTS,
    PluginError,
    Registry,
    load_all,
)


class GoodObjective(Objective):
    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        return -advantages * (logprobs - old_logprobs).exp(), {}


class NotAnObjective:
    pass


def fake_ep(name: str, target, package: str = "third-party", version: str = "1.2.3", value: str | None = None):
    """An entry point as importlib.metadata returns it: name, value, dist, load()."""

    def load():
        if isinstance(target, Exception):
            raise target
        return target

    return SimpleNamespace(
        name=name,
        value=value or f"{package.replace('-', '_')}.mod:{name}",
        dist=SimpleNamespace(name=package, version=version),
        load=load,
    )


def registry_with(*eps) -> Registry:
    registry = Registry("objectives", "drpo_lightning.objectives.base:Objective")
    with mock.patch("drpo_lightning.registry.entry_points", return_value=list(eps)) as patched:
        registry.load()
        registry.load()  # idempotent: the second call does not query entry points again
    assert patched.call_count == 1
    return registry


def test_builtins_are_registered_through_entry_points():
    load_all()
    assert {"drpo", "dppo", "ppo"} <= set(OBJECTIVES.names())
    assert "hf" in ROLLOUTS
    assert {"exact_match", "format", "math_verify", "reward_model"} <= set(REWARDS.names())
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp"} <= set(ADVANTAGES.names())
    assert OBJECTIVES.available()["drpo"].package == "drpo-lightning"
    from drpo_lightning.objectives.drpo import DRPO

    assert OBJECTIVES.get("drpo") is DRPO
    assert OBJECTIVES.get("DRPO") is DRPO  # names are case-insensitive


def test_unknown_name_lists_every_available_name_with_its_package():
    registry = registry_with(fake_ep("mine", GoodObjective, package="drpo-mine", version="0.4"))
    with pytest.raises(PluginError) as err:
        registry.get("nope")
    message = str(err.value)
    assert "unknown objective 'nope'" in message
    assert "mine (drpo-mine 0.4)" in message


def test_broken_plugin_is_reported_by_name_and_does_not_hide_others():
    registry = registry_with(
        fake_ep("broken", ImportError("No module named 'torch_nightly_only'")),
        fake_ep("fine", GoodObjective),
    )
    assert registry.get("fine") is GoodObjective
    assert "broken" in registry.errors
    assert "torch_nightly_only" in registry.errors["broken"]
    with pytest.raises(PluginError, match="'broken' is installed but broken.*torch_nightly_only"):
        registry.get("broken")
    with pytest.raises(PluginError, match="broken: broken"):
        registry.get("missing")


def test_plugin_of_the_wrong_kind_is_refused():
    registry = registry_with(fake_ep("odd", NotAnObjective))
    assert "odd" not in registry
    assert "must be a subclass of drpo_lightning.objectives.base.Objective" in registry.errors["odd"]


def test_duplicate_name_from_two_packages_is_an_error_not_a_silent_override():
    registry = registry_with(
        fake_ep("same", GoodObjective, package="pkg-a", value="pkg_a.mod:Same"),
        fake_ep("same", GoodObjective, package="pkg-b", value="pkg_b.mod:Same"),
    )
    assert "same" not in registry
    assert "claimed by both pkg_a.mod:Same and pkg_b.mod:Same" in registry.errors["same"]


def test_same_distribution_seen_twice_is_harmless():
    ep = fake_ep("twice", GoodObjective)
    registry = registry_with(ep, ep)
    assert registry.get("twice") is GoodObjective
    assert not registry.errors


def test_register_by_hand_refuses_a_taken_name():
    registry = registry_with(fake_ep("taken", GoodObjective))

    class Other(GoodObjective):
        pass

    with pytest.raises(PluginError, match="'taken' is already taken"):
        registry.register("taken", Other)
    registry.register("other", Other)
    assert registry.get("other") is Other
    assert registry.name_of(Other) == "other"


def test_reload_picks_up_new_entry_points():
    registry = registry_with(fake_ep("first", GoodObjective))
    with mock.patch("drpo_lightning.registry.entry_points", return_value=[fake_ep("second", GoodObjective)]):
        registry.load(reload=True)
    assert registry.names() == ["second"]


def test_autoload_switch_and_allow_list(monkeypatch):
    eps = [
        fake_ep("drpo_like", GoodObjective, package="drpo-lightning", value="drpo_lightning.x:A"),
        fake_ep("extra", GoodObjective, package="drpo-extra"),
        fake_ep("other", GoodObjective, package="drpo-other"),
    ]
    monkeypatch.setenv("DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert registry_with(*eps).names() == ["drpo_like"]
    monkeypatch.setenv("DRPO_LIGHTNING_PLUGINS", "drpo_extra")  # distribution names are normalised
    assert registry_with(*eps).names() == ["drpo_like", "extra"]
    monkeypatch.delenv("DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD")
    assert registry_with(*eps).names() == ["drpo_like", "extra", "other"]
