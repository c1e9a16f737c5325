"""Loading the policy (and the KL reference) from a local Hugging Face folder.

Kept apart from the training loop so that loading variants (quantized base weights, LoRA adapters) change
this file, not :mod:`drpo_lightning.module`.

Quantized base weights and LoRA adapters (the ``quant`` extra: bitsandbytes + peft) are configured with two
small dataclasses, :class:`Quantization` and :class:`LoRA`, given to ``RLModule(quantization=..., lora=...)``
(``model.quantization`` / ``model.lora`` in YAML). With adapters the KL reference policy is the same model
with its adapters switched off (``policy.disable_adapter()``): no second copy is loaded. See
``docs/quantization.md``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from drpo_lightning.errors import ConfigError

QUANT_INSTALL_HINT = "pip install 'drpo-lightning[quant]'"


class MissingPackageError(ConfigError, ImportError):
    """An optional package that a configured plugin needs is not installed; the one-line message names the
    plugin and the drpo-lightning extra that installs the package."""


def missing_package(what: str, package: str, extra: str) -> MissingPackageError:
    """``<what> needs <package>: pip install "drpo-lightning[<extra>]"`` as an error to raise."""
    return MissingPackageError(f'{what} needs the {package} package: pip install "drpo-lightning[{extra}]"')


def package_available(name: str) -> bool:
    """Whether ``import name`` would find the package (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# Typed configuration of quantized base weights and LoRA adapters
# --------------------------------------------------------------------------------------------------


@dataclass
class Quantization:
    """Frozen base weights quantized to 4 or 8 bits by bitsandbytes (``model.quantization``).

    Needs ``model.lora``: quantized weights cannot be trained, only adapters on top of them.

    Args:
        bits: 4 (QLoRA: NF4/FP4 weights, ~0.56 bytes per weight with double quantization) or 8 (LLM.int8():
            ~1 byte per weight).
        quant_type: 4-bit data type: ``nf4`` (normal-float, the QLoRA default) or ``fp4``. Ignored for 8-bit.
        double_quant: 4-bit only: also quantize the per-block scales (saves ~0.4 bits per weight).
        compute_dtype: 4-bit only: dtype the dequantized weights are multiplied in. ``bfloat16`` on recent
            GPUs, ``float16`` on GPUs without bf16 (pre-Ampere), ``float32`` for exactness (slow).
        skip_modules: names of further modules to keep unquantized (e.g. ``[mlp.gate]`` for MoE routers).
            The output head is always kept unquantized; None keeps transformers' default (the head only).
    """

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    skip_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"model.quantization.bits must be 4 or 8, got {self.bits!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"model.quantization.quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(
                "model.quantization.compute_dtype must be 'bfloat16', 'float16' or 'float32', "
                f"got {self.compute_dtype!r}"
            )

    def bnb_config(self, keep_unquantized: list[str] | tuple[str, ...] = ()):
        """The transformers ``BitsAndBytesConfig``; ``keep_unquantized`` (e.g. the head's name) is added to
        ``skip_modules`` when that is set (a given skip list replaces transformers' default one)."""
        from transformers import BitsAndBytesConfig

        skip = None
        if self.skip_modules is not None:
            skip = list(dict.fromkeys([*self.skip_modules, *keep_unquantized]))
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            llm_int8_skip_modules=skip,
        )


@dataclass
class LoRA:
    """Low-rank adapters trained instead of the full weights (``model.lora``; a peft ``LoraConfig``).

    Only the adapters get gradients and optimizer state; checkpoints hold the adapters only.

    Args:
        r: rank of each adapter (the update of a ``[out, in]`` weight is ``B @ A`` with ``B: [out, r]``).
        alpha: scaling numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter input (0 keeps training and rollout forwards identical).
        target_modules: layers that get adapters: ``all-linear`` (every linear layer but the output head), a
            list of module names matched as suffixes (``[q_proj, v_proj]``), or one regular expression that
            must match the full module name.
        bias: which biases are trained: ``none``, ``all`` or ``lora_only``.
        modules_to_save: further modules trained in full and saved with the adapters (e.g. ``[lm_head]``).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"model.lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"model.lora.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: name the layers that get adapters")

    def peft_config(self):
        """The peft ``LoraConfig`` (task type causal LM)."""
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=self.bias,
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            task_type="CAUSAL_LM",
        )


def _coerce(cls, value, key: str):
    """An instance of the dataclass ``cls`` from itself, None, or its fields as a mapping (the LightningCLI
    hands the module its hyperparameters as plain config dicts; checkpoints store them that way too)."""
    if value is None or isinstance(value, cls):
        return value
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict):
        fields = dict(value.get("init_args", value)) if "class_path" in value else dict(value)
        try:
            return cls(**fields)
        except TypeError as err:
            raise ConfigError(f"model.{key}: {err}") from None
    raise ConfigError(f"model.{key} must be a mapping of its fields, got {type(value).__name__}")


def as_quantization(value: Quantization | dict | None) -> Quantization | None:
    """:class:`Quantization` from an instance, a dict of its fields, or None."""
    return _coerce(Quantization, value, "quantization")


def as_lora(value: LoRA | dict | None) -> LoRA | None:
    """:class:`LoRA` from an instance, a dict of its fields, or None."""
    return _coerce(LoRA, value, "lora")


def check_adapter_packages(quantization: Quantization | dict | None, lora: LoRA | dict | None) -> None:
    """Cheap checks before anything loads: the packages are installed and the combination can train."""
    quantization, lora = as_quantization(quantization), as_lora(lora)
    if quantization is not None and not package_available("bitsandbytes"):
        raise ConfigError(f"model.quantization needs bitsandbytes: {QUANT_INSTALL_HINT}")
    if lora is not None and not package_available("peft"):
        raise ConfigError(f"model.lora needs peft: {QUANT_INSTALL_HINT}")
    if quantization is not None and lora is None:
        raise ConfigError(
            f"model.quantization ({quantization.bits}-bit) needs model.lora: quantized base weights are frozen, "
            "only adapters can be trained on top of them"
        )


def load_causal_lm(path: str, *, trust_remote_code: bool = False, model_kwargs: dict[str, Any] | None = None):
    """``AutoModelForCausalLM.from_pretrained`` from a local folder only (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    model_kwargs = dict(model_kwargs or {})
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code, **model_kwargs
        )
    except (TypeError, ValueError, AttributeError) as err:
        culprit = _model_kwarg_in(err, model_kwargs)
        if culprit is None:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.model_kwargs: {culprit} was refused by from_pretrained: {message}") from err


def _model_kwarg_in(err: BaseException, model_kwargs: dict[str, Any]) -> str | None:
    """``key=value`` of the ``model.model_kwargs`` entry that ``err`` (raised by ``from_pretrained``) names,
    by key or by value; None when it names none of them (then the error is not the kwargs' fault)."""
    text = str(err)
    for key, value in model_kwargs.items():
        named = re.search(rf"\b{re.escape(str(key))}\b", text)
        if named or (isinstance(value, str) and value and value in text):
            return f"{key}={value!r}"
    return None


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
    quantization: Quantization | dict | None = None,
    lora: LoRA | dict | None = None,
) -> torch.nn.Module:
    """The trainable policy, in train mode (gradient checkpointing only acts in train mode).

    With ``quantization`` the linear layers (all but the output head) are loaded as bitsandbytes 4-bit or
    8-bit layers (on the current CUDA device when there is one, else on the CPU); with ``lora`` the model is
    wrapped by peft, its base weights frozen and float32 adapters added. Package checks and the check of
    ``lora.target_modules`` against the model's layer names run first, on a weightless (meta-device) copy
    built from ``config.json``, so a mistake fails before any weights are read.

    ``peft.prepare_model_for_kbit_training`` is deliberately not called. It casts every non-quantized
    bf16/fp16 weight (embeddings, output head, norms) to float32 although they stay frozen (+0.5 GB for a
    7B model or for Qwen2.5-1.5B's 151k x 1536 tied embedding), and it switches gradient checkpointing on
    regardless of ``model.gradient_checkpointing``. What it does that matters is done here instead: the base
    is frozen, the adapters are float32 (peft's default), gradient checkpointing follows the config and is
    non-reentrant (so the frozen embeddings need no ``enable_input_require_grads`` hook). Frozen weights
    keep the checkpoint's dtype; set ``model.model_kwargs: {dtype: bfloat16}`` to choose it.
    """
    model_kwargs = dict(model_kwargs or {})
    quantization, lora = as_quantization(quantization), as_lora(lora)
    if quantization is not None or lora is not None:
        check_adapter_packages(quantization, lora)
        skeleton = model_skeleton(path, trust_remote_code=trust_remote_code)
        if lora is not None:
            check_lora_targets(skeleton, lora)
        if quantization is not None:
            model_kwargs["quantization_config"] = quantization.bnb_config(_output_head_names(skeleton))
        del skeleton
    policy = load_causal_lm(path, trust_remote_code=trust_remote_code, model_kwargs=model_kwargs)
    if quantization is not None:
        keep_4bit_layers_differentiable(policy)
    policy.train()
    if no_dropout:
        disable_dropout(policy)  # before the adapters: an explicit model.lora.dropout is kept
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    if lora is not None:
        from peft import get_peft_model

        policy.requires_grad_(False)
        policy = get_peft_model(policy, lora.peft_config())  # adapters in float32 (autocast_adapter_dtype)
        policy.train()
    return policy


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' packed CPU inference format on every 4-bit layer; returns how many.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight the first time the layer runs
    in eval mode without gradients (validation, generation) and from then on always multiplies through a
    kernel that has no autograd formula: later training forwards still run, but no gradient flows back
    through the base weights to the layers below, so the adapters of every lower layer get wrong gradients
    (PyTorch only warns "an autograd kernel was not registered"). Measured here: gradients of a tiny model's
    adapters changed by 1e-2 after one eval forward; with this switch they are bit-identical.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def is_adapter_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a peft model (adapters on a frozen base)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")


def model_skeleton(path: str, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``path``'s ``config.json`` on the meta device: its module tree, no weights (instant)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _output_head_names(model: torch.nn.Module) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if head is not None and module is head]


def _adapter_layer_types() -> tuple[type, ...]:
    """Layer types that peft can put a LoRA adapter on."""
    types: list[type] = [torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d]
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - moved in some transformers release
        pass
    return tuple(types)


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers of ``model`` (``q_proj``, ``k_proj``, ...) in model order."""
    linear = tuple(t for t in _adapter_layer_types() if t is not torch.nn.Embedding)
    names = [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear)]
    return list(dict.fromkeys(n for n in names if n))


def check_lora_targets(model: torch.nn.Module, lora: LoRA) -> None:
    """Each entry of ``lora.target_modules`` must name (as a suffix, like peft matches it) at least one layer
    that can carry an adapter; a string other than ``all-linear`` must fully match one. Same for
    ``lora.modules_to_save`` (any module). Raises :class:`ConfigError` listing the layer names that exist."""
    supported = _adapter_layer_types()
    layer_names = [name for name, module in model.named_modules() if isinstance(module, supported)]
    available = ", ".join(linear_layer_names(model))
    targets = lora.target_modules

    def matches(names: list[str], key: str) -> bool:
        return any(name == key or name.endswith("." + key) for name in names)

    if isinstance(targets, str):
        if targets != "all-linear" and not any(re.fullmatch(targets, name) for name in layer_names):
            raise ConfigError(
                f"model.lora.target_modules: the pattern {targets!r} matches no layer of the model; its linear "
                f"layers are: {available} (or use 'all-linear')"
            )
    else:
        missing = [key for key in targets if not matches(layer_names, key)]
        if missing:
            raise ConfigError(
                f"model.lora.target_modules: {', '.join(map(repr, missing))} not found in the model; its "
                f"linear layers are: {available} (or use 'all-linear')"
            )
    all_names = [name for name, _ in model.named_modules() if name]
    missing_save = [key for key in lora.modules_to_save or [] if not matches(all_names, key)]
    if missing_save:
        raise ConfigError(
            f"model.lora.modules_to_save: {', '.join(map(repr, missing_save))} not found in the model; "
            f"top-level modules: {', '.join(n for n, _ in model.named_children())}, linear layers: {available}"
        )


def current_umask() -> int:
    """The process umask (read from /proc where it can be, as setting it to read it races with threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str | os.PathLike[str]) -> None:
    """Give the files in ``folder`` the mode a plain ``open()`` would (0666 minus the umask, usually 0644).

    safetensors writes weights through a temporary file created with mode 0600 and renamed into place, so
    exported weights were readable by their owner only while the config and tokenizer beside them were
    not: a model folder shared with a serving user or a group could not be loaded by them. Only permission
    bits that the umask allows are added; nothing is made more open than the other files of the folder.
    """
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            current = path.stat().st_mode & 0o777
            if current | mode != current:
                path.chmod(current | mode)


def export_policy(
    policy: torch.nn.Module,
    target: str,
    *,
    merge_adapters: bool = False,
    base_path: str | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> str:
    """Write the trained policy to ``target`` and return what was written (``model``, ``adapter`` or
    ``merged``).

    A plain model is written with ``save_pretrained``. An adapter model writes the peft adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``, megabytes; load it with
    ``peft.AutoPeftModelForCausalLM`` or ``PeftModel.from_pretrained(base, target)``). With
    ``merge_adapters`` it writes a plain model instead, loadable by ``AutoModelForCausalLM`` alone: the base
    is loaded again from ``base_path`` *unquantized*, on the CPU, in its checkpoint dtype, the trained adapter
    weights are copied onto it and merged there. The quantized training copy is never merged into: merging
    into 4-bit weights would dequantize, add the update and re-quantize, rounding most of the update away.
    This needs CPU memory for one full-precision copy of the base for the duration of the export.
    """
    if not is_adapter_model(policy) or not merge_adapters:
        policy.save_pretrained(target)
        follow_umask(target)
        return "adapter" if is_adapter_model(policy) else "model"
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if base_path is None:
        raise ValueError("export_policy(merge_adapters=True) needs base_path, the folder of the base model")
    kwargs = {k: v for k, v in dict(model_kwargs or {}).items() if k not in ("quantization_config", "device_map")}
    base = load_causal_lm(base_path, trust_remote_code=trust_remote_code, model_kwargs=kwargs)
    adapter_name = getattr(policy, "active_adapter", "default")
    config = policy.peft_config[adapter_name]
    fresh = get_peft_model(base, config)
    weights = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(policy, adapter_name=adapter_name).items()}
    set_peft_model_state_dict(fresh, weights)
    merged = fresh.merge_and_unload()
    merged.save_pretrained(target)
    follow_umask(target)
    return "merged"


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
