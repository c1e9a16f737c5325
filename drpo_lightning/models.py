"""Loading the policy (and the KL reference) from a local Hugging Face folder.

Kept apart from the training loop so that loading variants (quantized base weights, LoRA adapters) change
this file, not :mod:`drpo_lightning.module`.
"""

from __future__ import annotations

from typing import Any

import torch


def load_causal_lm(path: str, *, trust_remote_code: bool = False, model_kwargs: dict[str, Any] | None = None):
    """``AutoModelForCausalLM.from_pretrained`` from a local folder only (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code, **dict(model_kwargs or {})
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0: dropout makes the training forward disagree with the rollout's,
    an off-policy gap that buys nothing in RL fine-tuning."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # attention layers that call F.dropout themselves


def load_policy(
    path: str,
    *,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    no_dropout: bool = True,
) -> torch.nn.Module:
    """The trainable policy, in train mode (gradient checkpointing only acts in train mode)."""
    policy = load_causal_lm(path, trust_remote_code=trust_remote_code, model_kwargs=model_kwargs)
    policy.train()
    if no_dropout:
        disable_dropout(policy)
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    return policy


def load_reference(
    policy: torch.nn.Module,
    path: str,
    *,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> torch.nn.Module | None:
    """A frozen copy of the initial policy for the KL penalty; None when the policy carries adapters (LoRA),
    whose base weights *are* the reference (``policy.disable_adapter()``), so no second copy is loaded."""
    if hasattr(policy, "disable_adapter"):
        return None
    reference = load_causal_lm(path, trust_remote_code=trust_remote_code, model_kwargs=model_kwargs)
    return reference.requires_grad_(False).eval()
