"""RLModule: one RL step = rollout -> rewards -> advantages -> several objective updates.

This file is the loop of design.md §2 and nothing else: every decision that varies between algorithms
lives in a plugin passed to the constructor (objective, rollout engine, reward functions, advantage
estimator), so swapping DRPO for PPO is one YAML key. Rollouts come from a rollout source
(:mod:`drpo_lightning.loop.feed`: in-process, or a worker process k batches ahead); configuration checks,
checkpoint state and export live in :mod:`drpo_lightning.loop`.

Manual optimisation: a batch of B prompts yields N = B * G completions, reused for ``ppo_epochs`` passes of
``num_minibatches`` optimizer updates each. That reuse (staleness) and the rollout/training numerical gap
(``rollout.precision``) are the off-policy gap the DRPO/DPPO trust region controls.

Note on step counting: with manual optimisation Lightning's ``global_step`` (and so ``trainer.max_steps``,
checkpoint ``every_n_train_steps``, the x-axis of logs) counts *optimizer updates*:
``ppo_epochs * num_minibatches`` per batch of prompts.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from drpo_lightning.advantages.base import AdvantageEstimator
from drpo_lightning.kl import kl_penalty
from drpo_lightning.loop import checks, pieces, state
from drpo_lightning.loop.feed import RolloutFeed
from drpo_lightning.loop.optim import optimizer_update
from drpo_lightning.models import LoRA, Quantization
from drpo_lightning.objectives.base import Objective, aggregate
from drpo_lightning.registry import ADVANTAGES, OBJECTIVES, REWARDS, ROLLOUTS
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rollouts.base import RolloutEngine
from drpo_lightning.types import RolloutBatch


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW at lr 1e-6, a safe starting point for RL on a pretrained LLM."""
    return torch.optim.AdamW(params, lr=1e-6)


class RLModule(pl.LightningModule):
    """RL post-training of a causal LM with a pluggable objective.

    Args:
        model_name_or_path: a local Hugging Face model folder, or ``quickstart`` for the tiny arithmetic
            policy shipped with drpo-lightning. Nothing is downloaded.
        objective: the policy loss (``drpo``, ``dppo``, ``ppo`` or any installed plugin). Default DRPO.
        rollout: the rollout engine sampling completions (default ``hf``: transformers ``generate``; ``worker``
            samples in a separate process, ``max_staleness`` batches ahead of the trainer). Its sampling
            temperature (``rollout.temperature`` or ``rollout.sampling.temperature``) is part of the rollout
            contract: the training forward uses it; without one, 1 is assumed with a warning.
        rewards: reward functions; their weighted sum is the reward of a completion. Default exact match.
        reward_weights: one weight per reward function (default 1 each).
        advantage: advantage estimator (default ``grpo``: group-normalised).
        num_generations: completions sampled per prompt (the group size G). Estimators that compare the
            completions of a prompt (``grpo``, ``dr_grpo``, ``rloo``: ``min_group_size`` 2) refuse 1;
            ``reinforce_pp`` takes 1 (baseline 0).
        ppo_epochs: passes over each rollout.
        num_minibatches: optimizer updates per pass; the B*G completions are split evenly.
        micro_batch_size: completions per forward/backward within a minibatch (gradient accumulation);
            None processes the whole minibatch at once.
        anchor: trust-region anchor: ``behavior`` (log-probs the rollout engine reported while sampling; the
            DRPO/DPPO choice) or ``recompute`` (pi_old from a no-grad training forward before the first
            update; the classic PPO choice).
        tis_cap: with ``anchor: recompute``, truncated importance sampling: weight each token by
            min(pi_old/mu, tis_cap) to correct for the rollout/training mismatch. None turns it off.
        kl_beta: weight of the KL penalty to the reference (initial) policy; 0 loads no reference model.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (see :mod:`drpo_lightning.kl`). As a *loss* on tokens sampled
            from the policy, k3 (default) has the gradient of KL(ref || pi) in expectation and k2 that of
            KL(pi || ref); k1's gradient is zero in expectation (noise only), so k1 with ``kl_beta > 0``
            does not regularise and warns.
        entropy_coef: weight of an entropy bonus (0 computes entropy for the metric only).
        max_grad_norm: clip the gradient norm to this value before each update; None disables clipping.
        max_consecutive_skips: an update whose loss or gradient is not finite is skipped (counted in
            ``train/skipped_updates``); after this many in a row the run stops with an error.
        reward_on_error: what a reward function that raises, times out or returns NaN/None does: ``raise``
            stops with the plugin name and sample; ``fallback`` scores that sample ``reward_fallback`` and
            counts it in ``reward/fallbacks``.
        reward_fallback: the reward used by ``reward_on_error: fallback``.
        reward_timeout: seconds a reward function may take per call; None waits forever.
        chat_template: apply the tokenizer's chat template to prompts (None: when the tokenizer has one);
            linked from ``data.chat_template`` by the CLI.
        system_prompt: system message put before each prompt; linked from ``data.system_prompt``.
        max_prompt_length: longest prompt in tokens; None: the model's context minus ``max_new_tokens``.
        val_num_samples: completions per held-out prompt (k of mean@k and pass@k).
        val_success_threshold: a held-out completion counts as correct when its total reward >= this.
        val_rollout: the engine held-out prompts are sampled with (e.g. ``{class_path: hf, init_args:
            {precision: fp32, ...}}``), so runs whose training rollouts differ (fp8, bf16) are scored alike;
            None: the training rollout engine (a worker's engine, in the trainer's process).
        logprob_chunk_size: tokens per chunk of the memory-lean log-prob computation.
        lean_logprobs: compute log-probs from hidden states in chunks (never the full [N, T, V] logits).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% more time).
        disable_dropout: set every dropout probability of the policy to 0 (as TRL does by default).
        trust_remote_code: allow model folders with custom code. Off unless you trust the folder.
        model_kwargs: extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``.
        quantization: load the frozen base weights in 4-bit (NF4/FP4) or 8-bit with bitsandbytes, e.g.
            ``{bits: 4}``; needs ``lora``. None: full precision. See :class:`drpo_lightning.models.Quantization`.
        lora: train LoRA adapters (peft) instead of all weights, e.g. ``{r: 16, target_modules: all-linear}``;
            the KL reference is then the same model with adapters disabled (no second copy) and checkpoints
            hold only the adapters and optimizer state. See :class:`drpo_lightning.models.LoRA`.
        merge_adapters_on_export: with ``lora``, export a plain model with the adapters merged into a fresh
            full-precision copy of the base instead of the adapter folder.
        export_dir: where the final policy is written with ``save_pretrained`` (default
            ``<log_dir>/export``); empty string disables export.
        optimizer: optimizer factory, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-6}}``.
        lr_scheduler: optional scheduler factory; stepped once per optimizer update.
    """

    def __init__(
        self,
        model_name_or_path: str = "quickstart",
        objective: Objective | None = None,
        rollout: RolloutEngine | None = None,
        rewards: list[RewardFunction] | None = None,
        reward_weights: list[float] | None = None,
        advantage: AdvantageEstimator | None = None,
        num_generations: int = 8,
        ppo_epochs: int = 1,
        num_minibatches: int = 1,
        micro_batch_size: int | None = None,
        anchor: Literal["behavior", "recompute"] = "behavior",
        tis_cap: float | None = None,
        kl_beta: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        entropy_coef: float = 0.0,
        max_grad_norm: float | None = 1.0,
        max_consecutive_skips: int = 5,
        reward_on_error: Literal["raise", "fallback"] = "raise",
        reward_fallback: float = 0.0,
        reward_timeout: float | None = None,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        max_prompt_length: int | None = None,
        val_num_samples: int = 1,
        val_success_threshold: float = 1.0,
        val_rollout: RolloutEngine | None = None,
        logprob_chunk_size: int = 1024,
        lean_logprobs: bool = True,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        quantization: Quantization | None = None,
        lora: LoRA | None = None,
        merge_adapters_on_export: bool = False,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["objective", "rollout", "val_rollout", "rewards", "advantage", "optimizer",
                                          "lr_scheduler"])
        self.automatic_optimization = False
        # Defaults by registered name: the loop knows no concrete plugin.
        self.objective = objective if objective is not None else OBJECTIVES.get("drpo")()
        self.rollout = rollout if rollout is not None else ROLLOUTS.get("hf")()
        self.val_rollout = val_rollout
        self.rewards = list(rewards) if rewards else [REWARDS.get("exact_match")()]
        self.reward_weights = reward_weights
        self.advantage = advantage if advantage is not None else ADVANTAGES.get("grpo")()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        checks.check_config(self)
        self.strict_loading = lora is None  # adapter checkpoints omit the frozen base weights
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.tokenizer = None
        self.val_accuracy = MeanMetric()
        self.val_pass_at_k = MeanMetric()
        self.val_reward = MeanMetric()
        self._consecutive_skips = 0
        self.skipped_updates = 0
        self.initial_val_accuracy: float | None = None
        self.feed: RolloutFeed | None = None

    @property
    def model_path(self) -> str:
        from drpo_lightning.tiny import shipped_policy_path

        return shipped_policy_path(self.hparams.model_name_or_path) or self.hparams.model_name_or_path

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from transformers import AutoTokenizer

        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, local_files_only=True, trust_remote_code=self.hparams.trust_remote_code
            )
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "batch_size"):
            checks.check_sizes(self, int(datamodule.batch_size))  # prompts per rank per step
        if stage == "fit":
            checks.check_topk(self)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        from drpo_lightning.models import load_policy, load_reference

        h = self.hparams
        self.policy = load_policy(
            self.model_path,
            trust_remote_code=h.trust_remote_code,
            model_kwargs=h.model_kwargs,
            gradient_checkpointing=h.gradient_checkpointing,
            no_dropout=h.disable_dropout,
            quantization=h.quantization,
            lora=h.lora,
        )
        if h.kl_beta > 0:
            self.reference = load_reference(
                self.policy, self.model_path, trust_remote_code=h.trust_remote_code, model_kwargs=h.model_kwargs
            )
        if self.device_mesh is not None:
            pieces.shard_fsdp2(self)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    # -- pieces of a step -----------------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return pieces.encode_prompts(self, prompts)

    def _max_prompt_length(self) -> int | None:
        if self.hparams.max_prompt_length is not None:
            return self.hparams.max_prompt_length
        context = getattr(getattr(self.policy, "config", None), "max_position_embeddings", None)
        return None if context is None else int(context) - int(self.rollout.max_new_tokens)

    def _generate(self, prompt_ids, prompt_mask, num_generations: int, topk: int = 0,
                  engine: RolloutEngine | None = None) -> RolloutBatch:
        from drpo_lightning.distributed import call_through, gathered_once, unwrap

        # Through the (possibly FSDP-sharded) policy's forward, so its parameters are gathered for generate,
        # once per rollout (FSDP2), not once per generated token.
        with gathered_once(self.policy):
            engine = engine if engine is not None else self.rollout
            return call_through(self.policy, engine.generate, unwrap(self.policy), prompt_ids, prompt_mask,
                                num_generations=num_generations, eos_token_id=self.tokenizer.eos_token_id,
                                pad_token_id=self.tokenizer.pad_token_id, topk=topk)

    def _score(self, batch: dict[str, list], rollout: RolloutBatch, num_generations: int):
        return pieces.score(self, batch, rollout, num_generations)

    def _token_stats(self, model, rollout: RolloutBatch, rows: torch.Tensor, with_topk: bool):
        from drpo_lightning.distributed import call_through, unwrap
        from drpo_lightning.logprobs import policy_token_stats

        input_ids = torch.cat([rollout.prompt_ids[rows], rollout.completion_ids[rows]], dim=1)  # [n, P+T]
        attention = torch.cat([rollout.prompt_mask[rows], rollout.completion_mask[rows].long()], dim=1)
        # Through the model's forward: an FSDP-sharded model gathers its parameters (and registers its
        # gradient hooks) around the lean path, which runs the decoder body and uses the head weight directly.
        return call_through(
            model,
            policy_token_stats,
            unwrap(model),
            input_ids,
            attention,
            rollout.prompt_ids.shape[1],
            temperature=self._rollout_temperature(),
            chunk_size=self.hparams.logprob_chunk_size,
            extra_ids=rollout.topk_ids[rows] if with_topk and rollout.topk_ids is not None else None,
            lean=self.hparams.lean_logprobs,
        )

    def _rollout_temperature(self) -> float:
        """The temperature the rollout sampled at (part of the rollout contract; see :mod:`loop.pieces`)."""
        return pieces.rollout_temperature(self)

    def _micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        size = self.hparams.micro_batch_size or rows.numel()
        return list(rows.split(size))

    @torch.no_grad()
    def _anchor_logprobs(self, rollout: RolloutBatch) -> torch.Tensor:
        if self.hparams.anchor == "behavior":
            return rollout.behavior_logprobs
        rows = torch.arange(rollout.completion_ids.shape[0], device=self.device)
        parts = [self._token_stats(self.policy, rollout, r, False).logprobs for r in self._micro_batches(rows)]
        return torch.cat(parts).float() * rollout.completion_mask

    @torch.no_grad()
    def _reference_logprobs(self, rollout: RolloutBatch) -> torch.Tensor | None:
        if self.hparams.kl_beta == 0:
            return None
        rows = torch.arange(rollout.completion_ids.shape[0], device=self.device)
        if self.reference is not None:
            parts = [self._token_stats(self.reference, rollout, r, False).logprobs for r in self._micro_batches(rows)]
        else:
            with self.policy.disable_adapter():
                parts = [self._token_stats(self.policy, rollout, r, False).logprobs for r in self._micro_batches(rows)]
        return torch.cat(parts).float()

    def _reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.to(self.device), reduce_op="sum").cpu()

    def _global_count(self, mask: torch.Tensor) -> torch.Tensor:
        """The minibatch's aggregation denominator summed over ranks, divided by the world size because
        DDP/FSDP average gradients: each rank's loss is then its share of the *global* normalised loss."""
        count = self.objective.count(mask).float()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return count / world

    # -- the loop -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        h = self.hparams
        step_start = time.perf_counter()
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        G = h.num_generations

        # 1. rollout: this step's prompts go to the source; train on the rollout of the batch k steps older
        taken = self.feed.take(batch)
        if taken is None:
            return  # the first k steps of a worker with max_staleness k only fill its pipeline
        batch, rollout = taken
        rollout_seconds = time.perf_counter() - step_start
        mask = rollout.completion_mask.float()  # [N, T]

        # 2. rewards, 3. advantages
        scored = self._score(batch, rollout, G)
        rewards = scored.total.to(self.device)  # [N]
        extra = {"lengths": mask.sum(-1)} if getattr(self.advantage, "uses_lengths", False) else {}
        advantages = self.advantage(rewards, rollout.group_ids.to(self.device), **extra)  # [N]

        anchor = self._anchor_logprobs(rollout)  # [N, T]
        token_advantages = advantages.unsqueeze(-1).expand_as(mask)  # [N, T]
        if h.tis_cap is not None:
            # Truncated importance sampling: the anchor pi_old is not the sampler mu.
            tis = (anchor - rollout.behavior_logprobs).clamp(max=math.log(h.tis_cap)).exp()
            token_advantages = token_advantages * tis
        ref_logprobs = self._reference_logprobs(rollout)

        # 4. updates
        metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        n = mask.shape[0]
        generator = torch.Generator().manual_seed(int(self.global_step) * 7919 + int(self.current_epoch))
        extras_needed = getattr(self.objective, "requires_topk", 0) > 0
        gaps: list[torch.Tensor] | None = []  # |log pi - log mu| of the first minibatch, before any update
        for _ in range(h.ppo_epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for rows in order.chunk(h.num_minibatches):
                global_count = self._global_count(mask[rows])
                step_loss = torch.zeros((), device=self.device)
                for micro in self._micro_batches(rows):
                    stats = self._token_stats(self.policy, rollout, micro, extras_needed)
                    extras = {}
                    if extras_needed:
                        extras = {
                            "topk_logprobs": stats.extra_logprobs,
                            "old_topk_logprobs": rollout.topk_logprobs[micro],
                            "topk_ids": rollout.topk_ids[micro],
                            "token_ids": rollout.completion_ids[micro],
                        }
                    out = self.objective(
                        logprobs=stats.logprobs,
                        old_logprobs=anchor[micro],
                        advantages=token_advantages[micro],
                        mask=mask[micro],
                        global_count=global_count,
                        **extras,
                    )
                    loss = out.loss
                    if gaps is not None:
                        gaps.append(pieces.token_gaps(stats.logprobs, rollout.behavior_logprobs[micro]))
                    if ref_logprobs is not None:
                        kl = kl_penalty(stats.logprobs, ref_logprobs[micro], h.kl_estimator)
                        kl_loss = aggregate(kl, mask[micro], self.objective.loss_agg_mode,
                                            global_count=global_count, horizon=self.objective.loss_agg_horizon)
                        loss = loss + h.kl_beta * kl_loss
                        metrics["kl_ref"].append(aggregate(kl.detach(), mask[micro], "token-mean"))
                    if stats.entropy is not None:
                        entropy = aggregate(stats.entropy, mask[micro], "token-mean")
                        metrics["entropy"].append(entropy.detach())
                        if h.entropy_coef:
                            loss = loss - h.entropy_coef * aggregate(
                                stats.entropy, mask[micro], self.objective.loss_agg_mode,
                                global_count=global_count, horizon=self.objective.loss_agg_horizon)
                    for key, value in out.metrics.items():
                        metrics[key].append(value)
                    self.manual_backward(loss)
                    step_loss = step_loss + loss.detach()
                if gaps is not None:
                    metrics.update(pieces.mismatch_metrics(gaps, mask[rows]))
                    gaps = None
                self._optimizer_update(optimizer, scheduler, step_loss, metrics)
        for key, value in self.objective.end_rollout(self._reduce_sum).items():
            metrics[key].append(value)

        self.feed.sync()  # the source samples the coming batches with the new weights

        # 5. metrics
        step_seconds = time.perf_counter() - step_start
        self._log_step(rollout, scored, rewards, advantages, metrics, rollout_seconds, step_seconds)

    def _optimizer_update(self, optimizer, scheduler, loss: torch.Tensor, metrics) -> None:
        optimizer_update(self, optimizer, scheduler, loss, metrics)

    def _log_step(self, rollout, scored, rewards, advantages, metrics, rollout_seconds, step_seconds) -> None:
        pieces.log_step(self, rollout, scored, rewards, advantages, metrics, rollout_seconds, step_seconds)

    # -- validation -----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        k = self.hparams.val_num_samples
        prompt_ids, prompt_mask = self._encode_prompts(batch["prompt"])
        # Validation samples from a fork of the RNG: it does not move the training sampling stream, so a run
        # resumed from a checkpoint (which skips the validation that ran right after it) continues exactly.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            rollout = self._generate(prompt_ids, prompt_mask, k, engine=self.val_rollout)
        scored = self._score(batch, rollout, k)
        correct = (scored.total >= self.hparams.val_success_threshold).float().view(-1, k)  # [B, k]
        self.val_accuracy.update(correct.mean(-1))
        self.val_pass_at_k.update(correct.max(-1).values)
        self.val_reward.update(scored.total.float())

    def on_validation_epoch_end(self) -> None:
        k = self.hparams.val_num_samples
        accuracy = self.val_accuracy.compute()
        if self.trainer.sanity_checking:
            # Lightning does not log during the sanity check; keep it as the "before" number.
            self.initial_val_accuracy = float(accuracy)
            self.print(f"held-out accuracy before training (mean@{k}): {float(accuracy):.3f}")
        else:
            self.log("val/accuracy", accuracy, prog_bar=True)
            self.log(f"val/mean@{k}", accuracy)
            self.log(f"val/pass@{k}", self.val_pass_at_k.compute())
            self.log("val/reward", self.val_reward.compute())
        self.val_accuracy.reset()
        self.val_pass_at_k.reset()
        self.val_reward.reset()

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        k = self.hparams.val_num_samples
        self.log("test/accuracy", self.val_accuracy.compute())
        self.log(f"test/pass@{k}", self.val_pass_at_k.compute())
        self.log("test/reward", self.val_reward.compute())
        self.val_accuracy.reset()
        self.val_pass_at_k.reset()
        self.val_reward.reset()

    # -- checkpoint, resume, rollout source, export (see loop/state.py and loop/feed.py) ---------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state.save_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state.load_state(self, checkpoint)

    def on_train_start(self) -> None:
        state.restore_rng(self)
        # After the RNG restore: the in-process source samples from the trainer's RNG stream.
        self.feed = RolloutFeed(self)
        self.feed.open(getattr(self, "_rollout_to_restore", None))
        self._rollout_to_restore = None

    def on_train_end(self) -> None:
        if self.feed is not None:
            self.feed.close()

    def teardown(self, stage: str) -> None:
        if self.feed is not None:  # also after an exception: the worker must not outlive the run
            self.feed.close()

    def on_fit_end(self) -> None:
        state.export(self)
