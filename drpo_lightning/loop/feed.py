"""Where the training loop's rollouts come from: a rollout source, consumed k batches behind the prompts.

At every training step the loop hands the step's prompt batch to the source and takes back the rollout of
the batch k steps older (k = ``max_staleness`` of a ``worker`` rollout, 0 otherwise). The first k steps of a
run only fill that pipeline. After each trained batch the new weights go to the source (:meth:`sync`). With
the in-process source (every rollout plugin that does not ask for a worker) this is exactly the old loop:
the prompts are sampled, with the trainer's own RNG stream, right when they are taken.

Checkpoints hold the policy version, the index of the next prompt batch and the prompts still in flight;
on resume those prompts are sampled again, from the restored weights (so a resume at k >= 1 is not bitwise
the uninterrupted run: its first k batches are fresher; every later batch is on the schedule again, with the
same seeds). At k = 0 nothing is in flight and a resume is exact.
"""

from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from typing import Any

import torch

from drpo_lightning.errors import ConfigError
from drpo_lightning.rollouts.staleness import batch_seed
from drpo_lightning.types import RolloutBatch


def worker_options(rollout) -> dict[str, Any] | None:
    """The worker settings of a rollout plugin that samples in a worker process (None: in-process)."""
    options = getattr(rollout, "worker_options", None)
    return options() if callable(options) else None


def weight_sync_backend(worker_device: str | torch.device, trainer_device: torch.device, world_size: int) -> str:
    """``nccl`` for one trainer process on a GPU feeding a worker on another GPU, ``gloo`` (weights staged
    through the CPU) otherwise: NCCL refuses two members of one group on the same GPU ("Duplicate GPU
    detected"), which a worker sharing the trainer's GPU, or several ranks' workers, would be."""
    if not torch.cuda.is_available():  # a CUDA worker then fails with its own message; no device to name here
        return "gloo"

    def indexed(device: str | torch.device) -> torch.device:  # "cuda" -> "cuda:<current>"
        device = torch.device(device)
        return torch.device("cuda", torch.cuda.current_device()) if device == torch.device("cuda") else device

    worker, trainer = indexed(worker_device), indexed(trainer_device)
    if worker.type == "cuda" and trainer.type == "cuda" and worker != trainer and world_size == 1:
        return "nccl"
    return "gloo"


class RolloutFeed:
    """The loop's side of a rollout source: submit the prompts of each step, take the rollout k steps older."""

    def __init__(self, module) -> None:
        self.module = module
        self.options = worker_options(module.rollout)
        self.k = int(self.options["max_staleness"]) if self.options else 0
        self.pending: deque[tuple[int, dict[str, list]]] = deque()  # (batch index, prompt batch) in flight
        self.next_index = 0  # run-wide index of the next prompt batch
        self.base = 0  # run-wide index of the source's batch 0 (sources count from 0)
        self.source = None
        self._threads_before: int | None = None  # the trainer's torch threads before trainer_threads
        self._layout: list | None = None  # names, dtypes, shapes of the full weights (sharded policies)

    # -- set-up -------------------------------------------------------------------------------------
    def open(self, restored: dict[str, Any] | None) -> None:
        """Start the source (all ranks at once: gathering the weights is a collective) and resubmit the
        prompts a checkpoint left in flight."""
        pending = list((restored or {}).get("pending", []))
        if len(pending) > self.k:
            raise ConfigError(
                f"model.rollout: the checkpoint has {len(pending)} prompt batches in flight (saved with "
                f"max_staleness {restored.get('max_staleness')}) and this run's rollout takes at most {self.k}: "
                f"resume with a worker rollout with max_staleness >= {len(pending)}"
            )
        self.next_index = int((restored or {}).get("next_index", 0))
        self.base = self.next_index - len(pending)
        module = self.module
        version = int(module.global_step)
        if self.options is None:
            from drpo_lightning.rollouts.worker import InProcessRolloutSource

            def generate(ids, mask, g, topk):  # looked up per call: profilers wrap module._generate
                return module._generate(ids, mask, g, topk=topk)

            self.source = InProcessRolloutSource(generate, version=version)
        else:
            self.source = self._open_worker(version)
        for index, batch in pending:
            self._submit(index, batch)

    def _open_worker(self, version: int):
        from drpo_lightning.rollouts.weight_sync import WeightSender
        from drpo_lightning.rollouts.worker import WorkerRolloutSource

        module, options = self.module, dict(self.options)
        trainer = module.trainer
        trainer_threads = options.pop("trainer_threads", None)
        if trainer_threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(int(trainer_threads))
        engine = dict(options.pop("engine"))
        precision = str(getattr(trainer, "precision", "32"))
        if engine.get("precision", 0) is None and precision.startswith(("bf16", "16")):
            # In the trainer a precision-less engine samples under the trainer's autocast; the worker has none.
            engine["precision"] = "bf16" if precision.startswith("bf16") else "fp16"
        backend = weight_sync_backend(options["device"], module.device, trainer.world_size)
        trainer_device = str(module.device) if backend == "nccl" else "cpu"
        world, rank = trainer.world_size, trainer.global_rank
        kwargs: dict[str, Any] = {}
        if world > 1:
            sender = None
            if rank == 0:
                sender = WeightSender(world, host=options["host"], timeout=options["timeout"], backend=backend,
                                      device=trainer_device, names=[f"rollout worker of rank {r}" for r in
                                                                    range(world)])
            address = trainer.strategy.broadcast(sender.address if sender is not None else None, src=0)
            kwargs = {"weight_sender": sender} if rank == 0 else {"join_group": (address, rank + 1, world + 1)}
            kwargs["name"] = f"rollout worker of rank {rank}"
            options["port"] = 0  # one listening port per rank
        return WorkerRolloutSource(
            engine, module.model_path, self._weights(), seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id,
            version=version, model_kwargs=module.hparams.model_kwargs, backend=backend,
            trainer_device=trainer_device, **options, **kwargs,
        )

    def _weights(self) -> dict[str, torch.Tensor]:
        """The policy's full weights under their Hugging Face names, on every rank (FSDP: one gather)."""
        from drpo_lightning.distributed import full_state_dict, is_sharded
        from drpo_lightning.rollouts.weight_sync import dtype_from_name, layout_of

        module = self.module
        if not is_sharded(module.policy):
            return {k: v.detach() for k, v in module.policy.state_dict().items()}
        trainer = module.trainer
        state = full_state_dict(trainer.strategy.model, prefix="policy.")
        if trainer.world_size > 1:
            # Only rank 0 gets the gathered tensors; the other ranks announce the same names, dtypes and shapes
            # to their workers (which receive rank 0's broadcast).
            if self._layout is None:
                self._layout = trainer.strategy.broadcast(layout_of(state), src=0)
            if trainer.global_rank != 0:
                state = {name: torch.empty(shape, dtype=dtype_from_name(dtype), device="meta")
                         for name, dtype, shape in self._layout}
        return state

    # -- the loop's calls ---------------------------------------------------------------------------
    def _submit(self, index: int, batch: dict[str, list]) -> None:
        module = self.module
        prompt_ids, prompt_mask = module._encode_prompts(batch["prompt"])
        seed = None if self.options is None else batch_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), index)
        self.source.submit(index - self.base, prompt_ids, prompt_mask, module.hparams.num_generations,
                           topk=getattr(module.objective, "requires_topk", 0), seed=seed)
        self.pending.append((index, batch))

    @contextmanager
    def _closing_on_error(self):
        # Lightning calls no module hook when a step raises: stop the worker here, not at interpreter exit.
        try:
            yield
        except BaseException:
            self.close()
            raise

    def take(self, batch: dict[str, list]) -> tuple[dict[str, list], RolloutBatch] | None:
        """Submit this step's prompts; the prompt batch and rollout to train on now (None while filling)."""
        with self._closing_on_error():
            self._submit(self.next_index, batch)
            self.next_index += 1
            if len(self.pending) <= self.k:
                return None
            index, prompts = self.pending.popleft()
            rollout = self.source.get(index - self.base)
        device = self.module.device
        return prompts, RolloutBatch(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in rollout))

    def sync(self) -> None:
        """The updates of a batch are done: the source gets the new weights (a worker: all ranks call)."""
        with self._closing_on_error():
            weights = None if self.options is None else self._weights()
            self.source.sync(weights, int(self.module.global_step))

    def metrics(self) -> dict[str, float]:
        return self.source.metrics() if self.source is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"policy_version": int(self.module.global_step), "next_index": self.next_index,
                "pending": [(i, dict(b)) for i, b in self.pending], "max_staleness": self.k}

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
