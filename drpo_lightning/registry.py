"""Name registries for plugins, fed by Python entry points.

There is one :class:`Registry` per plugin kind. Every plugin, built-in or third-party, is declared as an
entry point in its package's ``pyproject.toml``::

    [project.entry-points."drpo_lightning.objectives"]
    spo = "drpo_spo.objective:SPO"

Loading imports each entry point once. A plugin whose import fails is recorded under its name (and shown by
``drpo plugins``) without hiding the others. Loading is idempotent, so every distributed rank may call it.

Environment switches (read at load time, mirroring pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` /
``PYTEST_PLUGINS``):

- ``DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD=1``: load only the plugins shipped with drpo-lightning itself.
  Third-party classes can still be named by full ``class_path`` in a config.
- ``DRPO_LIGHTNING_PLUGINS=pkg_a,pkg_b``: with autoloading off, also load these distributions (or plugin
  names); an allow-list.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points

from drpo_lightning.errors import UserError

GROUP_PREFIX = "drpo_lightning."
BUILTIN_DISTRIBUTION = "drpo-lightning"
DISABLE_AUTOLOAD_ENV = "DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_LIST_ENV = "DRPO_LIGHTNING_PLUGINS"


class PluginError(UserError):
    """A plugin name that does not resolve, or a plugin that could not be loaded."""


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin comes from."""

    name: str
    target: str
    """``module:Class`` the entry point names (or the class's import path when registered by hand)."""
    package: str
    version: str


def _normalise(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-")


def _allowed(name: str, package: str) -> bool:
    if not os.environ.get(DISABLE_AUTOLOAD_ENV):
        return True
    if _normalise(package) == BUILTIN_DISTRIBUTION:
        return True
    allow = {_normalise(x.strip()) for x in os.environ.get(ALLOW_LIST_ENV, "").split(",") if x.strip()}
    return _normalise(package) in allow or _normalise(name) in allow


class Registry:
    """Plugins of one kind, by name.

    Args:
        kind: ``objectives``, ``rollouts``, ``rewards`` or ``advantages``; the entry-point group is
            ``drpo_lightning.<kind>``.
        base: the abstract base class every plugin of this kind must subclass. Given as an import path
            string (``"pkg.module:Class"``) so that the registry module imports nothing heavy.
    """

    def __init__(self, kind: str, base: str) -> None:
        self.kind = kind
        self.group = GROUP_PREFIX + kind
        self._base_path = base
        self._classes: dict[str, type] = {}
        self._info: dict[str, PluginInfo] = {}
        self.errors: dict[str, str] = {}
        """Plugin name -> one-line reason it could not be loaded."""
        self.tracebacks: dict[str, str] = {}
        self._loaded = False

    # -- loading ------------------------------------------------------------------------------------
    @property
    def base(self) -> type:
        module, _, attr = self._base_path.partition(":")
        return getattr(__import__(module, fromlist=[attr]), attr)

    def load(self, reload: bool = False) -> Registry:
        """Import every entry point of this kind once (again with ``reload=True``)."""
        if self._loaded and not reload:
            return self
        if reload:
            self._classes.clear()
            self._info.clear()
            self.errors.clear()
            self.tracebacks.clear()
        seen_targets: dict[str, str] = {}
        for ep in entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            package = dist.name if dist is not None else "<unknown>"
            version = dist.version if dist is not None else "?"
            if not _allowed(ep.name, package):
                continue
            if ep.name in seen_targets:
                if seen_targets[ep.name] == ep.value:
                    continue  # the same distribution seen twice on sys.path (e.g. editable + site)
                self.errors[ep.name] = (
                    f"name {ep.name!r} is claimed by both {seen_targets[ep.name]} and {ep.value} "
                    f"({package}); uninstall one of them"
                )
                self._classes.pop(ep.name, None)
                continue
            seen_targets[ep.name] = ep.value
            info = PluginInfo(ep.name, ep.value, package, version)
            self._info[ep.name] = info
            try:
                cls = ep.load()
            except Exception as err:  # a broken third-party plugin must not break the others
                self.errors[ep.name] = f"import of {ep.value} failed: {type(err).__name__}: {err}"
                self.tracebacks[ep.name] = traceback.format_exc()
                continue
            try:
                self._check(ep.name, cls)
            except PluginError as err:
                self.errors[ep.name] = str(err)
                continue
            self._classes[ep.name] = cls
        self._loaded = True
        return self

    def _check(self, name: str, cls: object) -> None:
        base = self.base
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"{self.kind} plugin {name!r} must be a subclass of {base.__module__}.{base.__qualname__}, "
                f"got {cls!r}"
            )

    def register(self, name: str, cls: type, package: str = "<local>", version: str = "") -> type:
        """Register a class by hand (tests, notebooks). Refuses a name that is already taken."""
        self.load()
        if name in self._classes and self._classes[name] is not cls:
            raise PluginError(
                f"{self.kind} plugin name {name!r} is already taken by {self._info[name].target} "
                f"({self._info[name].package})"
            )
        self._check(name, cls)
        self._classes[name] = cls
        self._info[name] = PluginInfo(name, f"{cls.__module__}:{cls.__qualname__}", package, version)
        return cls

    def unregister(self, name: str) -> None:
        self._classes.pop(name, None)
        self._info.pop(name, None)

    # -- lookup -------------------------------------------------------------------------------------
    def available(self) -> dict[str, PluginInfo]:
        """Loadable plugins by name (broken ones are in :attr:`errors`)."""
        self.load()
        return {n: self._info[n] for n in sorted(self._classes)}

    def names(self) -> list[str]:
        return list(self.available())

    def describe(self) -> str:
        """``name (package version), ...``: what an error message lists."""
        items = [f"{n} ({i.package} {i.version})".replace(" )", ")") for n, i in self.available().items()]
        return ", ".join(items) or "none"

    def find(self, name: str) -> type | None:
        """The class registered as ``name`` (case-insensitive), or None."""
        self.load()
        if name in self._classes:
            return self._classes[name]
        lowered = {n.lower(): c for n, c in self._classes.items()}
        return lowered.get(name.lower())

    def get(self, name: str) -> type:
        """The class registered as ``name``; a :class:`PluginError` naming the alternatives otherwise."""
        cls = self.find(name)
        if cls is not None:
            return cls
        if name in self.errors:
            raise PluginError(f"{self.kind} plugin {name!r} is installed but broken: {self.errors[name]}")
        raise PluginError(
            f"unknown {self.kind[:-1]} {name!r}; available: {self.describe()}"
            + (f"; broken: {', '.join(sorted(self.errors))}" if self.errors else "")
        )

    def name_of(self, cls: type) -> str | None:
        """The registered name of ``cls``, if any."""
        self.load()
        for n, c in self._classes.items():
            if c is cls:
                return n
        return None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def __iter__(self):
        return iter(self.available())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


OBJECTIVES = Registry("objectives", "drpo_lightning.objectives.base:Objective")
ROLLOUTS = Registry("rollouts", "drpo_lightning.rollouts.base:RolloutEngine")
REWARDS = Registry("rewards", "drpo_lightning.rewards.base:RewardFunction")
ADVANTAGES = Registry("advantages", "drpo_lightning.advantages.base:AdvantageEstimator")
TASKS = Registry("tasks", "drpo_lightning.tasks:Task")

REGISTRIES: dict[str, Registry] = {r.kind: r for r in (OBJECTIVES, ROLLOUTS, REWARDS, ADVANTAGES, TASKS)}


def load_all(reload: bool = False) -> dict[str, Registry]:
    """Load every plugin kind (idempotent)."""
    for registry in REGISTRIES.values():
        registry.load(reload=reload)
    return REGISTRIES


def registry_for(cls: type) -> Registry | None:
    """The registry whose base class ``cls`` is (or subclasses)."""
    for registry in REGISTRIES.values():
        try:
            if isinstance(cls, type) and issubclass(cls, registry.base):
                return registry
        except ImportError:
            continue
    return None
