"""Lightning callback that ``scripts/gpu_check.py`` adds to each ``drpo fit`` it runs (by class path, in an
override config): the end time of every step, what the step trained, and the process's peak memory.

Everything is measured from outside the product's code: the step-end stamps are the benchmark's method
(``benchmarks/bench_vs_trl.py``: wall time between the ends of consecutive steps, CUDA synchronised first), the
token counts come from the step's prompts and the logged ``completion/length_mean``, and the peak memory is
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the trainer process (a rollout worker is a
process of its own and is not counted), or the resident high-water mark on a CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

LOGGED = ("completion/length_mean", "perf/step_s", "perf/rollout_s", "rollout/wait_s", "rollout/sync_s",
          "rollout/staleness_max")


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class StepProbe(pl.Callback):
    """Write ``{"steps": [...], "peak": {...}}`` to ``out`` when training ends.

    Args:
        out: JSON file to write.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.steps: list[dict] = []
        self._last_update = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self.steps, self._last_update = [], trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        trained = trainer.global_step != self._last_update  # False: an async step that only filled the pipeline
        self._last_update = trainer.global_step
        prompts = list(batch.get("prompt", [])) if isinstance(batch, dict) else []
        prompt_tokens = 0
        if prompts:  # the prompts' token count as the module tokenises them (chat template included)
            _, mask = pl_module._encode_prompts(prompts)
            prompt_tokens = int(mask.sum())
        metrics = trainer.callback_metrics
        self.steps.append({
            "t": now, "trained": trained, "updates": int(trainer.global_step), "prompts": len(prompts),
            "prompt_tokens": prompt_tokens, "num_generations": int(pl_module.hparams.num_generations),
            **{k: float(metrics[k]) for k in LOGGED if k in metrics and trained},
        })

    def on_train_end(self, trainer, pl_module) -> None:
        peak: dict[str, float | str | None] = {"rss_mib": _peak_rss_mib()}
        if torch.cuda.is_available():
            peak.update(cuda_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                        cuda_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                        device=torch.cuda.get_device_name())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({"steps": self.steps, "peak": peak}, indent=1))
