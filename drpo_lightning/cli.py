"""The ``drpo`` command: a LightningCLI for :class:`~drpo_lightning.module.RLModule`.

``drpo fit|validate|test --config cfg.yaml`` are LightningCLI subcommands; ``drpo plugins`` lists the
installed plugins, ``drpo plot-weights`` draws objectives' gradient weights and ``drpo sweep`` runs a grid of
configs x seeds. Plugins are loaded *before* the parser is built so that all three config forms work for
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
from pathlib import Path

from drpo_lightning.registry import REGISTRIES, PluginError, load_all, registry_for

COMMANDS = {
    "fit": "train a policy: drpo fit --config configs/quickstart.yaml [--ckpt_path last|auto|FILE]",
    "validate": "score the held-out prompts with a policy or checkpoint (held-out accuracy, pass@k)",
    "test": "the same on the test split",
    "plugins": "list the installed objectives, rollouts, rewards, advantages and tasks with their packages",
    "sweep": "run a grid of configs x seeds through drpo fit (resumable) and write a report",
    "plot-weights": "draw the objectives' gradient weight against the probability shift",
    "plot-run": "draw a run's reward, held-out accuracy and trust-region metrics as PNG (finished or interrupted)",
    "rollout-worker": "serve rollouts to a trainer from this process (its own GPU or host): --trainer HOST:PORT",
}
"""The ``drpo`` subcommands and their one-line descriptions (``drpo --help``)."""
EXTRA_COMMANDS = ("plugins", "plot-weights", "plot-run", "sweep", "rollout-worker")
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("drpo-lightning")
    except PackageNotFoundError:  # running from a source tree without an install
        return "unknown (not installed)"


def _top_level_help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"drpo-lightning {_version()}: RL post-training of language models (DRPO, DPPO, PPO/GRPO) on "
             "PyTorch Lightning", "", "usage: drpo COMMAND [options]   (drpo COMMAND --help for a command's options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help      this list", "  -V, --version   the installed version",
              "  --debug         show the full traceback of an error (any command; or DRPO_DEBUG=1)"]
    return "\n".join(lines)


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
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from drpo_lightning.errors import ConfigError

    class DRPOCLI(LightningCLI):
        """LightningCLI with plugin names, defaults for RL runs, and short error messages."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # Lightning's `predict` calls forward() on prompt batches, which means nothing for an RL policy.
            return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_COMMANDS}

        def add_arguments_to_parser(self, parser) -> None:
            # Prompt formatting is configured once, on the data, and handed to the module that tokenises.
            parser.link_arguments("data.chat_template", "model.chat_template")
            parser.link_arguments("data.system_prompt", "model.system_prompt")

        def _set_seed(self) -> None:
            try:
                super()._set_seed()
            except ValueError as err:  # Lightning's seed_everything refuses seeds outside numpy's range
                raise ConfigError(f"seed_everything: {err}") from err

        def _parse_ckpt_path(self) -> None:
            # LightningCLI applies the checkpoint's hyperparameters over the parsed config here. Never: a
            # checkpoint must not turn on trust_remote_code or undo the command line (see resume.py).
            return None

        def before_fit(self) -> None:
            self._check_ckpt_path("fit")

        def before_validate(self) -> None:
            self._check_ckpt_path("validate")

        def before_test(self) -> None:
            self._check_ckpt_path("test")

        def _check_ckpt_path(self, subcommand: str) -> None:
            """Resolve ``last`` in this config's run folder and check the checkpoint before any weights load."""
            from drpo_lightning import resume

            config = self.config_init[subcommand]
            given = config.get("ckpt_path")
            if given is None or given in ("best", "hpc", "registry"):
                return
            if given == "auto":  # a job script that is resubmitted (SLURM): resume when there is something to
                try:
                    path = resume.find_last(self.trainer)
                except resume.NothingToResume:
                    if self.trainer.is_global_zero:
                        print("drpo: ckpt_path auto: no last checkpoint yet, starting a new run", file=sys.stderr)
                    config["ckpt_path"] = None
                    return
            else:
                path = resume.find_last(self.trainer) if given == "last" else Path(given)
            saved = resume.load_checkpoint_meta(path)
            resume.check_optimizer(saved, getattr(self.model, "optimizer_factory", None))
            conflicts = resume.setting_conflicts(saved.get("hyper_parameters") or {}, dict(self.model.hparams))
            if conflicts and self.trainer.is_global_zero:
                print(f"drpo: warning: resuming with settings that differ from the checkpoint's (the config "
                      f"wins, so the run does not continue exactly as the saved one): {'; '.join(conflicts)}",
                      file=sys.stderr)
            if given in ("last", "auto") and self.trainer.is_global_zero:
                print(f"drpo: resuming from {resume.describe(path)} (step {saved['global_step']})", file=sys.stderr)
            config["ckpt_path"] = str(path)

        def instantiate_trainer(self, **kwargs):
            # Lightning validates the Trainer's arguments only here, after the model is built: turn its
            # refusals (an unknown accelerator or strategy, devices=0, ...) into one line naming the key.
            trainer = self._get(self.config_init, "trainer", default={})
            if trainer is None:
                raise ConfigError("trainer: is null; give a mapping of Trainer arguments or leave the key out")
            from drpo_lightning.trainer_checks import check_trainer

            check_trainer({**trainer, **kwargs})  # what Lightning accepts but cannot work with RLModule
            from drpo_lightning.summary import add_run_callbacks

            add_run_callbacks(trainer)  # closing summary, step progress bar, one-line model summary
            try:
                return super().instantiate_trainer(**kwargs)
            except (ValueError, MisconfigurationException) as err:
                raise ConfigError(_trainer_error(err)) from err

    return DRPOCLI


def plain_text(text: str) -> str:
    """Docstring markup as a terminal shows it: ``:class:`~a.b.C``` -> ``C``, ````x```` -> ``x``."""
    import re

    text = re.sub(r":(?:class|func|meth|attr|mod|obj|data|exc):`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def _parser_class():
    """LightningCLI's parser, printing the plugins' docstrings as plain text. A class rather than a
    ``formatter_class`` argument: the nested ``--model.objective.help X`` builds a parser of the same class
    with default arguments."""
    from jsonargparse import DefaultHelpFormatter
    from lightning.pytorch.cli import LightningArgumentParser

    class PlainHelpFormatter(DefaultHelpFormatter):
        def _expand_help(self, action) -> str:
            return plain_text(super()._expand_help(action))

        def _format_text(self, text: str) -> str:
            return super()._format_text(plain_text(text))

        def start_section(self, heading) -> None:
            super().start_section(plain_text(heading) if heading else heading)

    class DRPOArgumentParser(LightningArgumentParser):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("formatter_class", PlainHelpFormatter)
            super().__init__(*args, **kwargs)

    return DRPOArgumentParser


def _trainer_error(err: BaseException) -> str:
    """``trainer.<key>: <Lightning's message>`` for the first Trainer argument the message names."""
    import inspect
    import re

    from lightning.pytorch import Trainer

    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    names = set(inspect.signature(Trainer.__init__).parameters)
    key = next((m for m in re.findall(r"(\w+)=", message) if m in names), None)
    return f"trainer.{key}: {message}" if key else f"trainer: {message}"


def _plugins_command(argv: Sequence[str]) -> int:
    """``drpo plugins [-v]``: every plugin of every kind with its package; broken ones flagged (exit 1)."""
    import argparse
    from importlib.metadata import PackageNotFoundError, entry_points, version

    from drpo_lightning.registry import ALLOW_LIST_ENV, DISABLE_AUTOLOAD_ENV, _allowed

    parser = argparse.ArgumentParser(
        prog="drpo plugins",
        description="List the installed plugins (objectives, rollouts, rewards, advantages, tasks) and the "
        "package of each. Broken plugins are flagged BROKEN; the others still work (exit code 0, or 1 with --strict).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the traceback of each broken plugin")
    parser.add_argument("--strict", action="store_true", help="exit with code 1 when any plugin is broken")
    args = parser.parse_args(list(argv))
    load_all()
    try:
        own = version("drpo-lightning")
    except PackageNotFoundError:  # running from a source tree
        own = "?"
    print(f"drpo-lightning {own}")
    autoload_off = bool(os.environ.get(DISABLE_AUTOLOAD_ENV))
    if autoload_off:
        allow = os.environ.get(ALLOW_LIST_ENV, "")
        print(f"(autoload off: built-ins{' + ' + allow if allow else ''} only; {DISABLE_AUTOLOAD_ENV} is set)")
    broken: list[str] = []
    for kind, registry in REGISTRIES.items():
        print(f"\n{kind}:")
        for name, info in registry.available().items():
            print(f"  {name:<16} {info.target:<52} {info.package} {info.version}")
        for name, error in sorted(registry.errors.items()):
            print(f"  {name:<16} BROKEN: {error}")
            broken.append(f"{kind}/{name}")
            if args.verbose and name in registry.tracebacks:
                print("    " + registry.tracebacks[name].rstrip().replace("\n", "\n    "))
        if autoload_off:
            for ep in entry_points(group=registry.group):
                dist = getattr(ep, "dist", None)
                package = dist.name if dist is not None else "<unknown>"
                if not _allowed(ep.name, package):
                    print(f"  {ep.name:<16} not loaded: autoload is off and {package} is not in {ALLOW_LIST_ENV}")
    if broken:
        print(
            f"\n{len(broken)} broken plugin(s): {', '.join(broken)} (the others work; "
            "`drpo plugins -v` shows the tracebacks)",
            file=sys.stderr,
        )
        return 1 if args.strict else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``drpo`` console script."""
    from drpo_lightning import quiet

    quiet.install()  # before torch, Lightning and transformers print their start-up noise
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DRPO_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import lightning
        import torch

        print(f"drpo-lightning {_version()} (torch {torch.__version__}, lightning {lightning.__version__})")
        return 0
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        print(f"drpo: error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
              "(drpo --help)", file=sys.stderr)
        return 2
    try:
        if argv and argv[0] == "plugins":
            return _plugins_command(argv[1:])
        if argv and argv[0] == "plot-weights":
            from drpo_lightning.plot import main as plot_main

            return plot_main(argv[1:])
        if argv and argv[0] == "plot-run":
            from drpo_lightning.summary import main as plot_run_main

            return plot_run_main(argv[1:])
        if argv and argv[0] == "rollout-worker":
            from drpo_lightning.rollouts.worker import main as worker_main

            return worker_main(argv[1:])
        if argv and argv[0] == "sweep":
            from drpo_lightning.sweep_cli import main as sweep_main

            return sweep_main(argv[1:])
        load_all()
        install_plugin_names()
        _check_optional_imports(argv)
        from jsonargparse import ArgumentError

        from drpo_lightning.data import PromptDataModule
        from drpo_lightning.module import RLModule

        parser_kwargs = {"parser_mode": "yaml", "exit_on_error": False}
        saved_argv = sys.argv
        # LightningCLI reads sys.argv itself; hand it ours (without --debug) instead of passing args=.
        sys.argv = [saved_argv[0] if saved_argv else "drpo", *argv]
        try:
            _lightning_cli()(
                RLModule,
                PromptDataModule,
                save_config_kwargs={"overwrite": True},
                parser_class=_parser_class(),
                parser_kwargs={**parser_kwargs, **{cmd: dict(parser_kwargs) for cmd in LIGHTNING_COMMANDS}},
            )
        except ArgumentError as err:
            if debug:
                raise
            print(f"drpo: error: {condense_parse_error(str(err))}", file=sys.stderr)
            print("drpo: (see `drpo fit --help`; --debug shows the full message)", file=sys.stderr)
            return 2
        finally:
            sys.argv = saved_argv
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except Exception as err:
        if debug:
            raise
        user_error = _user_error_message(err, argv)
        if user_error is None:
            raise
        print(f"drpo: error: {user_error}", file=sys.stderr)
        print("drpo: (run again with --debug for the full traceback)", file=sys.stderr)
        return 2


OPTIONAL_PACKAGES = {"bitsandbytes": "quant", "peft": "quant"}
"""Import roots of optional dependencies -> the drpo-lightning extra that installs them."""


def _config_value(args: Sequence[str], i: int) -> str | None:
    """The file named by ``args[i]`` if it is a config option in one of its five spellings (``--config F``,
    ``--config=F``, ``-c F``, ``-cF``, ``-c=F``); None for any other argument. Abbreviations such as
    ``--conf F``, which argparse also accepts, are left to jsonargparse's own (less precise) message."""
    arg = args[i]
    if arg in ("--config", "-c"):
        return args[i + 1] if i + 1 < len(args) else ""
    if arg.startswith("--config="):
        return arg.removeprefix("--config=")
    if arg.startswith("-c") and not arg.startswith("--"):
        return arg[2:].removeprefix("=")
    return None


def _config_files(argv: Sequence[str]) -> list[tuple[str, object]]:
    """The config files of ``argv`` with their parsed YAML, in order. A YAML syntax error is one line
    naming the file, line and column (jsonargparse would report it without the file)."""

    import yaml

    from drpo_lightning.errors import ConfigError

    args = list(argv)
    found = []
    for i in range(len(args)):
        value = _config_value(args, i)
        if value is None:
            continue
        path = Path(value)
        try:
            if not path.is_file():
                continue  # jsonargparse reports a missing file with its own one-line message
        except OSError:  # e.g. an inline YAML string longer than a file name may be
            continue
        try:
            found.append((value, yaml.safe_load(path.read_text())))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
            if context and start is not None:  # e.g. an unclosed [ : where it was opened
                problem += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
            raise ConfigError(f"--config {value}: YAML syntax error{at}: {problem}") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {value}: cannot be read: {err}") from err
    return found


def _check_optional_imports(argv: Sequence[str]) -> None:
    """A class path into an optional package that is not installed (``model.optimizer: {class_path:
    bitsandbytes.optim.AdamW8bit}``) fails here with one line naming the key and the extra, instead of
    jsonargparse's usage text. Reads the ``--config`` files and ``--key=value`` / ``--key value`` arguments."""
    from drpo_lightning.errors import ConfigError
    from drpo_lightning.models import package_available

    found: dict[str, str] = {}  # key -> value; a later --config or --key overrides an earlier one

    def walk(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(key if k in ("class_path", "init_args") else f"{key}.{k}".lstrip("."), v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{key}[{i}]", v)
        elif isinstance(value, str):
            found[key] = value

    configs = dict(_config_files(argv))
    args = list(argv)
    for i, arg in enumerate(args):
        config = _config_value(args, i)
        if config is not None:
            walk("", configs.get(config))
            continue
        if not arg.startswith("--"):
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value and i + 1 < len(args):
            value = args[i + 1]
        found[key.removesuffix(".class_path")] = value
    for key, value in found.items():
        root = value.split(".", 1)[0]
        if "." in value and root in OPTIONAL_PACKAGES and not package_available(root):
            extra = OPTIONAL_PACKAGES[root]
            raise ConfigError(f"{key}: {value} needs {root}: pip install 'drpo-lightning[{extra}]'")


def condense_parse_error(message: str) -> str:
    """One line out of jsonargparse's multi-line error: the config key and the most telling reason."""
    import re

    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines() if line.strip()]
    key = re.search(r'[Kk]ey "([^"]+)"', message)
    prefix = f"{key.group(1)}: " if key else ""
    ours = [line for line in lines if re.search(r"unknown \w+ '|installed but broken|must be", line)]
    if ours:
        return prefix + ours[0]
    noise = ("Parser key", "Does not validate against any of the", "Expected a <class 'NoneType'>",
             "Given value type", "Errors:", "Subtypes:", "Problem with given class_path")
    useful = [line for line in lines if not line.startswith(noise)]
    return prefix + (useful[0] if useful else lines[0] if lines else "invalid arguments")


def _user_error_message(err: BaseException, argv: Sequence[str] = ()) -> str | None:
    """A one-line message for the errors a user causes (bad config, data, plugin); None for bugs."""
    import re

    from drpo_lightning.errors import UserError
    from drpo_lightning.rewards.combine import RewardError

    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, (UserError, PluginError, RewardError)):
            return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # torch.load(weights_only=True) refused a checkpoint that pickles more than tensors and plain containers.
    # Only for a resume (--ckpt_path given): the same error from any other load is not the user's.
    resuming = any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv)
    for e in chain:
        # (matched by name: this package imports no pickle module, see tests/reliability/test_security.py)
        if resuming and type(e).__name__ == "UnpicklingError" and "Weights only load failed" in str(e):
            from drpo_lightning.resume import pickled_checkpoint_message

            return pickled_checkpoint_message(e)  # e.g. a shard Lightning loads after resume.py's check
    # The run folder cannot be written: read-only, not ours, or the disk is full.
    import errno

    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                                  errno.EDQUOT):
            return (f"{e.filename or 'output folder'}: {e.strerror} (the run folder, trainer.default_root_dir or "
                    "the logger's save_dir, must be writable and have free space)")
    # The checkpoint's weights do not fit the model the config builds (another model, another LoRA setting).
    for e in chain:
        if resuming and isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in str(e):
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
            return (f"ckpt_path: the checkpoint's weights do not fit the model this config builds ({detail[:160]}); "
                    "was it saved with another model.model_name_or_path, model.lora or model.kl_beta?")
    # transformers refuses a model folder with custom code (config.json auto_map) unless it is trusted.
    for e in chain:
        found = re.search(r"The repository (.+?) contains custom code which must be executed", str(e))
        if found and isinstance(e, ValueError):
            return (f"model.trust_remote_code: {found.group(1)} contains custom code (auto_map); it is not run "
                    "unless you set model.trust_remote_code: true, which only a folder you trust deserves")
    # A plugin constructor refused its arguments while jsonargparse instantiated it: name the plugin and
    # give the constructor's own message (it names the argument and value).
    for e in chain:
        found = re.search(r"Given value: Namespace\(class_path='([\w.]+)'", str(e))
        if found and isinstance(chain[-1], ValueError):
            return f"{found.group(1).rsplit('.', 1)[1]}: {str(chain[-1]).strip().splitlines()[0]}"
    return None


if __name__ == "__main__":
    sys.exit(main())
