"""Memory-lean per-token log-probs and entropy for the training forward.

Why this module exists
----------------------
An RL update needs, for every completion token, ``log pi_theta(y_t)`` (and usually the entropy of
``pi_theta(. | y_<t)``), with gradients. The obvious way,

    logits = model(ids).logits                                   # [B, L, V]  model dtype
    logp = torch.log_softmax(logits.float() / temperature, -1)   # [B, L, V]  float32
    lp = logp.gather(-1, targets[..., None])                     # [B, L]

materialises several ``[B, T, V]`` float32 tensors (the upcast logits, the log-softmax kept for backward,
``p = exp(logp)`` and ``p * logp`` for the entropy, then as many gradients of the same size). With a
150k vocabulary and 4k tokens one such tensor is 2.5 GB, so the log-prob step, not the model, sets the peak
memory of a training step.

Here the LM head and the softmax are fused in a custom :class:`torch.autograd.Function` that walks over
the flattened tokens ``chunk_size`` at a time. Each chunk's logits ``[n, V]`` are computed, upcast to
float32, reduced to a few numbers per token (target log-prob, log-sum-exp, entropy) and freed. Only the
inputs (hidden states, head weight, targets) and ``[N]``-sized statistics are saved; the backward
recomputes each chunk's logits and turns them into gradients for the hidden states, the head weight and
bias with two matmuls. Peak extra memory is therefore ``O(chunk_size * V)`` instead of ``O(N * V)``, at
the price of one extra ``[n, H] x [H, V]`` matmul per chunk in the backward.

Public API
----------
- :func:`token_logprobs_from_hidden`: final hidden states + LM head -> :class:`TokenStats` (the lean path).
- :func:`token_logprobs_from_logits`: for models whose head cannot be split off; the logits already exist,
  but the float32 copy and the softmax are chunked, so only a chunk of float32 is ever alive.
- :func:`policy_token_stats`: runs a causal LM on ``[left-padded prompt | completion]`` and scores the
  completion tokens, picking the lean path when the model allows it.

All results are float32. ``temperature`` divides the logits before the softmax, exactly like sampling
does, so the log-probs are comparable with the behaviour log-probs of a rollout at that temperature.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TokenStats",
    "policy_token_stats",
    "token_logprobs_from_hidden",
    "token_logprobs_from_logits",
]

DEFAULT_CHUNK_SIZE = 512
"""Tokens per chunk. A chunk holds two ``[chunk_size, V]`` float32 buffers (logits and their
exponentials; plus one in the compute dtype for bf16/fp16 heads): 2 x 311 MB for V = 152k.
A chunk-size sweep with ``benchmarks/bench_logprobs.py`` (V = 151,936, T = 4,096, H = 896, fp32, forward +
backward of log-probs and entropy, 2 CPU cores; naive peak 11.9 GB):

    chunk_size           256     512     1024    2048
    peak                 0.071x  0.096x  0.146x  0.246x   of naive
    time vs chunk 2048   1.15x   1.02x   1.00x   1.00x

(The sweep's absolute times predate later speed-ups of this module; docs/performance.md has current ones.)
512 is as fast as larger chunks (the matmuls are already large) and stays well under 0.15x naive memory.
Lower it for very large vocabularies or tight memory; raise it for small vocabularies."""


class TokenStats(NamedTuple):
    """Per-token statistics of the (temperature-scaled) policy distribution. All float32."""

    logprobs: torch.Tensor
    """``[B, T]``: ``log softmax(logits / temperature)[target]``."""
    entropy: torch.Tensor | None
    """``[B, T]``: entropy of ``softmax(logits / temperature)``; None when not asked for."""
    extra_logprobs: torch.Tensor | None
    """``[B, T, K]``: log-probs of ``extra_ids`` (e.g. the behaviour policy's top-K ids, for DPPO-TopK);
    None when no ``extra_ids`` were given."""


# --------------------------------------------------------------------------------------------------
# Per-chunk kernels shared by both autograd functions. ``x`` is always a float32 buffer that the
# function may overwrite (it is never a view of a caller's tensor).
# --------------------------------------------------------------------------------------------------


class _Workspace:
    """Per-call ``[chunk, V]`` buffers reused by every chunk.

    Allocating fresh ``[n, V]`` tensors per chunk would not raise the peak, but on CPU every fresh
    multi-hundred-MB tensor is page-faulted in again, which costs more than the softmax arithmetic.
    ``x`` holds the float32 logits, ``e`` their exponentials; ``low`` (only for low-precision heads) the
    matmul output / gradient in the compute dtype.
    """

    def __init__(self, rows: int, cols: int, device: torch.device, low_dtype: torch.dtype | None = None):
        self.x = torch.empty(rows, cols, dtype=torch.float32, device=device)  # [chunk, V]
        self.e = torch.empty(rows, cols, dtype=torch.float32, device=device)  # [chunk, V]
        self.low = (
            torch.empty(rows, cols, dtype=low_dtype, device=device)  # [chunk, V]
            if low_dtype is not None and low_dtype != torch.float32
            else None
        )

    def views(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.x[:n], self.e[:n], (self.low[:n] if self.low is not None else None)


def _chunk_stats(
    x: torch.Tensor, e: torch.Tensor, targets: torch.Tensor, need_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reduce one chunk of scaled float32 logits to per-token statistics.

    x: ``[n, V]`` float32 scaled logits (overwritten with the log-probs); e: ``[n, V]`` float32 scratch;
    targets: ``[n, J]`` long. Returns (target log-probs ``[n, J]``, log-sum-exp ``[n]``, entropy ``[n]``
    or None).
    """
    m = x.amax(dim=-1, keepdim=True)  # [n, 1]
    x.sub_(m)  # [n, V] shifted logits
    torch.exp(x, out=e)  # [n, V] unnormalised probabilities
    z = e.sum(dim=-1, keepdim=True)  # [n, 1]
    log_z = z.log()  # [n, 1]
    logp = x.sub_(log_z)  # [n, V] log-probs
    lp = logp.gather(1, targets)  # [n, J]
    entropy = None
    if need_entropy:
        # H = -sum_v p_v log p_v = -(sum_v e_v log p_v) / Z
        entropy = e.mul_(logp).sum(dim=-1).div_(z.squeeze(1)).neg_()  # [n]
    return lp, (m + log_z).squeeze(1), entropy


def _chunk_grad(
    x: torch.Tensor,
    e: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    targets: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Gradient w.r.t. the *unscaled* logits of one chunk (returns ``x`` or ``e``, overwritten).

    x: ``[n, V]`` float32 scaled logits; e: ``[n, V]`` float32 scratch; lse, entropy, g_ent: ``[n]``;
    targets, g_lp: ``[n, J]``. ``g_lp`` and ``g_ent`` may not both be None.

    With s = logits / temperature, p = softmax(s): d log p_t / ds_v = [v == t] - p_v and
    dH / ds_v = -p_v (log p_v + H). Summed with the upstream gradients and divided by the temperature:
    dL/dlogits = (scatter(g_lp) - p * (sum_j g_lp_j + g_ent * (log p + H))) / temperature.
    """
    inv_t = 1.0 / temperature
    logp = x.sub_(lse.unsqueeze(1))  # [n, V] log-probs
    p = torch.exp(logp, out=e)  # [n, V]
    # -(sum_j g_lp_j) / temperature, per token
    c0 = g_lp.sum(dim=1, keepdim=True).mul_(-inv_t) if g_lp is not None else None  # [n, 1]
    if g_ent is not None:
        a = g_ent.unsqueeze(1) * -inv_t  # [n, 1]
        c = a * entropy.unsqueeze(1)  # [n, 1]
        if c0 is not None:
            c = c + c0
        # grad = p * (a * log p + c) with a = -g_ent / T, c = -(g_ent * H + sum_j g_lp_j) / T
        grad = logp.mul_(a).add_(c).mul_(p)  # [n, V]
    else:
        grad = p.mul_(c0)  # [n, V]
    if g_lp is not None:
        grad.scatter_add_(1, targets, g_lp * inv_t if temperature != 1.0 else g_lp)
    return grad


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: the autocast dtype when autocast is on, else the inputs'."""
    device_type = tensors[0].device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _scaled_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    temperature: float,
    x: torch.Tensor,
    low: torch.Tensor | None,
) -> torch.Tensor:
    """``(h @ w.T + b) / temperature`` into the float32 buffer ``x``.

    h: ``[n, H]``, w: ``[V, H]``, b: ``[V]`` (all in the compute dtype); x: ``[n, V]`` float32; low:
    ``[n, V]`` compute-dtype buffer when that is not float32. The matmul runs in the compute dtype and is
    rounded there before the upcast, exactly like an unfused ``lm_head(h).float()``.
    """
    out = low if low is not None else x
    if b is not None:
        torch.addmm(b, h, w.t(), out=out)  # [n, V]
    else:
        torch.mm(h, w.t(), out=out)  # [n, V]
    if low is not None:
        x.copy_(low)  # [n, V] float32
    if temperature != 1.0:
        x.div_(temperature)
    return x


class _LinearTokenStats(torch.autograd.Function):
    """Fused ``lm_head -> log_softmax -> gather / entropy``, chunked over tokens, recomputed in backward.

    forward(hidden [N, H], weight [V, H], bias [V] | None, targets [N, J] long, temperature, chunk_size,
    compute_entropy) -> (logprobs [N, J] float32, entropy [N] float32 (or [0] when not computed)).
    Saved for backward: hidden, weight, bias, targets, log-sum-exp [N], entropy [N].
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, compute_entropy):
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden, weight) if bias is None else _compute_dtype(hidden, weight, bias)
        logprobs = hidden.new_empty(targets.shape, dtype=torch.float32)  # [N, J]
        lse = hidden.new_empty(n_tok, dtype=torch.float32)  # [N]
        entropy = hidden.new_empty(n_tok if compute_entropy else 0, dtype=torch.float32)  # [N] or [0]
        ws = _Workspace(min(chunk_size, n_tok), vocab, hidden.device, dtype)
        # The matmul runs in `dtype` with autocast off, so forward and backward see identical logits.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, H]
            b = bias.to(dtype) if bias is not None else None  # [V]
            for start in range(0, n_tok, chunk_size):
                sl = slice(start, start + chunk_size)
                h = hidden[sl].to(dtype)  # [n, H]
                x, e, low = ws.views(h.shape[0])
                _scaled_logits(h, w, b, temperature, x, low)  # [n, V] float32 in x
                lp, lse_c, ent = _chunk_stats(x, e, targets[sl], compute_entropy)
                logprobs[sl] = lp
                lse[sl] = lse_c
                if compute_entropy:
                    entropy[sl] = ent
        del ws
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.compute_dtype = dtype
        ctx.set_materialize_grads(False)
        if not compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if entropy.numel() == 0:
            g_entropy = None
        if (g_logprobs is None and g_entropy is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        dtype, temperature = ctx.compute_dtype, ctx.temperature
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        low_precision = dtype != torch.float32
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        # The weight gradient sums over chunks: accumulate in float32 whatever the weight dtype.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_w_chunk = (
            torch.empty(weight.shape, dtype=dtype, device=weight.device)
            if (need_w and low_precision)
            else None
        )  # [V, H] one chunk's low-precision contribution
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        g_lp = g_logprobs.float() if g_logprobs is not None else None  # [N, J]
        g_ent = g_entropy.float() if g_entropy is not None else None  # [N]
        ws = _Workspace(min(ctx.chunk_size, n_tok), vocab, hidden.device, dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, H]
            b = bias.to(dtype) if bias is not None else None  # [V]
            for start in range(0, n_tok, ctx.chunk_size):
                sl = slice(start, start + ctx.chunk_size)
                h = hidden[sl].to(dtype)  # [n, H]
                x, e, low = ws.views(h.shape[0])
                _scaled_logits(h, w, b, temperature, x, low)  # [n, V] float32 in x, recomputed
                g = _chunk_grad(
                    x,
                    e,
                    lse[sl],
                    entropy[sl] if g_ent is not None else None,
                    targets[sl],
                    g_lp[sl] if g_lp is not None else None,
                    g_ent[sl] if g_ent is not None else None,
                    temperature,
                )  # [n, V] float32: dL/dlogits
                if need_b:
                    grad_b += g.sum(dim=0)
                if low is not None:
                    g = low.copy_(g)  # [n, V] compute dtype
                if need_h:
                    if grad_h.dtype == dtype:
                        torch.mm(g, w, out=grad_h[sl])  # [n, H]
                    else:
                        grad_h[sl] = g @ w  # [n, H], cast to the hidden dtype (autocast)
                if need_w:
                    if low_precision:
                        torch.mm(g.t(), h, out=grad_w_chunk)  # [V, H] low precision
                        grad_w += grad_w_chunk  # float32 accumulation over chunks
                    else:
                        grad_w.addmm_(g.t(), h)  # [V, H] += [V, n] @ [n, H]
        del ws
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
        )


class _LogitsTokenStats(torch.autograd.Function):
    """Chunked ``log_softmax -> gather / entropy`` on existing logits (any float dtype).

    forward(logits [N, V], targets [N, J] long, temperature, chunk_size, compute_entropy)
    -> (logprobs [N, J] float32, entropy [N] float32 (or [0])). Saves the logits (already alive as the
    model's output), targets and ``[N]`` statistics; the float32 upcast exists one chunk at a time.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_size, compute_entropy):
        n_tok, vocab = logits.shape
        logprobs = logits.new_empty(targets.shape, dtype=torch.float32)  # [N, J]
        lse = logits.new_empty(n_tok, dtype=torch.float32)  # [N]
        entropy = logits.new_empty(n_tok if compute_entropy else 0, dtype=torch.float32)  # [N] or [0]
        ws = _Workspace(min(chunk_size, n_tok), vocab, logits.device)
        for start in range(0, n_tok, chunk_size):
            sl = slice(start, start + chunk_size)
            x, e, _ = ws.views(logits[sl].shape[0])
            x.copy_(logits[sl])  # [n, V] float32
            if temperature != 1.0:
                x.div_(temperature)
            lp, lse_c, ent = _chunk_stats(x, e, targets[sl], compute_entropy)
            logprobs[sl] = lp
            lse[sl] = lse_c
            if compute_entropy:
                entropy[sl] = ent
        del ws
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        if not compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        if entropy.numel() == 0:
            g_entropy = None
        if g_logprobs is None and g_entropy is None:
            return None, None, None, None, None
        temperature = ctx.temperature
        n_tok, vocab = logits.shape
        grad = torch.empty_like(logits)  # [N, V] in the logits dtype: the gradient itself is this big
        g_lp = g_logprobs.float() if g_logprobs is not None else None  # [N, J]
        g_ent = g_entropy.float() if g_entropy is not None else None  # [N]
        ws = _Workspace(min(ctx.chunk_size, n_tok), vocab, logits.device)
        for start in range(0, n_tok, ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            x, e, _ = ws.views(logits[sl].shape[0])
            x.copy_(logits[sl])  # [n, V] float32
            if temperature != 1.0:
                x.div_(temperature)
            grad[sl] = _chunk_grad(
                x,
                e,
                lse[sl],
                entropy[sl] if g_ent is not None else None,
                targets[sl],
                g_lp[sl] if g_lp is not None else None,
                g_ent[sl] if g_ent is not None else None,
                temperature,
            )
        del ws
        return grad, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _flat_targets(targets: torch.Tensor, extra_ids: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` targets (+ ``[B, T, K]`` extra ids) -> ``[B*T, 1+K]`` long."""
    flat = targets.reshape(-1, 1).long()  # [N, 1]
    if extra_ids is not None:
        if extra_ids.shape[:-1] != targets.shape:
            raise ValueError(
                f"extra_ids must be [*targets.shape, K] = [{', '.join(map(str, targets.shape))}, K], "
                f"got {list(extra_ids.shape)}"
            )
        flat = torch.cat([flat, extra_ids.reshape(flat.shape[0], -1).long()], dim=1)  # [N, 1+K]
    return flat


def _pack(
    lp: torch.Tensor, ent: torch.Tensor, shape: torch.Size, has_extra: bool, compute_entropy: bool
) -> TokenStats:
    """``[N, 1+K]`` log-probs + ``[N]`` entropy -> TokenStats with ``[B, T(, K)]`` fields."""
    return TokenStats(
        logprobs=lp[:, 0].reshape(shape),  # [B, T]
        entropy=ent.reshape(shape) if compute_entropy else None,  # [B, T]
        extra_logprobs=lp[:, 1:].reshape(*shape, -1) if has_extra else None,  # [B, T, K]
    )


def _check_args(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` whose forward is the stock one and whose weight is a plain float tensor
    (not a quantized ``Linear8bitLt`` / ``Linear4bit``, not a LoRA or ``modules_to_save`` wrapper)."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and type(module.weight) in (torch.Tensor, nn.Parameter)
        and module.weight.is_floating_point()
    )


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_ids: torch.Tensor | None = None,
    compute_entropy: bool = True,
) -> TokenStats:
    """Per-token log-probs (and entropy) of ``targets`` from final hidden states, without ever holding
    more than ``chunk_size`` tokens' logits.

    Args:
        hidden: ``[B, T, H]`` final hidden states (after the model's final norm); position t predicts
            ``targets[:, t]``.
        lm_head: the output projection: an ``nn.Linear`` (weight ``[V, H]``, optional bias ``[V]``) or a
            bare weight tensor ``[V, H]``. Any other module (a LoRA-wrapped or quantized head, say) is
            applied chunk by chunk under activation checkpointing, which is as lean but slower.
        targets: ``[B, T]`` token ids to score.
        temperature: logits are divided by it before the softmax.
        chunk_size: tokens per chunk (memory ~ 2 * chunk_size * V * 4 bytes).
        extra_ids: ``[B, T, K]`` further ids to score at each position (DPPO-TopK: the behaviour
            policy's top-K ids), or None.
        compute_entropy: also return the entropy (differentiable).

    Gradients flow to ``hidden`` and to the head's weight/bias from the log-probs, the extra log-probs
    and the entropy.
    """
    _check_args(temperature, chunk_size)
    shape = targets.shape  # [B, T]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_targets = _flat_targets(targets, extra_ids).to(hidden.device)  # [N, 1+K]
    temperature, chunk_size = float(temperature), int(chunk_size)

    if isinstance(lm_head, torch.Tensor):
        weight, bias = lm_head, None
    elif _plain_linear(lm_head):
        weight, bias = lm_head.weight, lm_head.bias
    elif isinstance(lm_head, nn.Module):
        return _checkpointed_head_stats(
            flat_hidden,
            lm_head,
            flat_targets,
            shape,
            temperature,
            chunk_size,
            extra_ids is not None,
            compute_entropy,
        )
    else:
        raise TypeError(f"lm_head must be an nn.Module or a weight tensor, got {type(lm_head).__name__}")
    lp, ent = _LinearTokenStats.apply(
        flat_hidden, weight, bias, flat_targets, temperature, chunk_size, compute_entropy
    )  # [N, 1+K], [N]
    return _pack(lp, ent, shape, extra_ids is not None, compute_entropy)


def _checkpointed_head_stats(
    flat_hidden: torch.Tensor,
    head: nn.Module,
    flat_targets: torch.Tensor,
    shape: torch.Size,
    temperature: float,
    chunk_size: int,
    has_extra: bool,
    compute_entropy: bool,
) -> TokenStats:
    """Generic lean path for a head we cannot reduce to a weight matrix: ``head(h_chunk)`` + chunked
    softmax per chunk, under non-reentrant activation checkpointing so that nothing ``[n, V]``-sized is
    kept between forward and backward; the backward recomputes one chunk at a time."""

    def chunk_fn(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h)  # [n, V]
        return _LogitsTokenStats.apply(logits, t, temperature, logits.shape[0], compute_entropy)

    lps, ents = [], []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(chunk_fn, flat_hidden[sl], flat_targets[sl], use_reentrant=False)
        else:
            lp, ent = chunk_fn(flat_hidden[sl], flat_targets[sl])
        lps.append(lp)  # [n, 1+K]
        ents.append(ent)  # [n]
    return _pack(torch.cat(lps), torch.cat(ents), shape, has_extra, compute_entropy)


def token_logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_ids: torch.Tensor | None = None,
    compute_entropy: bool = True,
) -> TokenStats:
    """Per-token log-probs (and entropy) from existing logits ``[B, T, V]`` (any float dtype, e.g. bf16).

    For models whose head cannot be split off. The logits themselves (and their gradient) are full size
    in their own dtype, but the float32 upcast, the log-softmax and the entropy terms are only ever
    ``[chunk_size, V]``. ``targets``: ``[B, T]``; ``extra_ids``: ``[B, T, K]`` or None.
    """
    _check_args(temperature, chunk_size)
    shape = targets.shape  # [B, T]
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [N, V] (a view when contiguous)
    flat_targets = _flat_targets(targets, extra_ids).to(logits.device)  # [N, 1+K]
    lp, ent = _LogitsTokenStats.apply(
        flat_logits, flat_targets, float(temperature), int(chunk_size), compute_entropy
    )
    return _pack(lp, ent, shape, extra_ids is not None, compute_entropy)


# --------------------------------------------------------------------------------------------------
# Running a causal LM
# --------------------------------------------------------------------------------------------------

_SCALE_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier_scale")
"""Config/model attributes of architectures that rescale the logits after the head (Cohere, Granite,
Falcon-H1, ...): the lean path does not reproduce them, so such models take the full forward."""


def _head_postprocessing(model: nn.Module) -> str | None:
    """Name of a logit post-processing step the lean path cannot reproduce, or None."""
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        with contextlib.suppress(Exception):  # odd configs: the top-level one is still checked
            configs.append(config.get_text_config())
    for cfg in configs:
        if cfg is None:
            continue
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            return "final_logit_softcapping"
        for name in _SCALE_ATTRS:
            value = getattr(cfg, name, None)
            if value is not None and value != 1:
                return name
    for name in _SCALE_ATTRS:
        if getattr(model, name, None) is not None:
            return name
    return None


def _lean_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder body, head)`` such that ``logits == head(body(...).last_hidden_state)``, or None when
    that cannot be trusted (prompt-learning adapters, logit post-processing, no separable head)."""
    base = model
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and hasattr(model, "get_base_model"):
        # peft: LoRA-style adapters live inside the base model's modules, so running its decoder body
        # directly keeps them. Prompt learning changes the inputs in PeftModel.forward: not reproducible.
        if getattr(peft_config, "is_prompt_learning", False):
            return None
        base = model.get_base_model()
    if _head_postprocessing(base) is not None:
        return None
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return None
    body = None
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        try:
            body = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            body = None
    if not isinstance(body, nn.Module) or body is base:
        # transformers returns the model itself when it finds no decoder; older releases lack
        # get_decoder on some classes (GPT-2). The body is then the base model (`model.transformer`).
        prefix = getattr(base, "base_model_prefix", "")
        body = getattr(base, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is base or body is head:
        return None
    return body, head


def _accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes a keyword ``name`` explicitly."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _shared_prompt_hidden(
    body: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_len: int,
) -> torch.Tensor | None:
    """Hidden states ``[B, T, H]`` of positions ``P-1 .. L-2``, running each distinct prompt only once.

    The G samples of a GRPO group share their prompt, so a plain forward computes the prompt's activations G
    times. Here the prompt prefix (positions ``0 .. P-2``) runs once per distinct ``(ids, mask)`` row with the
    KV cache on, the cache is gathered back to one row per sample (``index_select``: differentiable, so the
    gradient of every sample flows into the shared prefix), and the rest (the last prompt token and the
    completion) runs on top of it. Mathematically the same as the full forward; in float32 the log-probs and
    gradients agree to ~1e-6. Saves ``(G-1)/G`` of the prompt's share of the forward and backward.

    Returns None (the caller runs the plain forward) when rows do not repeat enough to pay (fewer than two
    rows per distinct prompt), the prompt has a single position, the body takes no cache, gradient
    checkpointing is on (it drops the cache), the model is sharded with FSDP (one forward per step there),
    or the cache it returns is not a plain full-attention ``DynamicCache`` (sliding windows, hybrid layers).
    """
    cache_arg = next((name for name in ("cache", "past_key_values") if _accepts(body, name)), None)
    if prompt_len < 2 or cache_arg is None:  # transformers 5.2x calls it `cache`, earlier `past_key_values`
        return None
    checkpointing = getattr(body, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:  # older transformers (is_gradient_checkpointing is deprecated now)
        checkpointing = getattr(body, "is_gradient_checkpointing", False)
    if checkpointing:
        return None
    prefix = torch.cat([input_ids[:, : prompt_len - 1], attention_mask[:, : prompt_len - 1].to(input_ids.dtype)], 1)
    unique, inverse = torch.unique(prefix, dim=0, return_inverse=True)  # [U, 2(P-1)], [B]
    if 2 * unique.shape[0] > input_ids.shape[0]:
        return None
    if any(type(m).__name__.startswith(("FSDP", "FullyShardedDataParallel")) for m in body.modules()):
        return None
    ids, mask = unique[:, : prompt_len - 1], unique[:, prompt_len - 1 :].to(attention_mask.dtype)  # [U, P-1]
    first = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
    rest = {
        "input_ids": input_ids[:, prompt_len - 1 : -1],  # [B, T]
        "attention_mask": attention_mask[:, :-1],  # [B, P-1+T]: cached prefix + this pass
        "use_cache": True,
    }
    if _accepts(body, "position_ids"):
        first["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        rest["position_ids"] = position_ids[:, prompt_len - 1 : -1]
    out = body(**first)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    cache.reorder_cache(inverse)  # [U] -> [B] rows
    out = body(**{cache_arg: cache}, **rest)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]


def policy_token_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_ids: torch.Tensor | None = None,
    compute_entropy: bool = True,
    lean: bool = True,
    share_prompt: bool = True,
) -> TokenStats:
    """Score the completion tokens of ``[left-padded prompt | completion]`` under a causal LM.

    Args:
        model: a transformers causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``, ...), optionally wrapped
            by peft.
        input_ids: ``[B, L]`` with ``L = P + T``: prompt (left-padded, length ``P``) then completion
            (right-padded, length ``T``).
        attention_mask: ``[B, L]``, 1 on real tokens. It is passed to the model (without it, left padding
            is attended and log-probs are off by nats) together with
            ``position_ids = (cumsum(mask) - 1).clamp(min=0)`` (absolute-position models such as GPT-2
            would otherwise number the padding).
        completion_start: ``P`` (>= 1). Logits at position i predict token i + 1, so the hidden states
            of positions ``P-1 .. L-2`` score tokens ``P .. L-1``.
        temperature, chunk_size, extra_ids (``[B, T, K]``), compute_entropy: as in
            :func:`token_logprobs_from_hidden`.
        lean: run the decoder body, then the fused chunked head (no ``[B, T, V]`` logits at all). When
            the model has something the lean path cannot reproduce (final-logit soft-capping, a logit
            scale, no separable head, a prompt-learning adapter) it falls back to the full forward. With
            ``lean=False`` the full forward is always used (the logits of the completion positions are
            materialised in the model dtype; the float32 softmax is still chunked).
        share_prompt: on the lean path, run each distinct prompt once when rows repeat it (the G samples of
            a GRPO group): see :func:`_shared_prompt_hidden`. Same result up to float rounding, with or
            without gradients; turned off automatically where it cannot be used.

    Returns: :class:`TokenStats` with ``[B, T]`` fields (``[B, T, K]`` extra log-probs).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got {list(input_ids.shape)} and "
            f"{list(attention_mask.shape)}"
        )
    seq_len = input_ids.shape[1]
    prompt_len = int(completion_start)
    if not 1 <= prompt_len < seq_len:
        raise ValueError(f"completion_start must be in [1, {seq_len - 1}], got {completion_start}")
    n_completion = seq_len - prompt_len
    attention_mask = attention_mask.to(input_ids.device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    targets = input_ids[:, prompt_len:]  # [B, T]
    kwargs = dict(
        temperature=temperature, chunk_size=chunk_size, extra_ids=extra_ids, compute_entropy=compute_entropy
    )

    parts = _lean_parts(model) if lean else None
    if parts is not None:
        body, head = parts
        hidden = None
        if share_prompt:
            hidden = _shared_prompt_hidden(body, input_ids, attention_mask, position_ids, prompt_len)
        if hidden is None:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
            if _accepts(body, "position_ids"):
                inputs["position_ids"] = position_ids
            out = body(**inputs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, L, H]
            hidden = hidden[:, prompt_len - 1 : seq_len - 1]  # [B, T, H]
        return token_logprobs_from_hidden(hidden, head, targets, **kwargs)

    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,
    }
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _accepts(inner, "logits_to_keep"):
        inputs["logits_to_keep"] = n_completion + 1  # only the positions that score completion tokens
    logits = model(**inputs).logits  # [B, T + 1 (or L), V]
    logits = logits[:, -(n_completion + 1) : -1]  # [B, T, V]
    return token_logprobs_from_logits(logits, targets, **kwargs)
