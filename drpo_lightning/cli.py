"""The ``drpo`` command: a LightningCLI for :class:`~drpo_lightning.module.RLModule`.

``drpo fit|validate|test --config cfg.yaml`` are LightningCLI subcommands; ``drpo plugins`` lists the
installed plugins. Plugins are loaded *before* the parser is built so that all three config forms work for
every plugin kind::

    objective: drpo                                   # registered name, default arguments
    objective: {class_path: DRPO, init_args: {delta: 0.2}}   # short class name
    objective: {class_path: my_pkg.losses.MyLoss}     # full import path, no entry point needed

User mistakes (unknown plugin, bad value, missing file) end with a one-line ``drpo: error: ...`` and exit
code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from drpo_lightning.registry import REGISTRIES, PluginError, load_all, registry_for

EXTRA_COMMANDS = ("plugins", "plot-weights")


def install_plugin_names() -> None:
    """Teach jsonargparse to resolve registered plugin names (``objective: drpo``).

    jsonargparse resolves a bare class name by searching imported subclasses of the annotated type. We wrap
    that lookup so a registered plugin name resolves first, and an unknown bare name for a plugin type
    fails with the registry's list of available names. Any other type is left to jsonargparse.
    """
    from jsonargparse import _typehints

    original = getattr(_typehints.resolve_class_path_by_name, "__wrapped__", None)
    if original is not None:
        return  # already installed (idempotent: every rank may call it)
    original = _typehints.resolve_class_path_by_name

    def resolve(cls, name: str) -> str:
        if "." not in name:
            for candidate in cls if isinstance(cls, tuple) else (cls,):
                registry = registry_for(candidate) if isinstance(candidate, type) else None
                if registry is None:
                    continue
                plugin = registry.find(name)
                if plugin is not None:
                    return f"{plugin.__module__}.{plugin.__qualname__}"
                resolved = original(candidate, name)
                if "." not in resolved:
                    registry.get(name)  # raises a PluginError listing the available names
                return resolved
        return original(cls, name)

    resolve.__wrapped__ = original
    _typehints.resolve_class_path_by_name = resolve


def _lightning_cli():
    from lightning.pytorch.cli import LightningCLI

    class DRPOCLI(LightningCLI):
        """LightningCLI with plugin names, defaults for RL runs, and short error messages."""

        def add_arguments_to_parser(self, parser) -> None:
            # Prompt formatting is configured once, on the data, and handed to the module that tokenises.
            parser.link_arguments("data.chat_template", "model.chat_template")
            parser.link_arguments("data.system_prompt", "model.system_prompt")

    return DRPOCLI


def _plugins_command(argv: Sequence[str]) -> int:
    from importlib.metadata import PackageNotFoundError, version

    load_all()
    try:
        own = version("drpo-lightning")
    except PackageNotFoundError:  # running from a source tree
        own = "?"
    print(f"drpo-lightning {own}")
    if os.environ.get("DRPO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD"):
        allow = os.environ.get("DRPO_LIGHTNING_PLUGINS", "")
        print(f"(autoload off: built-ins{' + ' + allow if allow else ''} only)")
    for kind, registry in REGISTRIES.items():
        print(f"\n{kind}:")
        for name, info in registry.available().items():
            print(f"  {name:<16} {info.target:<52} {info.package} {info.version}")
        for name, error in sorted(registry.errors.items()):
            print(f"  {name:<16} BROKEN: {error}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``drpo`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DRPO_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv and argv[0] == "plugins":
            return _plugins_command(argv[1:])
        if argv and argv[0] == "plot-weights":
            from drpo_lightning.plot import main as plot_main

            return plot_main(argv[1:])
        load_all()
        install_plugin_names()
        from drpo_lightning.data import PromptDataModule
        from drpo_lightning.module import RLModule

        _lightning_cli()(
            RLModule,
            PromptDataModule,
            args=argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
        )
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except Exception as err:
        if debug:
            raise
        user_error = _user_error_message(err)
        if user_error is None:
            raise
        print(f"drpo: error: {user_error}", file=sys.stderr)
        print("drpo: (run again with --debug for the full traceback)", file=sys.stderr)
        return 2


def _user_error_message(err: BaseException) -> str | None:
    """A one-line message for the errors a user causes (bad config, data, plugin); None for bugs."""
    from drpo_lightning.errors import UserError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (UserError, PluginError)):
            return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
