"""One optimizer update of RLModule: clip by the global gradient norm, skip a non-finite update, step."""

from __future__ import annotations

import torch

from drpo_lightning.errors import UserError


def optimizer_update(module, optimizer, scheduler, loss: torch.Tensor, metrics) -> None:
    max_norm = module.hparams.max_grad_norm if module.hparams.max_grad_norm is not None else float("inf")
    grad_norm = clip_grad_norm(module, max_norm)
    metrics["loss"].append(loss)
    metrics["grad_norm"].append(grad_norm.detach())
    finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    clipped_norm = None
    if finite and module.hparams.max_grad_norm is not None:
        # Clipping scales the gradient by max_norm / norm: a finite norm can still give a NaN gradient (a
        # NaN max_grad_norm set after the config check, a clipping bug), so measure what the optimizer
        # would apply. The norm is global (a collective on every rank, which all reach: `finite` agrees).
        clipped_norm = clip_grad_norm(module, float("inf"))
        finite = bool(torch.isfinite(clipped_norm))
    if not finite:
        # A non-finite update would wreck the policy silently: skip it, count it, stop if it persists.
        optimizer.zero_grad(set_to_none=True)
        module.skipped_updates += 1
        module._consecutive_skips += 1
        if module._consecutive_skips >= module.hparams.max_consecutive_skips:
            clipped = "" if clipped_norm is None else f", after clipping {float(clipped_norm):.4g}"
            raise UserError(
                f"{module._consecutive_skips} consecutive updates had a non-finite loss or gradient "
                f"(loss={float(loss):.4g}, grad_norm={float(grad_norm):.4g}{clipped}); stopping. Lower the "
                "learning rate or check the rewards (model.max_consecutive_skips)"
            )
        return
    module._consecutive_skips = 0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()


def clip_grad_norm(module, max_norm: float) -> torch.Tensor:
    """Clip the policy gradient to ``max_norm`` (inf: measure only) and return its total norm.

    Sharded gradients need the norm over all shards: FSDP1 through the root unit's ``clip_grad_norm_``
    (``torch.nn.utils.clip_grad_norm_`` would clip each rank by its own shard's norm), FSDP2 through
    ``clip_grad_norm_`` on DTensor gradients. Both are collectives, called on every rank.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    from drpo_lightning.distributed import is_sharded

    root = module.trainer.strategy.model if module._trainer is not None else None
    if isinstance(root, FullyShardedDataParallel):
        return root.clip_grad_norm_(max_norm).detach()
    params = [p for p in module.policy.parameters() if p.grad is not None]
    if not params and not is_sharded(module.policy):
        return torch.zeros((), device=module.device)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full_tensor = getattr(grad_norm, "full_tensor", None)  # a DTensor for FSDP2 gradients
    return (full_tensor() if callable(full_tensor) else grad_norm).detach()
