"""RLModule: one RL step = rollout -> rewards -> advantages -> several objective updates.

This file is the loop of design.md §2 and nothing else: every decision that varies between algorithms
lives in a plugin passed to the constructor (objective, rollout engine, reward functions, advantage
estimator), so swapping DRPO for PPO is one YAML key.

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
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import MeanMetric

from drpo_lightning.advantages.base import AdvantageEstimator
from drpo_lightning.checkpoint import settle_loop_position
from drpo_lightning.errors import ConfigError, UserError
from drpo_lightning.kl import KL_ESTIMATORS, kl_penalty
from drpo_lightning.models import LoRA, Quantization, check_adapter_packages
from drpo_lightning.objectives.base import Objective, aggregate
from drpo_lightning.resume import optimizer_name
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rollouts.base import RolloutEngine
from drpo_lightning.types import RolloutBatch

FLOAT32_MAX = torch.finfo(torch.float32).max


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW at lr 1e-6, a safe starting point for RL on a pretrained LLM."""
    return torch.optim.AdamW(params, lr=1e-6)


class RLModule(pl.LightningModule):
    """RL post-training of a causal LM with a pluggable objective.

    Args:
        model_name_or_path: a local Hugging Face model folder, or ``quickstart`` for the tiny arithmetic
            policy shipped with drpo-lightning. Nothing is downloaded.
        objective: the policy loss (``drpo``, ``dppo``, ``ppo`` or any installed plugin). Default DRPO.
        rollout: the rollout engine sampling completions (default ``hf``: transformers ``generate``). Its
            sampling temperature (``rollout.temperature`` or ``rollout.sampling.temperature``) is part of
            the rollout contract: the training forward uses it; without one, 1 is assumed with a warning.
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
        self.save_hyperparameters(ignore=["objective", "rollout", "rewards", "advantage", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        from drpo_lightning.advantages.grpo import GRPOAdvantage
        from drpo_lightning.objectives.drpo import DRPO
        from drpo_lightning.rewards.exact_match import ExactMatch
        from drpo_lightning.rollouts.hf import HFRollout

        self.objective = objective if objective is not None else DRPO()
        self.rollout = rollout if rollout is not None else HFRollout()
        self.rewards = list(rewards) if rewards else [ExactMatch()]
        self.reward_weights = reward_weights
        self.advantage = advantage if advantage is not None else GRPOAdvantage()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self._check_config()
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

    # -- configuration checks (cheap, before anything loads) -----------------------------------------
    def _check_config(self) -> None:
        h = self.hparams
        positive_ints = ("num_generations", "ppo_epochs", "num_minibatches", "val_num_samples",
                         "logprob_chunk_size", "max_consecutive_skips")
        for key in positive_ints:
            if h[key] is None or int(h[key]) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {h[key]}")
        if h.micro_batch_size is not None and h.micro_batch_size < 1:
            raise ConfigError(f"model.micro_batch_size must be >= 1 or null, got {h.micro_batch_size}")
        if h.anchor not in ("behavior", "recompute"):
            raise ConfigError(f"model.anchor must be 'behavior' or 'recompute', got {h.anchor!r}")
        if h.tis_cap is not None and h.anchor != "recompute":
            raise ConfigError("model.tis_cap corrects pi_old/mu and needs model.anchor: recompute")
        self._check_numbers()
        if h.tis_cap is not None and h.tis_cap <= 0:
            raise ConfigError(f"model.tis_cap must be > 0, got {h.tis_cap}")
        if h.kl_beta < 0:
            raise ConfigError(f"model.kl_beta must be >= 0, got {h.kl_beta}")
        if h.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"model.kl_estimator must be one of {KL_ESTIMATORS}, got {h.kl_estimator!r}")
        if h.kl_estimator == "k1" and h.kl_beta > 0:
            rank_zero_warn(
                "model.kl_estimator: k1 with model.kl_beta > 0 only adds noise: the gradient of k1 = log pi - "
                "log ref on tokens sampled from pi is zero in expectation, so it does not pull the policy toward "
                "the reference. Use k3 (gradient of KL(ref || pi)) or k2 (gradient of KL(pi || ref))",
                category=UserWarning,
            )
        if h.max_grad_norm is not None and h.max_grad_norm <= 0:
            raise ConfigError(f"model.max_grad_norm must be > 0 or null, got {h.max_grad_norm}")
        if h.reward_weights is not None and len(h.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"model.reward_weights has {len(h.reward_weights)} entries for {len(self.rewards)} reward "
                f"functions ({', '.join(r.name for r in self.rewards)})"
            )
        if h.reward_on_error not in ("raise", "fallback"):
            raise ConfigError(f"model.reward_on_error must be 'raise' or 'fallback', got {h.reward_on_error!r}")
        if h.reward_timeout is not None and not h.reward_timeout > 0:
            raise ConfigError(f"model.reward_timeout must be > 0 seconds or null, got {h.reward_timeout}")
        self._check_group_size()
        if not isinstance(h.trust_remote_code, bool):
            raise ConfigError(f"model.trust_remote_code must be true or false, got {h.trust_remote_code!r}")
        if self.optimizer_factory is None:
            raise ConfigError("model.optimizer must name an optimizer (e.g. class_path: torch.optim.AdamW), got null")
        self._try_optimizer()
        path = h.model_name_or_path
        if path != "quickstart" and (path is None or not str(path).strip() or not Path(path).is_dir()):
            raise ConfigError(
                f"model.model_name_or_path: {path!r} is not a local folder (nothing is "
                "downloaded; save the model with save_pretrained and give its path)"
            )
        if path != "quickstart" and not any((Path(path) / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ConfigError(
                f"model.model_name_or_path: {path!r} holds no config.json: not a model folder written by "
                "save_pretrained"
            )
        check_adapter_packages(h.quantization, h.lora)  # quant extra installed; quantization needs lora
        if h.merge_adapters_on_export and h.lora is None:
            raise ConfigError("model.merge_adapters_on_export merges LoRA adapters and needs model.lora")

    def _check_numbers(self) -> None:
        """NaN and inf pass a YAML float and every ``<`` / ``>`` check (NaN compares False), then wreck the run
        later (a NaN ``max_grad_norm`` turns every weight into NaN): refuse them where they make no sense."""
        h = self.hparams
        # inf is meaningful for these two: no truncation, no clipping.
        for key in ("tis_cap", "max_grad_norm"):
            if h[key] is not None and math.isnan(h[key]):
                raise ConfigError(f"model.{key} must be a number or null, got nan")
        for key in ("kl_beta", "entropy_coef", "val_success_threshold", "reward_fallback"):
            if h[key] is None or not math.isfinite(h[key]):
                raise ConfigError(f"model.{key} must be a finite number, got {h[key]}")
        if h.reward_timeout is not None and math.isinf(h.reward_timeout):
            raise ConfigError(f"model.reward_timeout must be a finite number of seconds, got {h.reward_timeout} "
                              "(null waits forever)")
        # Rewards are summed in float64 and then kept in float32: a weight or fallback beyond float32's range
        # turns every reward into inf.
        if abs(h.reward_fallback) > FLOAT32_MAX:
            raise ConfigError(f"model.reward_fallback = {h.reward_fallback:g} is beyond float32's range (+-3.4e38)")
        for i, weight in enumerate(h.reward_weights or ()):
            if weight is None or not math.isfinite(weight) or abs(weight) > FLOAT32_MAX:
                raise ConfigError(
                    f"model.reward_weights[{i}] must be a finite number within float32's range (+-3.4e38), "
                    f"got {weight}"
                )

    def _check_group_size(self) -> None:
        from drpo_lightning.registry import ADVANTAGES

        need = int(getattr(self.advantage, "min_group_size", 1))
        if self.hparams.num_generations < need:
            name = ADVANTAGES.name_of(type(self.advantage)) or type(self.advantage).__name__
            raise ConfigError(
                f"model.num_generations: advantage {name!r} compares the completions of a prompt and needs "
                f"model.num_generations >= {need}, got {self.hparams.num_generations} (every advantage would "
                "be 0 and nothing would train); for one sample per prompt use model.advantage: reinforce_pp"
            )

    def _try_optimizer(self) -> None:
        """Build the optimizer (and scheduler) factory on a throw-away parameter, so torch's own argument checks
        (``lr: -1``, ``betas`` out of range, ...) run now, before the model loads, and end in one line."""
        dummy = torch.nn.Parameter(torch.zeros(2, 2))  # 2-D: some optimizers (Muon) refuse other shapes
        key = "model.optimizer"
        try:
            optimizer = self.optimizer_factory([dummy])
            if self.scheduler_factory is not None:
                key = "model.lr_scheduler"
                self.scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            message = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"{key}: {message}") from err
        except Exception:
            # Anything else may be an artefact of the fake parameter: the real build decides.
            return

    def _check_sizes(self, prompts_per_batch: int) -> None:
        h = self.hparams
        n = prompts_per_batch * h.num_generations
        if n % h.num_minibatches:
            raise ConfigError(
                f"data.batch_size * model.num_generations = {prompts_per_batch} * {h.num_generations} = {n} "
                f"completions do not split into model.num_minibatches = {h.num_minibatches} equal minibatches"
            )
        mb = n // h.num_minibatches
        if h.micro_batch_size is not None and mb % h.micro_batch_size:
            raise ConfigError(
                f"minibatch of {mb} completions is not a multiple of model.micro_batch_size = {h.micro_batch_size}"
            )

    @property
    def model_path(self) -> str:
        if self.hparams.model_name_or_path == "quickstart":
            from drpo_lightning.tiny import quickstart_policy_path

            return quickstart_policy_path()
        return self.hparams.model_name_or_path

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
            self._check_sizes(int(datamodule.batch_size))  # prompts per rank per step
        if stage == "fit":
            self._check_topk()

    def _check_topk(self) -> None:
        """An objective asking for more of mu's top log-probs than the vocabulary has fails inside ``topk``
        at the first step: check it against the model's config.json before the weights load."""
        wanted = int(getattr(self.objective, "requires_topk", 0) or 0)
        if wanted <= 0:
            return
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(
                self.model_path, local_files_only=True, trust_remote_code=self.hparams.trust_remote_code
            )
        except (OSError, ValueError):  # e.g. an adapter folder without config.json: topk fails at the first step
            return
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text_config, "vocab_size", None)
        if vocab is not None and wanted > int(vocab):
            name = type(self.objective).__name__
            key = "model.objective.init_args.topk" if hasattr(self.objective, "topk") else "model.objective"
            raise ConfigError(
                f"{key}: {name} asks for the top {wanted} log-probs of each token, but the policy's vocabulary "
                f"has {vocab} tokens ({self.hparams.model_name_or_path}); use a topk <= {vocab}"
            )

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
            self._shard_fsdp2()

    def _shard_fsdp2(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy``: ``fully_shard`` each decoder layer (classes from
        the model's ``_no_split_modules``), then the model, over the data-parallel mesh. The reference model,
        if any, is sharded the same way."""
        from drpo_lightning.distributed import shard_with_fsdp2

        mesh = self.device_mesh
        if "data_parallel" in (mesh.mesh_dim_names or ()):
            if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
                raise ConfigError(
                    "ModelParallelStrategy with tensor_parallel_size > 1 is not supported by RLModule; set "
                    "trainer.strategy.init_args.data_parallel_size to the number of devices and "
                    "tensor_parallel_size: 1 (pure FSDP2)"
                )
            mesh = mesh["data_parallel"]
        shard_with_fsdp2(self.policy, mesh)
        if self.reference is not None:
            shard_with_fsdp2(self.reference, mesh)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    # -- pieces of a step -----------------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from drpo_lightning.data import format_prompts

        chat = self.hparams.chat_template
        texts = format_prompts(self.tokenizer, prompts, chat, self.hparams.system_prompt)
        templated = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None else chat
        # A rendered chat template already holds any BOS token.
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not templated)
        limit = self._max_prompt_length()
        lengths = enc["attention_mask"].sum(-1)
        if limit is not None and int(lengths.max()) > limit:
            i = int(lengths.argmax())
            raise ConfigError(
                f"a prompt of {int(lengths[i])} tokens exceeds model.max_prompt_length = {limit} "
                f"(context minus rollout.max_new_tokens): {prompts[i][:60]!r}"
            )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _max_prompt_length(self) -> int | None:
        if self.hparams.max_prompt_length is not None:
            return self.hparams.max_prompt_length
        context = getattr(getattr(self.policy, "config", None), "max_position_embeddings", None)
        return None if context is None else int(context) - int(self.rollout.max_new_tokens)

    def _generate(self, prompt_ids, prompt_mask, num_generations: int, topk: int = 0) -> RolloutBatch:
        from drpo_lightning.distributed import call_through, unwrap

        # Through the (possibly FSDP-sharded) policy's forward, so its parameters are gathered for generate.
        return call_through(
            self.policy,
            self.rollout.generate,
            unwrap(self.policy),
            prompt_ids,
            prompt_mask,
            num_generations=num_generations,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            topk=topk,
        )

    def _score(self, batch: dict[str, list], rollout: RolloutBatch, num_generations: int):
        from drpo_lightning.rewards.combine import compute_rewards

        lengths = rollout.completion_mask.sum(-1).long().tolist()
        ids = rollout.completion_ids.tolist()
        completions = self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True
        )
        # Each prompt's columns are repeated for its G completions (rows of a group are adjacent).
        columns = {k: [v for v in vals for _ in range(num_generations)] for k, vals in batch.items()}
        prompts = columns.pop("prompt")
        return compute_rewards(
            self.rewards,
            self.hparams.reward_weights,
            prompts,
            completions,
            columns,
            on_error=self.hparams.reward_on_error,
            fallback=self.hparams.reward_fallback,
            timeout=self.hparams.reward_timeout,
        )

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
        """The temperature the rollout sampled at: ``rollout.sampling.temperature`` (HFRollout) or
        ``rollout.temperature``.

        The temperature is part of the rollout contract: the training forward divides the logits by it so that
        its log-probs and the behaviour log-probs the engine reported are of the same distribution. A rollout
        with neither attribute is taken to sample at temperature 1, with a warning (once) naming its class.
        """
        sampling = getattr(self.rollout, "sampling", None)
        for owner in (sampling, self.rollout):
            if owner is not None and hasattr(owner, "temperature"):
                return float(owner.temperature)
        if not getattr(self, "_warned_temperature", False):
            self._warned_temperature = True
            rank_zero_warn(
                f"rollout {type(self.rollout).__name__} has no `temperature` attribute (nor "
                "`sampling.temperature`): assuming it samples at temperature 1. If it samples at another "
                "temperature, the training log-probs and the trust region are wrong; expose it as "
                "`temperature` (part of the rollout contract)",
                category=UserWarning,
            )
        return 1.0

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

        # 1. rollout
        prompt_ids, prompt_mask = self._encode_prompts(batch["prompt"])
        rollout = self._generate(prompt_ids, prompt_mask, G, topk=getattr(self.objective, "requires_topk", 0))
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
                self._optimizer_update(optimizer, scheduler, step_loss, metrics)

        # 5. metrics
        step_seconds = time.perf_counter() - step_start
        self._log_step(rollout, scored, rewards, advantages, metrics, rollout_seconds, step_seconds)

    def _optimizer_update(self, optimizer, scheduler, loss: torch.Tensor, metrics) -> None:
        max_norm = self.hparams.max_grad_norm if self.hparams.max_grad_norm is not None else float("inf")
        grad_norm = self._clip_grad_norm(max_norm)
        metrics["loss"].append(loss)
        metrics["grad_norm"].append(grad_norm.detach())
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        clipped_norm = None
        if finite and self.hparams.max_grad_norm is not None:
            # Clipping scales the gradient by max_norm / norm: a finite norm can still give a NaN gradient (a
            # NaN max_grad_norm set after the config check, a clipping bug), so measure what the optimizer
            # would apply. The norm is global (a collective on every rank, which all reach: `finite` agrees).
            clipped_norm = self._clip_grad_norm(float("inf"))
            finite = bool(torch.isfinite(clipped_norm))
        if not finite:
            # A non-finite update would wreck the policy silently: skip it, count it, stop if it persists.
            optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= self.hparams.max_consecutive_skips:
                clipped = "" if clipped_norm is None else f", after clipping {float(clipped_norm):.4g}"
                raise UserError(
                    f"{self._consecutive_skips} consecutive updates had a non-finite loss or gradient "
                    f"(loss={float(loss):.4g}, grad_norm={float(grad_norm):.4g}{clipped}); stopping. Lower the "
                    "learning rate or check the rewards (model.max_consecutive_skips)"
                )
            return
        self._consecutive_skips = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the policy gradient to ``max_norm`` (inf: measure only) and return its total norm.

        Sharded gradients need the norm over all shards: FSDP1 through the root unit's ``clip_grad_norm_``
        (``torch.nn.utils.clip_grad_norm_`` would clip each rank by its own shard's norm), FSDP2 through
        ``clip_grad_norm_`` on DTensor gradients. Both are collectives, called on every rank.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        from drpo_lightning.distributed import is_sharded

        root = self.trainer.strategy.model if self._trainer is not None else None
        if isinstance(root, FullyShardedDataParallel):
            return root.clip_grad_norm_(max_norm).detach()
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params and not is_sharded(self.policy):
            return torch.zeros((), device=self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full_tensor = getattr(grad_norm, "full_tensor", None)  # a DTensor for FSDP2 gradients
        return (full_tensor() if callable(full_tensor) else grad_norm).detach()

    def _log_step(self, rollout, scored, rewards, advantages, metrics, rollout_seconds, step_seconds) -> None:
        G = self.hparams.num_generations
        mask = rollout.completion_mask
        tokens = float(mask.sum())
        group_std = rewards.view(-1, G).std(-1) if G > 1 else torch.zeros(rewards.numel())
        log = {
            "reward/std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            "reward/zero_std_group_frac": (group_std == 0).float().mean(),
            "advantage/abs_mean": advantages.abs().mean(),
            "completion/length_mean": mask.sum(-1).float().mean(),
            "completion/truncated_frac": rollout.truncated.float().mean(),
            "perf/tokens_per_s": torch.tensor(tokens / max(step_seconds, 1e-9)),
            "perf/rollout_s": torch.tensor(rollout_seconds),
            "perf/step_s": torch.tensor(step_seconds),
            "train/skipped_updates": torch.tensor(float(self.skipped_updates)),
        }
        for name, values in scored.per_function.items():
            log[f"reward/{name}"] = values.float().mean()
        fallbacks = sum(scored.num_fallbacks.values())
        log["reward/fallbacks"] = torch.tensor(float(fallbacks))
        for key, values in metrics.items():
            prefix = "" if "/" in key else "train/"
            log[prefix + key] = torch.stack([v.float().reshape(()) for v in values]).mean()
        batch_size = rewards.numel()
        self.log("reward", rewards.mean(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log_dict({k: v.detach().float().cpu() for k, v in log.items()}, on_step=True, on_epoch=False,
                      batch_size=batch_size)

    # -- validation -----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        k = self.hparams.val_num_samples
        prompt_ids, prompt_mask = self._encode_prompts(batch["prompt"])
        # Validation samples from a fork of the RNG: it does not move the training sampling stream, so a run
        # resumed from a checkpoint (which skips the validation that ran right after it) continues exactly.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            rollout = self._generate(prompt_ids, prompt_mask, k)
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

    # -- checkpoint & export --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from drpo_lightning.checkpoint import gather_rng_states

        checkpoint["drpo_counters"] = {"skipped_updates": self.skipped_updates,
                                       "consecutive_skips": self._consecutive_skips,
                                       "initial_val_accuracy": self.initial_val_accuracy}
        # Lightning saves no RNG state: keep every rank's torch / CUDA / numpy / python states (a collective).
        checkpoint["drpo_rng_states"] = gather_rng_states(self.trainer if self._trainer is not None else None)
        self._keep_only_adapter_weights(checkpoint)
        if self._trainer is not None:
            settle_loop_position(checkpoint, self.trainer.num_training_batches)
            if self.trainer.optimizers:  # a resume with another optimizer is then refused up front
                checkpoint["drpo_optimizer"] = optimizer_name(self.trainer.optimizers[0])
        # The KL reference is the frozen initial policy, reloaded from model_name_or_path: not worth a second
        # copy of the model in every checkpoint, and a resume may turn the KL term on or off.
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("reference.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("drpo_counters", {})
        self.skipped_updates = int(counters.get("skipped_updates", 0))
        self._consecutive_skips = int(counters.get("consecutive_skips", 0))
        self.initial_val_accuracy = counters.get("initial_val_accuracy")
        self._rng_to_restore = checkpoint.get("drpo_rng_states")
        self._check_adapter_weights(checkpoint)
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):  # the reference is never restored from a checkpoint (see on_save_checkpoint)
            state = {k: v for k, v in state.items() if not k.startswith("reference.")}
            if self.reference is not None:
                state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
            checkpoint["state_dict"] = state

    def on_train_start(self) -> None:
        # RNG states from a checkpoint are applied here, right before the first resumed step, so nothing that
        # runs between loading and training (model set-up, moving to the device) consumes them.
        states = getattr(self, "_rng_to_restore", None)
        if states:
            from drpo_lightning.checkpoint import restore_rng_states

            restore_rng_states(states, self.trainer)
        self._rng_to_restore = None

    # -- adapter (LoRA) checkpoints: trainable weights + optimizer state only -------------------------
    def _trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def _keep_only_adapter_weights(self, checkpoint: dict[str, Any]) -> None:
        """With ``model.lora`` drop the frozen (possibly quantized) base weights from the checkpoint: they
        are reloaded from ``model_name_or_path`` on resume (``strict_loading`` is off for that). The
        ``quantization``/``lora`` hyperparameters are stored as plain dicts, which ``torch.load`` with
        ``weights_only=True`` (Lightning's default on resume) accepts; the module takes either form."""
        import dataclasses

        hparams = checkpoint.get("hyper_parameters")
        for key in ("quantization", "lora"):
            if isinstance(hparams, dict) and dataclasses.is_dataclass(hparams.get(key)):
                hparams[key] = dataclasses.asdict(hparams[key])
        if self.hparams.lora is None or self.policy is None or "state_dict" not in checkpoint:
            return
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def _check_adapter_weights(self, checkpoint: dict[str, Any]) -> None:
        """Non-strict loading must not hide missing adapters: every trainable weight must be there."""
        if self.hparams.lora is None or self.policy is None or "state_dict" not in checkpoint:
            return
        missing = sorted(self._trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(
                f"the checkpoint lacks {len(missing)} adapter weights of this model.lora setting (e.g. "
                f"{missing[0]}): it was saved with other model.lora or model.model_name_or_path values"
            )

    def on_fit_end(self) -> None:
        if self.hparams.export_dir == "":
            return
        target = self.hparams.export_dir or str(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "export")
        from drpo_lightning.distributed import full_state_dict, is_sharded, save_pretrained_full

        if is_sharded(self.policy):
            # FSDP / FSDP2: gather the full weights (a collective on every rank), write them from rank 0.
            state_dict = full_state_dict(self.trainer.strategy.model, prefix="policy.")
            if self.trainer.is_global_zero:
                save_pretrained_full(self.policy, target, state_dict)
                self.tokenizer.save_pretrained(target)
                self.print(f"exported the trained policy to {target}")
            self.export_path = target
            self.trainer.strategy.barrier("drpo-export")
            return
        if self.trainer.is_global_zero:
            from drpo_lightning.models import export_policy

            export_policy(self.policy, target, merge_adapters=self.hparams.merge_adapters_on_export,
                          base_path=self.model_path, trust_remote_code=self.hparams.trust_remote_code,
                          model_kwargs=self.hparams.model_kwargs)
            self.tokenizer.save_pretrained(target)
            self.print(f"exported the trained policy to {target}")
        self.export_path = target
