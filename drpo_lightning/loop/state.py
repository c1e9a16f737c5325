"""What RLModule adds to a Lightning checkpoint, takes back from one, and writes at the end of a fit.

- counters (skipped updates, the "before" held-out accuracy), every rank's RNG states, the optimizer class,
  a settled loop position, the rollout feed's policy version and the objective's own state (DRPO's adapted
  delta) go into the checkpoint;
- with ``model.lora`` only the trainable adapter weights are kept (the frozen base reloads from its folder);
- the frozen KL reference is never saved (it reloads from ``model_name_or_path``);
- :func:`export` writes the trained policy with ``save_pretrained`` (FSDP: one gathered full state dict).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from drpo_lightning.checkpoint import settle_loop_position
from drpo_lightning.errors import ConfigError
from drpo_lightning.resume import optimizer_name


def save_state(module, checkpoint: dict[str, Any]) -> None:
    from drpo_lightning.checkpoint import gather_rng_states

    trainer = module._trainer
    checkpoint["drpo_counters"] = {"skipped_updates": module.skipped_updates,
                                   "consecutive_skips": module._consecutive_skips,
                                   "initial_val_accuracy": module.initial_val_accuracy}
    # Lightning saves no RNG state: keep every rank's torch / CUDA / numpy / python states (a collective).
    checkpoint["drpo_rng_states"] = gather_rng_states(trainer)
    feed = getattr(module, "feed", None)
    if feed is not None:
        checkpoint["drpo_rollout"] = feed.state_dict()
    objective_state = module.objective.state_dict()  # e.g. DRPO's adapted delta
    if objective_state:
        checkpoint["drpo_objective"] = objective_state
    _keep_only_adapter_weights(module, checkpoint)
    if trainer is not None:
        settle_loop_position(checkpoint, trainer.num_training_batches)
        if trainer.optimizers:  # a resume with another optimizer is then refused up front
            checkpoint["drpo_optimizer"] = optimizer_name(trainer.optimizers[0])
    # The KL reference is the frozen initial policy, reloaded from model_name_or_path: not worth a second
    # copy of the model in every checkpoint, and a resume may turn the KL term on or off.
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("reference.")}


def load_state(module, checkpoint: dict[str, Any]) -> None:
    counters = checkpoint.get("drpo_counters", {})
    module.skipped_updates = int(counters.get("skipped_updates", 0))
    module._consecutive_skips = int(counters.get("consecutive_skips", 0))
    module.initial_val_accuracy = counters.get("initial_val_accuracy")
    module._rng_to_restore = checkpoint.get("drpo_rng_states")
    module._rollout_to_restore = checkpoint.get("drpo_rollout")
    objective_state = checkpoint.get("drpo_objective", {})
    module.objective.load_state_dict(objective_state)
    restored = module.objective.state_dict() if objective_state else {}
    if restored:
        # not silent: the config's value (e.g. DRPO's delta) is only where the adaptation started
        rank_zero_only(print)(f"drpo: the objective continues from the checkpoint's state {restored}",
                              file=sys.stderr)
    _check_adapter_weights(module, checkpoint)
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):  # the reference is never restored from a checkpoint (see save_state)
        state = {k: v for k, v in state.items() if not k.startswith("reference.")}
        if module.reference is not None:
            state.update({f"reference.{k}": v for k, v in module.reference.state_dict().items()})
        checkpoint["state_dict"] = state


def restore_rng(module) -> None:
    """Apply the checkpoint's RNG states right before the first resumed step, so nothing that runs between
    loading and training (model set-up, moving to the device) consumes them."""
    states = getattr(module, "_rng_to_restore", None)
    if states:
        from drpo_lightning.checkpoint import restore_rng_states

        restore_rng_states(states, module.trainer)
    module._rng_to_restore = None


# -- adapter (LoRA) checkpoints: trainable weights + optimizer state only -------------------------------
def _trainable_keys(module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _keep_only_adapter_weights(module, checkpoint: dict[str, Any]) -> None:
    """With ``model.lora`` drop the frozen (possibly quantized) base weights from the checkpoint: they
    are reloaded from ``model_name_or_path`` on resume (``strict_loading`` is off for that). The
    ``quantization``/``lora`` hyperparameters are stored as plain dicts, which ``torch.load`` with
    ``weights_only=True`` (Lightning's default on resume) accepts; the module takes either form."""
    hparams = checkpoint.get("hyper_parameters")
    for key in ("quantization", "lora"):
        if isinstance(hparams, dict) and dataclasses.is_dataclass(hparams.get(key)):
            hparams[key] = dataclasses.asdict(hparams[key])
    if module.hparams.lora is None or module.policy is None or "state_dict" not in checkpoint:
        return
    keep = _trainable_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def _check_adapter_weights(module, checkpoint: dict[str, Any]) -> None:
    """Non-strict loading must not hide missing adapters: every trainable weight must be there."""
    if module.hparams.lora is None or module.policy is None or "state_dict" not in checkpoint:
        return
    missing = sorted(_trainable_keys(module) - set(checkpoint["state_dict"]))
    if missing:
        raise ConfigError(
            f"the checkpoint lacks {len(missing)} adapter weights of this model.lora setting (e.g. "
            f"{missing[0]}): it was saved with other model.lora or model.model_name_or_path values"
        )


# -- export -------------------------------------------------------------------------------------------
def export(module) -> None:
    """Write the trained policy (and tokenizer) to ``export_dir`` (default ``<log_dir>/export``)."""
    h, trainer = module.hparams, module.trainer
    if h.export_dir == "":
        return
    target = h.export_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / "export")
    from drpo_lightning.distributed import full_state_dict, is_sharded, save_pretrained_full

    if is_sharded(module.policy):
        # FSDP / FSDP2: gather the full weights (a collective on every rank), write them from rank 0.
        state_dict = full_state_dict(trainer.strategy.model, prefix="policy.")
        if trainer.is_global_zero:
            save_pretrained_full(module.policy, target, state_dict)
            module.tokenizer.save_pretrained(target)
            from drpo_lightning.models import follow_umask

            follow_umask(target)  # safetensors writes 0600 files
            module.print(f"exported the trained policy to {target}")
        module.export_path = target
        trainer.strategy.barrier("drpo-export")
        return
    if trainer.is_global_zero:
        from drpo_lightning.models import export_policy

        export_policy(module.policy, target, merge_adapters=h.merge_adapters_on_export,
                      base_path=module.model_path, trust_remote_code=h.trust_remote_code,
                      model_kwargs=h.model_kwargs)
        module.tokenizer.save_pretrained(target)
        module.print(f"exported the trained policy to {target}")
    module.export_path = target
