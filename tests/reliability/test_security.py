"""Security defaults: no remote code unless asked, weights-only checkpoint loading, config strings are never
evaluated, and plugins come only from installed entry points (optionally allow-listed) or explicit class paths.

Each "does not run" scenario plants a payload that would create a marker file if it ever ran, and checks the
marker is absent afterwards; where it is cheap, a control shows the payload does run when the guard is off.
"""

from __future__ import annotations

import ast
import inspect
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rel_helpers import ROOT, assert_one_line_error, tiny_fit_args

from drpo_lightning.cli import main
from drpo_lightning.errors import ConfigError
from drpo_lightning.module import RLModule
from drpo_lightning.registry import ALLOW_LIST_ENV, DISABLE_AUTOLOAD_ENV, OBJECTIVES, load_all

PACKAGE = ROOT / "drpo_lightning"


class ModelLoadReached(Exception):
    """Raised by the trapped policy loader: the config was accepted and training was about to start."""


@pytest.fixture
def trap_model_load(monkeypatch):
    def trap(*args, **kwargs):
        raise ModelLoadReached

    monkeypatch.setattr("drpo_lightning.models.load_policy", trap)


class Payload:
    """Unpickling this creates ``marker`` (pickle calls ``open(marker, "w")``): what a malicious file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------------------------------ remote code


def test_trust_remote_code_is_off_by_default_and_in_every_shipped_config():
    assert inspect.signature(RLModule).parameters["trust_remote_code"].default is False
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text()) or {}
        model = config.get("model") or {}
        assert model.get("trust_remote_code", False) is False, path


def test_model_folder_with_custom_code_is_refused_and_its_code_never_runs(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "custom_arch"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (folder / "custom_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_arch'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_arch", auto_map={"AutoConfig": "custom_code.CustomConfig",
                                                      "AutoModelForCausalLM": "custom_code.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    code = main(tiny_fit_args(tmp_path, f"--model.model_name_or_path={folder}"))
    assert_one_line_error(code, capsys.readouterr().err, "model.trust_remote_code: ", "contains custom code",
                          "model.trust_remote_code: true")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ checkpoints


def test_resume_refuses_a_checkpoint_with_pickled_objects_and_runs_none_of_it(tmp_path, capsys):
    marker = tmp_path / "PICKLE_RAN"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": Payload(marker)}, evil)
    # The default resume (`drpo fit --ckpt_path FILE`, no --weights_only) loads weights-only.
    code = main(tiny_fit_args(tmp_path, f"--ckpt_path={evil}"))
    assert_one_line_error(code, capsys.readouterr().err, "ckpt_path: the checkpoint holds pickled Python objects",
                          "nothing in it was run")
    assert not marker.exists()
    with pytest.raises(ConfigError) as raised:  # --debug: the traceback, chained to torch's own refusal
        main(tiny_fit_args(tmp_path, f"--ckpt_path={evil}", "--debug"))
    assert isinstance(raised.value.__cause__, pickle.UnpicklingError)
    assert "Weights only load failed" in str(raised.value.__cause__)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: a full unpickle does run the payload
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ config strings


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        pytest.param(["--model.kl_beta=__import__('pathlib').Path('{m}').touch()"], "model.kl_beta:", id="python-expr"),
        pytest.param(["--model.kl_beta=!!python/object/apply:os.system ['touch {m}']"], "model.kl_beta:",
                     id="yaml-tag-cli"),
        pytest.param(["--config", "{d}/tagged.yaml"], "could not determine a constructor for the tag", id="yaml-tag-file"),
        pytest.param(["--model.objective={{class_path: builtins.eval, init_args: {{source: 'open(\"{m}\", \"w\")'}}}}"],
                     "model.objective:", id="eval-as-plugin"),
        pytest.param(["--model.rewards=[{{class_path: subprocess.Popen, init_args: {{args: [touch, '{m}']}}}}]"],
                     "model.rewards:", id="popen-as-plugin"),
    ],
)
def test_config_strings_are_data_never_code(extra, fragment, tmp_path, capsys, trap_model_load):
    marker = tmp_path / "CONFIG_CODE_RAN"
    (tmp_path / "tagged.yaml").write_text(f"model:\n  kl_beta: !!python/object/apply:os.system ['touch {marker}']\n")
    code = main(tiny_fit_args(tmp_path, *(a.format(m=marker, d=tmp_path) for a in extra)))
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert not marker.exists()


def test_a_string_option_keeps_code_as_plain_text(tmp_path, trap_model_load, monkeypatch):
    marker = tmp_path / "CONFIG_CODE_RAN"
    text = f"__import__('pathlib').Path('{marker}').touch()"
    seen = {}
    original = RLModule.configure_model

    def record(self):
        seen["system_prompt"] = self.hparams.system_prompt
        return original(self)

    monkeypatch.setattr(RLModule, "configure_model", record)
    with pytest.raises(ModelLoadReached):
        main(tiny_fit_args(tmp_path, f"--data.system_prompt={text}"))
    assert seen["system_prompt"] == text
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_the_package_has_no_eval_exec_pickle_or_unsafe_loads():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for module in modules:
                    if module.split(".")[0] in ("pickle", "dill", "marshal", "shelve", "cloudpickle"):
                        problems.append(f"{where}:{node.lineno}: imports {module}")
        for node, owner, name in _calls(tree):
            line = f"{where}:{node.lineno}"
            if owner == "" and name in ("eval", "exec", "compile") and isinstance(node.func, ast.Name):
                problems.append(f"{line}: calls {name}()")
            if owner == "yaml" and name not in ("safe_load", "safe_dump", "safe_load_all", "dump"):
                problems.append(f"{line}: yaml.{name}")
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    problems.append(f"{line}: torch.load without weights_only=True")
            for k in node.keywords:
                if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True:
                    problems.append(f"{line}: trust_remote_code=True")
            if name == "__import__" and str(where) != "drpo_lightning/registry.py":
                problems.append(f"{line}: __import__")
    assert not problems, "\n".join(problems)


def test_the_scan_above_would_catch_each_pattern(tmp_path, monkeypatch):
    # The control: a package holding each forbidden pattern fails the scan, one problem per pattern.
    fake = tmp_path / "drpo_lightning"
    fake.mkdir()
    (fake / "bad.py").write_text(
        "import pickle\nimport yaml, torch\neval('1')\nexec('x=1')\nyaml.load('a')\ntorch.load('f')\n"
        "torch.load('f', weights_only=False)\nf(trust_remote_code=True)\n__import__('os')\nmodel.eval()\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError) as info:
        test_the_package_has_no_eval_exec_pickle_or_unsafe_loads()
    found = str(info.value)
    for pattern in ("imports pickle", "calls eval()", "calls exec()", "yaml.load", "bad.py:6: torch.load",
                    "bad.py:7: torch.load", "trust_remote_code=True", "__import__"):
        assert pattern in found, pattern
    assert "model.eval" not in found and ":10:" not in found


# ------------------------------------------------------------------------------------------------ plugin sources


@pytest.fixture
def autoload_env(monkeypatch):
    """Set the registry's environment switches, reload, and restore the normal registries afterwards."""

    def apply(**env):
        for key in (DISABLE_AUTOLOAD_ENV, ALLOW_LIST_ENV):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        load_all(reload=True)

    yield apply
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(ALLOW_LIST_ENV, raising=False)
    load_all(reload=True)


def test_autoload_off_loads_only_builtins_and_the_allow_list_opens_one_package(
    autoload_env, trap_model_load, tmp_path, capsys
):
    pytest.importorskip("drpo_spo")
    autoload_env()
    assert "spo" in OBJECTIVES  # installed plugin packages load by default (entry points)

    autoload_env(**{DISABLE_AUTOLOAD_ENV: "1"})
    assert "spo" not in OBJECTIVES and "drpo" in OBJECTIVES
    code = main(tiny_fit_args(tmp_path, "--model.objective=spo"))
    assert_one_line_error(code, capsys.readouterr().err, "model.objective: unknown objective 'spo'")
    with pytest.raises(ModelLoadReached):  # an explicit class path still works: the user named the code
        main(tiny_fit_args(tmp_path, "--model.objective=drpo_spo.objective.SPO"))

    autoload_env(**{DISABLE_AUTOLOAD_ENV: "1", ALLOW_LIST_ENV: "drpo-spo"})
    assert OBJECTIVES.available()["spo"].package == "drpo-spo"
    with pytest.raises(ModelLoadReached):
        main(tiny_fit_args(tmp_path, "--model.objective=spo"))
