"""FP8 weight quantisation for rollouts: sample from the policy as an FP8 inference engine would serve it.

Inference engines often serve a model with its linear weights in float8 e4m3 (e.g. vLLM's ``quantization:
fp8``, which computes one scale per weight tensor when it quantises a model online; FP8 checkpoints with
channel-wise scales have one per output row) while the trainer keeps float32 / bf16 weights. The behaviour log-probs then carry the quantisation error on
top of the bf16 kernels' one, and the DRPO/DPPO trust region has to absorb it. :class:`FP8PolicyCopy` keeps a
copy of the policy whose linear weights are rounded the way such an engine rounds them, so that mismatch can
be reproduced (and measured) without the engine.

The format, float8 e4m3 "fn" (``torch.float8_e4m3fn``; Micikevicius et al., "FP8 Formats for Deep Learning",
arXiv:2209.05433, and the OCP 8-bit floating point spec): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
bits, no infinities. Its largest finite value is 448, its smallest normal 2^-6 (subnormals down to 2^-9), and
rounding to nearest-even costs at most half a step of the 3-bit mantissa: a relative error <= 2^-4 for a value
in the normal range.

Quantisation of a weight ``W`` ``[out, in]`` (per output row ``r``, or one scale for the whole tensor):

    s_r  = max_j |W[r, j]| / 448          (s_r = 1 for a row of zeros)
    Wq[r, j] = e4m3(W[r, j] / s_r) * s_r

so the largest entry of each row maps to 448 exactly and the others keep 3 mantissa bits relative to their
own binade (entries whose magnitude is at most 2^-10 * s_r, half the smallest subnormal, round to zero). The copy stores ``Wq`` ("fake quantisation") in the
model's own dtype; the sampling forward runs it under bf16 autocast, as the engines compute activations in
bf16. Activations are not rounded to fp8: this models weight-only fp8 (vLLM's path on GPUs without fp8 tensor
cores); W8A8 kernels also round the activations, which adds a further, smaller error not modelled here.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

from drpo_lightning.errors import ConfigError

__all__ = ["E4M3_MAX", "FP8PolicyCopy", "fake_quantize_fp8", "fp8_available", "quantization_plan", "quantize_fp8_"]

E4M3_MAX = 448.0
"""Largest finite float8 e4m3fn value: ``1.75 * 2**8``."""

# Rows handled per step by quantize_fp8_, as a number of elements: bounds each float32 temporary to 64 MiB
# whatever the size of the weight.
_CHUNK_ELEMENTS = 1 << 24

# Linear classes whose ``weight`` is a plain ``[out, in]`` float matrix used as such by their forward.
# ``NonDynamicallyQuantizableLinear`` is the out-projection of ``nn.MultiheadAttention``.
_PLAIN_LINEAR: tuple[type, ...] = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def fp8_available() -> bool:
    """Whether this torch has the float8 e4m3fn dtype (torch >= 2.1)."""
    return hasattr(torch, "float8_e4m3fn")


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448``, with 1 where ``amax`` is 0 (a zero row stays zero and no division by zero happens)."""
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _round_e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The clamp only catches the division's own rounding (|w / s| can exceed 448 by an ulp); torch's cast
    # does not saturate on every device.
    return (w / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(w.dtype) * scale


def quantize_fp8_(dst: torch.Tensor, src: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Write the fp8 e4m3 fake-quantised ``src`` ``[out, in]`` into ``dst`` (same shape, any float dtype).

    ``per_row``: one scale per row (output feature) ``s_r = amax_r / 448``; otherwise one for the tensor. The
    arithmetic runs in float32 (float64 for a float64 ``src``), ``Wq = e4m3(W / s) * s``, and is rounded once
    to ``dst``'s dtype at the end. ``src`` is only read. Returns ``dst``.
    """
    if src.ndim != 2 or dst.shape != src.shape:
        raise ValueError(f"quantize_fp8_: src and dst must be the same [out, in] matrix; got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    if not fp8_available():
        raise RuntimeError(f"quantize_fp8_: torch {torch.__version__} has no float8_e4m3fn dtype")
    work = torch.float64 if src.dtype == torch.float64 else torch.float32
    rows, cols = src.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, cols))
    with torch.no_grad():
        tensor_scale = None
        if not per_row:
            amax = max((float(src[i : i + step].abs().amax()) for i in range(0, rows, step)), default=0.0)
            tensor_scale = _scale(torch.tensor(amax, dtype=work, device=src.device))
        for i in range(0, rows, step):
            w = src[i : i + step].to(work)  # [r, in]
            scale = _scale(w.abs().amax(dim=1, keepdim=True)) if per_row else tensor_scale  # [r, 1] or []
            dst[i : i + step].copy_(_round_e4m3(w, scale))
    return dst


def fake_quantize_fp8(weight: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """A new tensor: :func:`quantize_fp8_` of ``weight`` in ``weight``'s dtype."""
    return quantize_fp8_(torch.empty_like(weight), weight, per_row)


# ----------------------------------------------------------------------------------------- the policy copy


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layers: ``weight`` is ``[in, out]``), if importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _adapter_modules(policy: nn.Module) -> set[int]:
    """Ids of the modules inside PEFT adapter containers (``lora_A``, ``lora_B``, ...): kept in high precision,
    as engines apply LoRA adapters in bf16 next to the fp8 base weights."""
    ids: set[int] = set()
    for module in policy.modules():
        for name in getattr(module, "adapter_layer_names", ()) or ():
            container = getattr(module, name, None)
            if isinstance(container, nn.Module):
                ids.update(id(m) for m in container.modules())
    return ids


def _is_sharded(policy: nn.Module) -> bool:
    from drpo_lightning.distributed import is_sharded

    if is_sharded(policy):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in policy.parameters())


def quantization_plan(policy: nn.Module, precision: str = "fp8") -> dict[str, bool]:
    """Parameter names of ``policy`` that the fp8 copy quantises -> whether the weight is stored transposed
    (``[in, out]``, transformers' ``Conv1D``).

    Every ``torch.nn.Linear`` weight (and ``Conv1D`` weight) except those of the output head
    (``get_output_embeddings()``), of PEFT adapters, and weights shared with a module that is not a linear
    layer (a head tied to the input embeddings). Embeddings, norms and biases stay as they are. A subclass of
    ``nn.Linear`` with its own forward (bitsandbytes' ``Linear8bitLt`` / ``Linear4bit``, ...) is refused with
    a :class:`ConfigError` rather than quantised as if its weight were a plain matrix.
    """
    key = f"model.rollout.init_args.precision: {precision}"
    get_head = getattr(policy, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    skipped = _adapter_modules(policy) | ({id(m) for m in head.modules()} if head is not None else set())
    conv1d = _conv1d_class()
    owners: dict[int, list[nn.Module]] = {}  # id(param) -> modules holding it directly
    for module in policy.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)

    candidates: dict[int, bool] = {}
    for name, module in policy.named_modules():
        if id(module) in skipped:
            continue
        is_linear = isinstance(module, nn.Linear)
        if is_linear and type(module) not in _PLAIN_LINEAR:
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise ConfigError(f"{key} rounds plain torch.nn.Linear weights to fp8, but {name or 'the policy'} is "
                              f"a {kind} (a quantised or wrapped Linear, e.g. bitsandbytes); use bf16 instead")
        is_conv1d = conv1d is not None and type(module) is conv1d
        if not (is_linear or is_conv1d):
            continue
        if not module.weight.is_floating_point():
            raise ConfigError(f"{key}: the weight of {name} is {module.weight.dtype}, not a float matrix "
                              "(already quantised?); use bf16 instead")
        candidates[id(module.weight)] = is_conv1d

    plan: dict[str, bool] = {}
    for name, p in policy.named_parameters():
        linear_only = all(isinstance(m, nn.Linear) or (conv1d and type(m) is conv1d) for m in owners[id(p)])
        if id(p) in candidates and linear_only and not any(id(m) in skipped for m in owners[id(p)]):
            plan[name] = candidates[id(p)]
    if not plan:
        raise ConfigError(f"{key} found no torch.nn.Linear layer to quantise in the policy besides its output "
                          "head (quantised or adapter-only layers?); use bf16 instead")
    return plan


def _layout(policy: nn.Module) -> tuple:
    """What the copy must match to be refreshed in place: names, classes, shapes, dtypes, devices."""
    return tuple((name, type(t), t.shape, t.dtype, t.device)
                 for named in (policy.named_parameters(), policy.named_buffers()) for name, t in named)


class FP8PolicyCopy:
    """The fp8 copy of a policy that the rollout samples from, refreshed from the live weights on every use.

    :meth:`sync` returns a module with the policy's architecture and values, except that every linear weight
    in :func:`quantization_plan` holds its fp8 e4m3 fake quantisation (:func:`quantize_fp8_`). The copy is made
    once (a ``deepcopy`` of the policy whose parameters start empty, without gradients) and each later call
    only ``copy_``-es the current weights into it, so it always reflects the policy as of that call. It is
    rebuilt only when a different policy is passed or the policy's parameter layout changes (a parameter
    moved to another device or dtype). The live policy is never modified.

    Memory: one extra copy of the policy's parameters and buffers, in their own dtype and on their device
    (the fake-quantised values are stored in the model's dtype, not in one byte), held from the first call
    until the holder is dropped, plus a few float32 temporaries of at most 2^24 elements (64 MiB) each while
    quantising.

    Not supported: an FSDP-sharded policy (parameters that are DTensors): refused with a :class:`ConfigError`.

    A fresh holder, or one that was used, pickles and deep-copies without its copy (the copy is a cache,
    rebuilt on the next call), so an engine holding one can be sent to another process.
    """

    def __init__(self, per_row: bool = True, precision: str = "fp8") -> None:
        if not fp8_available():
            raise ConfigError(f"model.rollout.init_args.precision: {precision} needs torch.float8_e4m3fn (torch >= 2.1); "
                              f"this torch {torch.__version__} does not have it")
        self.per_row = per_row
        self.precision = precision
        self._clear()

    def _clear(self) -> None:
        self.model: nn.Module | None = None
        self._source: weakref.ref | None = None
        self._plan: dict[str, bool] = {}
        self._layout: tuple = ()

    def __getstate__(self) -> dict[str, Any]:
        return {"per_row": self.per_row, "precision": self.precision}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clear()

    def sync(self, policy: nn.Module) -> nn.Module:
        """The fp8 copy of ``policy`` with its current weights (built on first use)."""
        if _is_sharded(policy):
            raise ConfigError(f"model.rollout.init_args.precision: {self.precision} does not support an FSDP-sharded "
                              "policy (its parameters are DTensors); use bf16 there")
        layout = _layout(policy)
        if self.model is None or self._source is None or self._source() is not policy or layout != self._layout:
            self._build(policy, layout)
        self._refresh(policy)
        return self.model

    def _build(self, policy: nn.Module, layout: tuple) -> None:
        self._clear()  # drop an old copy before making the new one: never two extra copies at once
        plan = quantization_plan(policy, self.precision)
        # Parameters enter the copy empty (their values come from _refresh) and without gradients; the memo
        # keeps tied parameters tied. Buffers and other tensors are deep-copied as they are.
        memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p), requires_grad=False)
                                for p in policy.parameters()}
        replica = copy.deepcopy(policy, memo)
        replica.eval()
        self.model, self._plan, self._layout = replica, plan, layout
        self._source = weakref.ref(policy)

    def _refresh(self, policy: nn.Module) -> None:
        assert self.model is not None
        with torch.no_grad():
            pairs = zip(policy.named_parameters(), self.model.named_parameters(), strict=True)
            for (name, src), (_, dst) in pairs:
                transposed = self._plan.get(name)
                if transposed is None:
                    dst.copy_(src)
                elif transposed:  # Conv1D: [in, out], one scale per output column
                    quantize_fp8_(dst.t(), src.t(), self.per_row)
                else:
                    quantize_fp8_(dst, src, self.per_row)
            for (_, src), (_, dst) in zip(policy.named_buffers(), self.model.named_buffers(), strict=True):
                dst.copy_(src)
