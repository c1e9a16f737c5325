"""The ``worker`` rollout plugin: sample in a rollout worker process, k batches ahead of the trainer.

It wraps an ordinary engine config, so the engine itself needs no change::

    rollout:
      class_path: worker
      init_args:
        engine: {class_path: hf, init_args: {max_new_tokens: 5}}
        max_staleness: 1
        device: cpu

The trainer (:class:`~drpo_lightning.module.RLModule`) sees :meth:`WorkerRollout.worker_options` and feeds
its batches from a :class:`~drpo_lightning.rollouts.worker.WorkerRolloutSource` instead of sampling itself.
Validation still samples in-process, with the wrapped engine and the trainer's current weights.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from drpo_lightning.errors import ConfigError
from drpo_lightning.rollouts.base import RolloutEngine
from drpo_lightning.types import RolloutBatch


def engine_settings(engine: RolloutEngine) -> dict[str, Any]:
    """The constructor arguments that rebuild ``engine`` in another process, read back from the instance
    (its attributes, or its ``sampling`` parameters): the worker builds the same engine from plain values."""
    sampling = getattr(engine, "sampling", None)
    settings: dict[str, Any] = {}
    for name, param in inspect.signature(type(engine).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        for owner in (engine, sampling):
            if owner is not None and name in getattr(owner, "__dict__", {}):
                settings[name] = getattr(owner, name)
                break
        else:
            raise ConfigError(f"rollout.init_args.engine: {type(engine).__name__} does not keep its {name!r} "
                              "setting as an attribute, so a rollout worker cannot rebuild it")
    return settings


class WorkerRollout(RolloutEngine):
    """Sample completions in a separate rollout worker process with bounded staleness.

    Batch t is sampled with the weights after update max(0, t - ``max_staleness``) (a fixed schedule: seeded
    runs are reproducible at any k); with k >= 1 the worker samples the next batches while the trainer trains
    on the current one, and the trust region of the objective absorbs the lag. The first k training steps only
    fill the pipeline (no update), and the last k prompt batches are sampled but never trained on.

    Args:
        engine: the engine the worker runs (default ``hf``), e.g. ``{class_path: hf, init_args:
            {max_new_tokens: 5}}``. Validation samples with it in the trainer's process.
        max_staleness: k, in trained batches (0: synchronous; the worker still samples, in its own process).
        device: where the worker samples (``cpu``, ``cuda:1``).
        timeout: seconds any single wait for a batch or a weight sync may take before the run stops with one
            line naming the worker.
        start_timeout: seconds the worker may take to start and load its model (None: ``timeout``).
        threads: torch CPU threads of the worker (None: torch's default).
        trainer_threads: torch CPU threads of the trainer process while the worker runs (None: unchanged). With
            the worker on the same CPU, give each its own cores: threads + trainer_threads <= cores (more
            threads than cores make both wait on each other).
        spawn: start the worker as a child process; false waits for one started by hand with ``drpo
            rollout-worker --trainer HOST:PORT`` (same ``DRPO_ROLLOUT_WORKER_KEY`` on both sides).
        host: address the trainer listens on for its worker.
        port: port the trainer listens on (0: any free port; give one for a worker started by hand).
        log_path: file the spawned worker's output goes to (default: a temporary file).
    """

    def __init__(
        self,
        engine: RolloutEngine | None = None,
        max_staleness: int = 1,
        device: str = "cpu",
        timeout: float = 120.0,
        start_timeout: float | None = None,
        threads: int | None = None,
        trainer_threads: int | None = None,
        spawn: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | None = None,
    ) -> None:
        from drpo_lightning.registry import ROLLOUTS

        if engine is None:
            engine = ROLLOUTS.get("hf")()
        if isinstance(engine, WorkerRollout):
            raise ConfigError("rollout.init_args.engine: a worker cannot run another worker; name the engine "
                              "it runs (e.g. class_path: hf)")
        name = ROLLOUTS.name_of(type(engine))
        if name is None:
            raise ConfigError(f"rollout.init_args.engine: {type(engine).__name__} is not a registered rollout "
                              f"plugin, so a worker cannot build it; registered: {ROLLOUTS.describe()}")
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
            raise ConfigError(f"rollout.init_args.max_staleness must be an integer >= 0, got {max_staleness!r}")
        for key, value in (("threads", threads), ("trainer_threads", trainer_threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"rollout.init_args.{key} must be an integer >= 1 or null, got {value!r}")
        for key, value in (("timeout", timeout), ("start_timeout", start_timeout)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"rollout.init_args.{key} must be a finite number of seconds > 0, got {value!r}")
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"rollout.init_args.device: {device!r} is not a device ({err})") from err
        self.engine = engine
        self.engine_name = name
        self.engine_settings = engine_settings(engine)
        self.max_staleness = max_staleness
        self.device = str(device)
        self.timeout = float(timeout)
        self.start_timeout = start_timeout
        self.threads = threads
        self.trainer_threads = trainer_threads
        self.spawn = spawn
        self.host = host
        self.port = int(port)
        self.log_path = log_path

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        return self.engine.max_new_tokens

    @property
    def sampling(self):
        return getattr(self.engine, "sampling", None)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks: the engine's own settings (``temperature``,
        # ``precision``) read by the trainer.
        if name == "engine" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.engine, name)

    def worker_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~drpo_lightning.rollouts.worker.WorkerRolloutSource` (the trainer adds
        the weights, the model folder, the seed, the token ids and the ranks)."""
        return {"engine": dict(self.engine_settings), "engine_name": self.engine_name,
                "max_staleness": self.max_staleness, "device": self.device, "timeout": self.timeout,
                "start_timeout": self.start_timeout, "threads": self.threads,
                "trainer_threads": self.trainer_threads, "spawn": self.spawn,
                "host": self.host, "port": self.port, "log_path": self.log_path}

    def generate(self, policy, prompt_ids, prompt_mask, *, num_generations, eos_token_id, pad_token_id,
                 topk: int = 0) -> RolloutBatch:
        """In-process sampling with the wrapped engine (validation); training batches come from the worker."""
        return self.engine.generate(policy, prompt_ids, prompt_mask, num_generations=num_generations,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, topk=topk)

    def __repr__(self) -> str:
        return f"WorkerRollout(engine={self.engine!r}, max_staleness={self.max_staleness}, device={self.device!r})"
