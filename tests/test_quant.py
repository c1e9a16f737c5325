"""Quantized experiments (the ``quant`` extra): 8-bit optimizer, 4-bit/8-bit base weights + LoRA.

Each YAML config in configs/ runs a few steps on a tiny model through ``drpo fit``; adapters train while the
(quantized) base stays put; adapter checkpoints are small and resume; exports load; bad input fails in one
line. Everything runs on the CPU (bitsandbytes >= 0.49 has a CPU backend).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="needs the quant extra: pip install 'drpo-lightning[quant]'")
pytest.importorskip("peft", reason="needs the quant extra: pip install 'drpo-lightning[quant]'")

import lightning.pytorch as pl  # noqa: E402
from rl_helpers import CountOnes, make_tiny_model  # noqa: E402

from drpo_lightning.cli import main  # noqa: E402
from drpo_lightning.data import PromptDataModule  # noqa: E402
from drpo_lightning.errors import ConfigError  # noqa: E402
from drpo_lightning.models import LoRA, Quantization, export_policy  # noqa: E402
from drpo_lightning.module import RLModule  # noqa: E402
from drpo_lightning.rollouts.hf import HFRollout  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """64 wide rather than the suite's 32: the quantized tests were written and checked at this size."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_quant_policy"), hidden_size=64)


def run_config(config: str, model_dir: str, out: Path, steps: int, *extra: str) -> int:
    # A reward a random policy already earns sometimes ('1' anywhere in the completion), so groups have
    # non-zero advantages and the adapters really move (exact match on a+b scores 0 everywhere).
    rewards = out / "rewards.yaml"
    rewards.parent.mkdir(parents=True, exist_ok=True)
    rewards.write_text("model:\n  rewards:\n    - class_path: format\n      init_args: {pattern: '1', match: search}\n")
    return main([
        "fit", "--config", str(CONFIGS / config), "--config", str(rewards), f"--model.model_name_or_path={model_dir}",
        "--trainer.accelerator=cpu", f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.callbacks.init_args.every_n_train_steps=1", f"--trainer.callbacks.init_args.dirpath={out / 'ckpt'}",
        "--data.task_size=200", "--data.val_size=8", "--data.val_batch_size=8", "--data.batch_size=4",
        "--model.num_generations=4", f"--model.export_dir={out / 'export'}", *extra,
    ])


NO_VALIDATION = ("--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0")


def logged(out: Path, key: str) -> list[float]:
    rows = [row for path in out.rglob("metrics.csv") for row in csv.DictReader(path.read_text().splitlines())]
    return [float(row[key]) for row in rows if row.get(key)]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_8bit_optimizer_config_trains_with_8bit_state(tiny_model_dir, tmp_path):
    assert run_config("drpo_8bit.yaml", tiny_model_dir, tmp_path, 2, *NO_VALIDATION) == 0
    rewards, losses = logged(tmp_path, "reward"), logged(tmp_path, "train/loss")
    assert len(rewards) == 2 and all(map(math.isfinite, rewards + losses))
    ckpt = load_ckpt(tmp_path / "ckpt" / "last.ckpt")
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in ckpt["optimizer_states"][0]["state"].values()]
    # bitsandbytes.optim.AdamW8bit: the moments of large tensors are uint8 ("state1"/"state2").
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in states)
    assert any(s["absmax1"].abs().sum() > 0 for s in states if "absmax1" in s)  # gradients were not all zero
    assert (tmp_path / "export" / "config.json").exists()


def test_paged_adamw8bit_switch(tiny_model_dir, tmp_path):
    code = run_config("drpo_8bit.yaml", tiny_model_dir, tmp_path, 1,
                      "--model.optimizer.class_path=bitsandbytes.optim.PagedAdamW8bit", "--model.export_dir=",
                      *NO_VALIDATION)
    assert code == 0
    assert all(map(math.isfinite, logged(tmp_path, "train/loss")))


def test_int8_lora_config_trains_and_checkpoints_adapters_only(tiny_model_dir, tmp_path):
    assert run_config("drpo_int8_lora.yaml", tiny_model_dir, tmp_path, 2, "--model.lora.r=4") == 0
    assert all(map(math.isfinite, logged(tmp_path, "reward") + logged(tmp_path, "train/loss")))
    state = load_ckpt(tmp_path / "ckpt" / "last.ckpt")["state_dict"]
    assert state and all(".lora_" in key for key in state)
    assert (tmp_path / "export" / "adapter_config.json").exists()


def test_qlora_config_uses_kl_to_adapter_free_base_and_resumes(tiny_model_dir, tmp_path):
    assert run_config("drpo_qlora.yaml", tiny_model_dir, tmp_path, 2, "--model.lora.r=4") == 0
    kl = logged(tmp_path, "train/kl_ref")
    assert kl and all(map(math.isfinite, kl + logged(tmp_path, "reward") + logged(tmp_path, "train/loss")))
    first = load_ckpt(tmp_path / "ckpt" / "last.ckpt")
    assert first["global_step"] == 2
    assert first["state_dict"] and all(".lora_" in key for key in first["state_dict"])
    adapter_bytes = sum(v.numel() * v.element_size() for v in first["state_dict"].values())
    assert (tmp_path / "ckpt" / "last.ckpt").stat().st_size < 4 * adapter_bytes + 200_000  # no base weights

    code = run_config("drpo_qlora.yaml", tiny_model_dir, tmp_path, 4, "--model.lora.r=4",
                      f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}")
    assert code == 0
    resumed = load_ckpt(tmp_path / "ckpt" / "last.ckpt")
    assert resumed["global_step"] == 4
    steps = [s["step"] for s in resumed["optimizer_states"][0]["state"].values()]
    assert all(int(s) == 4 for s in steps)  # AdamW state carried over: 2 + 2 updates
    assert any(not torch.equal(resumed["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])


def test_4bit_lora_trains_adapters_only_and_both_exports_load(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = RLModule(
        model_name_or_path=tiny_model_dir,
        quantization=Quantization(bits=4),
        lora=LoRA(r=4, alpha=8),
        merge_adapters_on_export=True,
        export_dir=str(tmp_path / "merged"),
        rewards=[CountOnes()],
        rollout=HFRollout(max_new_tokens=4),
        num_generations=4,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.policy.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    assert any(p.dtype == torch.uint8 for p in frozen.values())  # packed 4-bit base weights
    assert trainable and all(".lora_" in n for n in trainable)

    data = PromptDataModule(task="arithmetic", task_size=100, val_size=4, batch_size=2, val_batch_size=4, seed=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    after = dict(module.policy.named_parameters())
    trainer.save_checkpoint(tmp_path / "direct.ckpt")
    ckpt = torch.load(tmp_path / "direct.ckpt", weights_only=True)  # what Lightning's resume does
    assert ckpt["hyper_parameters"]["lora"]["r"] == 4  # dataclasses stored as dicts
    assert set(ckpt["state_dict"]) == {f"policy.{n}" for n in trainable}
    assert all(torch.equal(after[n].detach(), p) for n, p in frozen.items())
    assert all(not torch.equal(after[n].detach(), p) for n, p in trainable.items() if "lora_B" in n)

    # The merged export (on_fit_end, merge_adapters_on_export) is a plain model; the adapter export applies
    # to the full-precision base. Both give the same logits.
    assert export_policy(module.policy, str(tmp_path / "adapter")) == "adapter"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.randint(4, 21, (2, 9))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapters did change the model


def test_lean_logprobs_run_through_a_peft_wrapped_4bit_model(tiny_model_dir):
    from drpo_lightning.logprobs import _lean_parts, policy_token_stats
    from drpo_lightning.models import load_policy

    policy = load_policy(tiny_model_dir, quantization=Quantization(bits=4), lora=LoRA(r=4, target_modules=["q_proj"]))
    body, head = _lean_parts(policy)  # the decoder body (adapters inside) and the unquantized head
    assert isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear
    ids = torch.randint(4, 21, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    lean = policy_token_stats(policy, ids, mask, 4, lean=True)
    full = policy_token_stats(policy, ids, mask, 4, lean=False)
    torch.testing.assert_close(lean.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)
    with policy.disable_adapter():  # the KL reference: same weights, adapters off
        ref = policy_token_stats(policy, ids, mask, 4).logprobs
    assert torch.isfinite(ref).all()


# -- bad input -------------------------------------------------------------------------------------------


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_quantization_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError) as err:
        RLModule(quantization=Quantization(bits=4), lora=LoRA())
    assert one_line(err) == "model.quantization needs bitsandbytes: pip install 'drpo-lightning[quant]'"


def test_lora_without_peft(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError) as err:
        RLModule(lora=LoRA())
    assert one_line(err) == "model.lora needs peft: pip install 'drpo-lightning[quant]'"


@pytest.mark.parametrize("spelling", ["--config F", "--config=F", "-c F", "-cF", "-c=F"])
def test_bitsandbytes_optimizer_without_bitsandbytes(spelling, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = spelling.replace("F", str(CONFIGS / "drpo_8bit.yaml")).split(" ")
    code = main(["fit", *config, f"--model.model_name_or_path={tiny_model_dir}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[0] == (
        "drpo: error: model.optimizer: bitsandbytes.optim.AdamW8bit needs bitsandbytes: "
        "pip install 'drpo-lightning[quant]'"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantization": Quantization(bits=4)}, "model.quantization (4-bit) needs model.lora"),
        ({"merge_adapters_on_export": True}, "model.merge_adapters_on_export merges LoRA adapters and needs model.lora"),
        ({"lora": {"r": 0}}, "model.lora.r must be >= 1, got 0"),
        ({"quantization": {"bits": 3}, "lora": LoRA()}, "model.quantization.bits must be 4 or 8, got 3"),
        ({"lora": {"rank": 4}}, "model.lora: "),
    ],
)
def test_bad_adapter_config_is_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError) as err:
        RLModule(**kwargs)  # dicts are the form the CLI passes
    assert message in one_line(err)


@pytest.mark.parametrize(
    ("targets", "shown"),
    [(["q_proj", "query"], "'query' not found in the model"), ("attn\\..*", "the pattern 'attn\\\\..*' matches no")],
)
def test_unknown_lora_targets_fail_before_loading_and_list_the_layers(tiny_model_dir, targets, shown):
    module = RLModule(model_name_or_path=tiny_model_dir, quantization=Quantization(bits=4),
                      lora=LoRA(target_modules=targets))
    with pytest.raises(ConfigError) as err:
        module.configure_model()
    message = one_line(err)
    assert message.startswith("model.lora.target_modules: ")
    assert shown in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
    assert module.policy is None


def test_unknown_lora_target_through_the_cli_is_one_line(tiny_model_dir, tmp_path, capsys):
    code = run_config("drpo_qlora.yaml", tiny_model_dir, tmp_path, 1, "--model.lora.target_modules=[qproj]")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("drpo: error: model.lora.target_modules: 'qproj' not found in the model; its linear")
    assert "Traceback" not in err
