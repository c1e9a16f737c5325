"""Pieces of RLModule's step that are not the loop's control flow: prompt encoding, scoring, the rollout's
temperature, FSDP2 sharding, the per-step metrics. Each takes the ``RLModule``."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from drpo_lightning.errors import ConfigError
from drpo_lightning.types import RolloutBatch


def shard_fsdp2(module) -> None:
    """FSDP2 under Lightning's ``ModelParallelStrategy``: ``fully_shard`` each decoder layer (classes from
    the model's ``_no_split_modules``), then the model, over the data-parallel mesh. The reference model,
    if any, is sharded the same way."""
    from drpo_lightning.distributed import shard_with_fsdp2

    mesh = module.device_mesh
    if "data_parallel" in (mesh.mesh_dim_names or ()):
        if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                "ModelParallelStrategy with tensor_parallel_size > 1 is not supported by RLModule; set "
                "trainer.strategy.init_args.data_parallel_size to the number of devices and "
                "tensor_parallel_size: 1 (pure FSDP2)"
            )
        mesh = mesh["data_parallel"]
    shard_with_fsdp2(module.policy, mesh)
    if module.reference is not None:
        shard_with_fsdp2(module.reference, mesh)


def encode_prompts(module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from drpo_lightning.data import format_prompts

    chat = module.hparams.chat_template
    texts = format_prompts(module.tokenizer, prompts, chat, module.hparams.system_prompt)
    templated = bool(getattr(module.tokenizer, "chat_template", None)) if chat is None else chat
    # A rendered chat template already holds any BOS token.
    enc = module.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not templated)
    limit = module._max_prompt_length()
    lengths = enc["attention_mask"].sum(-1)
    if limit is not None and int(lengths.max()) > limit:
        i = int(lengths.argmax())
        raise ConfigError(
            f"a prompt of {int(lengths[i])} tokens exceeds model.max_prompt_length = {limit} "
            f"(context minus rollout.max_new_tokens): {prompts[i][:60]!r}"
        )
    return enc["input_ids"].to(module.device), enc["attention_mask"].to(module.device)


def score(module, batch: dict[str, list], rollout: RolloutBatch, num_generations: int):
    from drpo_lightning.rewards.combine import compute_rewards

    lengths = rollout.completion_mask.sum(-1).long().tolist()
    ids = rollout.completion_ids.tolist()
    completions = module.tokenizer.batch_decode(
        [row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True
    )
    # Each prompt's columns are repeated for its G completions (rows of a group are adjacent).
    columns = {k: [v for v in vals for _ in range(num_generations)] for k, vals in batch.items()}
    prompts = columns.pop("prompt")
    return compute_rewards(
        module.rewards,
        module.hparams.reward_weights,
        prompts,
        completions,
        columns,
        on_error=module.hparams.reward_on_error,
        fallback=module.hparams.reward_fallback,
        timeout=module.hparams.reward_timeout,
    )


def rollout_temperature(module) -> float:
    """The temperature the rollout sampled at: ``rollout.sampling.temperature`` (HFRollout) or
    ``rollout.temperature``.

    The temperature is part of the rollout contract: the training forward divides the logits by it so that
    its log-probs and the behaviour log-probs the engine reported are of the same distribution. A rollout
    with neither attribute is taken to sample at temperature 1, with a warning (once) naming its class.
    """
    sampling = getattr(module.rollout, "sampling", None)
    for owner in (sampling, module.rollout):
        if owner is not None and hasattr(owner, "temperature"):
            return float(owner.temperature)
    if not getattr(module, "_warned_temperature", False):
        module._warned_temperature = True
        rank_zero_warn(
            f"rollout {type(module.rollout).__name__} has no `temperature` attribute (nor "
            "`sampling.temperature`): assuming it samples at temperature 1. If it samples at another "
            "temperature, the training log-probs and the trust region are wrong; expose it as "
            "`temperature` (part of the rollout contract)",
            category=UserWarning,
        )
    return 1.0


def token_gaps(logprobs: torch.Tensor, behavior_logprobs: torch.Tensor) -> torch.Tensor:
    """``|log pi - log mu|`` per position, ``[n, T]`` (padding included: :func:`mismatch_metrics` drops it)."""
    return (logprobs.detach().float() - behavior_logprobs.float()).abs()


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for a 1-D tensor of any length: torch.quantile
    refuses more than 2**24 elements, which one large minibatch's tokens can exceed."""
    ordered = values.double().sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)).float()


def mismatch_metrics(gaps: list[torch.Tensor], mask: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Mean and 99th percentile of ``|log pi - log mu|`` over the valid tokens of a rollout's first minibatch,
    before any update on it (``gaps``: its micro-batches in order; ``mask``: its ``[n, T]`` completion mask).
    At ``max_staleness`` 0 this is the rollout engine's numerical mismatch alone (bf16 or fp8 sampling vs the
    trainer's forward); with a worker lagging by k it adds the lag."""
    values = torch.cat(gaps)[mask > 0]  # one host sync per rollout
    if values.numel() == 0:
        return {}
    return {"rollout/mismatch_mean": [values.mean()], "rollout/mismatch_p99": [percentile(values, 0.99)]}


def log_step(module, rollout, scored, rewards, advantages, metrics, rollout_seconds, step_seconds) -> None:
    G = module.hparams.num_generations
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
        "train/skipped_updates": torch.tensor(float(module.skipped_updates)),
    }
    if module.feed is not None:  # staleness (mean, max), seconds waited for rollouts and spent on syncs
        log.update({key: torch.tensor(float(value)) for key, value in module.feed.metrics().items()})
    for name, values in scored.per_function.items():
        log[f"reward/{name}"] = values.float().mean()
    fallbacks = sum(scored.num_fallbacks.values())
    log["reward/fallbacks"] = torch.tensor(float(fallbacks))
    for key, values in metrics.items():
        prefix = "" if "/" in key else "train/"
        log[prefix + key] = torch.stack([v.float().reshape(()) for v in values]).mean()
    batch_size = rewards.numel()
    module.log("reward", rewards.mean(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
    module.log_dict({k: v.detach().float().cpu() for k, v in log.items()}, on_step=True, on_epoch=False,
                    batch_size=batch_size)
