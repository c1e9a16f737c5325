"""RLModule's configuration checks: cheap, run before anything loads, each failure one ``ConfigError`` line.

Split out of module.py so that the module holds the loop only; every function takes the ``RLModule`` (it
reads ``hparams`` and the plugins it was given).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from drpo_lightning.errors import ConfigError
from drpo_lightning.kl import KL_ESTIMATORS
from drpo_lightning.models import check_adapter_packages
from drpo_lightning.registry import ADVANTAGES

FLOAT32_MAX = torch.finfo(torch.float32).max


def check_config(module) -> None:
    h = module.hparams
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
    check_numbers(module)
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
    if h.reward_weights is not None and len(h.reward_weights) != len(module.rewards):
        raise ConfigError(
            f"model.reward_weights has {len(h.reward_weights)} entries for {len(module.rewards)} reward "
            f"functions ({', '.join(r.name for r in module.rewards)})"
        )
    if h.reward_on_error not in ("raise", "fallback"):
        raise ConfigError(f"model.reward_on_error must be 'raise' or 'fallback', got {h.reward_on_error!r}")
    if h.reward_timeout is not None and not h.reward_timeout > 0:
        raise ConfigError(f"model.reward_timeout must be > 0 seconds or null, got {h.reward_timeout}")
    check_group_size(module)
    if not isinstance(h.trust_remote_code, bool):
        raise ConfigError(f"model.trust_remote_code must be true or false, got {h.trust_remote_code!r}")
    if module.optimizer_factory is None:
        raise ConfigError("model.optimizer must name an optimizer (e.g. class_path: torch.optim.AdamW), got null")
    try_optimizer(module)
    path = module.model_path  # a shipped policy's name ("quickstart") resolves to its folder
    if path is None or not str(path).strip() or not Path(path).is_dir():
        raise ConfigError(
            f"model.model_name_or_path: {path!r} is not a local folder (nothing is "
            "downloaded; save the model with save_pretrained and give its path)"
        )
    if not any((Path(path) / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ConfigError(
            f"model.model_name_or_path: {path!r} holds no config.json: not a model folder written by "
            "save_pretrained"
        )
    check_adapter_packages(h.quantization, h.lora)  # quant extra installed; quantization needs lora
    if h.merge_adapters_on_export and h.lora is None:
        raise ConfigError("model.merge_adapters_on_export merges LoRA adapters and needs model.lora")
    check_rollout(module)


def check_rollout(module) -> None:
    """A rollout worker loads the plain model from ``model_name_or_path`` and receives full weights: LoRA
    adapters and quantized bases would need merged-weight syncs, which do not exist yet."""
    from drpo_lightning.loop.feed import worker_options

    if worker_options(module.rollout) is None:
        return
    h = module.hparams
    for key in ("lora", "quantization"):
        if h[key] is not None:
            raise ConfigError(f"model.rollout: a rollout worker samples with full, unquantized weights; it does "
                              f"not support model.{key} yet (use an in-process rollout such as hf)")


def check_numbers(module) -> None:
    """NaN and inf pass a YAML float and every ``<`` / ``>`` check (NaN compares False), then wreck the run
    later (a NaN ``max_grad_norm`` turns every weight into NaN): refuse them where they make no sense."""
    h = module.hparams
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


def check_group_size(module) -> None:
    need = int(getattr(module.advantage, "min_group_size", 1))
    if module.hparams.num_generations < need:
        name = ADVANTAGES.name_of(type(module.advantage)) or type(module.advantage).__name__
        raise ConfigError(
            f"model.num_generations: advantage {name!r} compares the completions of a prompt and needs "
            f"model.num_generations >= {need}, got {module.hparams.num_generations} (every advantage would "
            "be 0 and nothing would train); for one sample per prompt use model.advantage: reinforce_pp"
        )


def try_optimizer(module) -> None:
    """Build the optimizer (and scheduler) factory on a throw-away parameter, so torch's own argument checks
    (``lr: -1``, ``betas`` out of range, ...) run now, before the model loads, and end in one line."""
    dummy = torch.nn.Parameter(torch.zeros(2, 2))  # 2-D: some optimizers (Muon) refuse other shapes
    key = "model.optimizer"
    try:
        optimizer = module.optimizer_factory([dummy])
        if module.scheduler_factory is not None:
            key = "model.lr_scheduler"
            module.scheduler_factory(optimizer)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"{key}: {message}") from err
    except Exception:
        # Anything else may be an artefact of the fake parameter: the real build decides.
        return


def check_sizes(module, prompts_per_batch: int) -> None:
    h = module.hparams
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



def check_topk(module) -> None:
    """An objective asking for more of mu's top log-probs than the vocabulary has fails inside ``topk``
    at the first step: check it against the model's config.json before the weights load."""
    wanted = int(getattr(module.objective, "requires_topk", 0) or 0)
    if wanted <= 0:
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            module.model_path, local_files_only=True, trust_remote_code=module.hparams.trust_remote_code
        )
    except (OSError, ValueError):  # e.g. an adapter folder without config.json: topk fails at the first step
        return
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if vocab is not None and wanted > int(vocab):
        name = type(module.objective).__name__
        key = "model.objective.init_args.topk" if hasattr(module.objective, "topk") else "model.objective"
        raise ConfigError(
            f"{key}: {name} asks for the top {wanted} log-probs of each token, but the policy's vocabulary "
            f"has {vocab} tokens ({module.hparams.model_name_or_path}); use a topk <= {vocab}"
        )
