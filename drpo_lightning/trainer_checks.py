"""Checks of the Trainer arguments that Lightning rejects obscurely, or accepts and then ignores, for RLModule.

``drpo`` calls :func:`check_trainer` with the keyword arguments the ``Trainer`` is about to get, before it is
built (and before any model weights load), so each mistake ends in one line naming the key.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from drpo_lightning.errors import ConfigError

GPU_HINT = "this config needs GPUs; for CPU use configs/quickstart.yaml or --trainer.accelerator cpu"


def check_trainer(trainer: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for Trainer arguments that cannot work with RLModule on this machine.

    - ``accumulate_grad_batches`` / ``gradient_clip_val``: Lightning's automatic accumulation and clipping do not
      exist under manual optimisation (RLModule's); the model options that do the same are named.
    - ``devices: -1`` ("every GPU") on the CPU.
    - a GPU accelerator (``gpu``, ``cuda``) or FSDP (``FSDPStrategy``, CUDA only) on a machine without a GPU.

    ``precision: bf16-mixed`` (or another half precision) with ``accelerator: auto`` on a machine without a GPU
    only warns: Lightning runs it on the CPU, slowly but correctly.
    """
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate is not None and accumulate != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches: {accumulate} is not supported: RLModule optimises manually (one "
            "update per minibatch), so Lightning would not accumulate; use model.micro_batch_size (completions "
            "per forward/backward, accumulated into one update) or fewer model.num_minibatches"
        )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip > 0:
        raise ConfigError(
            f"trainer.gradient_clip_val: {clip} is not supported: RLModule optimises manually and clips each "
            "update itself; use model.max_grad_norm (default 1.0)"
        )

    accelerator = _accelerator_name(trainer.get("accelerator", "auto"))
    strategy = trainer.get("strategy", "auto")
    cuda, gpu = _cuda_available(), _cuda_available() or _mps_available()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu)
    if accelerator in ("gpu", "cuda") and not (cuda if accelerator == "cuda" else gpu):
        raise ConfigError(f"trainer.accelerator: {accelerator} but this machine has no GPU; {GPU_HINT}")
    if _is_fsdp1(strategy) and not cuda:
        raise ConfigError(
            f"trainer.strategy: {_strategy_name(strategy)} (FSDP) runs on CUDA GPUs only and this machine has "
            f"none; {GPU_HINT} --trainer.strategy auto"
        )
    devices = trainer.get("devices", "auto")
    if on_cpu and str(devices).strip() == "-1":
        where = "trainer.accelerator cpu" if accelerator == "cpu" else f"no GPU here ({GPU_HINT})"
        raise ConfigError(
            f"trainer.devices: -1 means every GPU, but the run is on the CPU ({where}); give a number of CPU "
            "processes, e.g. --trainer.devices 1"
        )
    precision = str(trainer.get("precision") or "")
    if accelerator == "auto" and not gpu and precision.startswith(("bf16", "16")):
        rank_zero_warn(
            f"trainer.precision: {precision} with trainer.accelerator auto: there is no GPU, so this runs on "
            f"the CPU (slowly); {GPU_HINT}",
            category=UserWarning,
        )


def _accelerator_name(accelerator: Any) -> str:
    """``cpu``, ``gpu``, ``cuda``, ``mps``, ``auto``, ...: the name of a string or an Accelerator instance."""
    if accelerator is None:
        return "auto"
    if isinstance(accelerator, str):
        return accelerator.strip().lower()
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator

    for cls, name in ((CUDAAccelerator, "cuda"), (CPUAccelerator, "cpu"), (MPSAccelerator, "mps")):
        if isinstance(accelerator, cls):
            return name
    return type(accelerator).__name__


def _strategy_name(strategy: Any) -> str:
    return strategy if isinstance(strategy, str) else type(strategy).__name__


def _is_fsdp1(strategy: Any) -> bool:
    """Lightning's ``FSDPStrategy`` (``fsdp``, ``fsdp_cpu_offload``); FSDP2 (``ModelParallelStrategy``) runs on
    CPU and is not one."""
    if isinstance(strategy, str):
        return strategy.strip().lower().startswith("fsdp")
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
