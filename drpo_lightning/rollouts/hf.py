"""Rollouts with Hugging Face ``generate``: the default engine, runs anywhere the policy runs.

The behaviour log-probs are recorded *while* sampling by a logits processor, one ``[N, V]`` float32 slice
at a time, so the engine never holds the ``[N, T, V]`` stack of per-step logits that
``output_logits=True`` would keep (tens of GB for a real vocabulary and batch).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from drpo_lightning.rollouts.base import RolloutEngine
from drpo_lightning.rollouts.fp8 import FP8PolicyCopy
from drpo_lightning.types import RolloutBatch, SamplingParams

__all__ = ["HFRollout"]

log = logging.getLogger(__name__)

# precision name -> autocast dtype; ``False``: autocast forced off; ``None``: leave the context alone.
_PRECISIONS: dict[str | None, torch.dtype | bool | None] = {
    None: None,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "fp16": torch.float16,
    "16": torch.float16,
    "16-mixed": torch.float16,
    "32": False,
    "fp32": False,
    "32-true": False,
    "fp8": torch.bfloat16,
    "fp8-tensor": torch.bfloat16,
}

# fp8 precisions -> one scale per output row (True) or per tensor (False); see drpo_lightning.rollouts.fp8.
_FP8_PER_ROW = {"fp8": True, "fp8-tensor": False}

# Fields of ``policy.generation_config`` that would reshape the sampling distribution and that this engine
# cannot switch off by passing a neutral value (``None`` means "inherit from the model" in transformers).
_UNCONTROLLED_GENERATION_FIELDS = (
    "min_p",
    "top_h",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "watermarking_config",
)


class _BehaviourRecorder(LogitsProcessor):
    """Logits processor that records log mu of every sampled token and applies this engine's sampling rules.

    ``generate`` calls it once per decoding step with the sequence so far and the step's raw float32 logits.
    It stores ``log_softmax(logits / temperature)`` of the step; the token sampled from that step is only known
    at the next call (it is then ``input_ids[:, -1]``), so each call gathers the previous step's log-prob and
    :meth:`finish` gathers the last one from the returned sequences. Only one ``[N, V]`` slice is kept.

    It then returns the distribution to sample from: the temperature-scaled log-probs with EOS suppressed
    before ``min_new_tokens`` and top-k / top-p truncation applied (transformers' own warpers, so the
    semantics match ``generate``'s; they are switched off in ``generate`` itself because its default
    processors run *before* custom ones and would hide the raw logits from this recorder).
    """

    def __init__(
        self, params: SamplingParams, eos_token_ids: list[int], topk: int, pad_token_id: int
    ) -> None:
        self.temperature = params.temperature
        self.min_new_tokens = params.min_new_tokens
        self.eos_token_ids = eos_token_ids
        self.topk = topk
        self.pad_token_id = pad_token_id
        self.warpers: list[LogitsProcessor] = []
        if params.top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p))
        self.prompt_len: int | None = None
        self.last_logp: torch.Tensor | None = None  # [N, V] float32, the latest step's log mu
        self.token_logps: list[torch.Tensor] = []  # step t -> [N] log mu of the token sampled at step t
        self.topk_logps: list[torch.Tensor] = []  # step t -> [N, K]
        self.topk_ids: list[torch.Tensor] = []  # step t -> [N, K]

    def _gather_last(self, tokens: torch.Tensor) -> None:
        assert self.last_logp is not None
        self.token_logps.append(self.last_logp.gather(1, tokens[:, None].long()).squeeze(1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        else:
            self._gather_last(input_ids[:, -1])
        step = input_ids.shape[1] - self.prompt_len
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.last_logp = logp
        if self.topk > 0:
            values, ids = logp.topk(self.topk, dim=-1)
            self.topk_logps.append(values)
            self.topk_ids.append(ids)
        out = logp
        if step < self.min_new_tokens:
            out = out.clone()
            out[:, self.eos_token_ids] = -float("inf")
        for warper in self.warpers:
            out = warper(input_ids, out)
        return out

    def finish(
        self, completion: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-token log mu ``[N, T']`` (and top-K ``[N, T', K]``) for the ``T'`` generated columns."""
        steps = completion.shape[1]
        if len(self.token_logps) == steps - 1:  # the last sampled token is gathered here
            self._gather_last(completion[:, -1])
        if len(self.token_logps) < steps or (self.topk > 0 and len(self.topk_logps) < steps):
            raise RuntimeError(
                f"HFRollout: the logits processor saw {len(self.token_logps)} steps but generate returned "
                f"{steps} tokens; this transformers version calls logits processors differently than expected"
            )
        logps = torch.stack(self.token_logps[:steps], dim=1)
        if self.topk == 0:
            return logps, None, None
        return logps, torch.stack(self.topk_logps[:steps], dim=1), torch.stack(self.topk_ids[:steps], dim=1)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own training flag back (not one flag for all)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _autocast(setting: torch.dtype | bool | None, device_type: str) -> contextlib.AbstractContextManager:
    if setting is None:
        return contextlib.nullcontext()
    if setting is False:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=setting)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_QUIET = _BelowError()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' chatter about generation flags for one call (we pass every flag on purpose).

    A filter, not ``setLevel``: every ``setLevel`` clears the level cache of every logger in the process,
    which cost ~0.7 ms per rollout (4% of a step of a tiny model)."""
    loggers = [logging.getLogger("transformers.generation.utils"),
               logging.getLogger("transformers.generation.configuration_utils")]
    for logger in loggers:
        logger.addFilter(_QUIET)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"transformers\.generation")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(_QUIET)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _shared_prompt_cache(
    policy: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int
) -> dict[str, object]:
    """``generate`` keyword arguments that hand it a KV cache of each prompt's first ``P-1`` tokens, computed
    once per prompt (``[B, P]``) and repeated for its ``repeats`` samples; ``{}`` when that cannot be done.

    ``generate`` would otherwise prefill the same prompt ``repeats`` times. With the cache it runs only the last
    prompt token per sample, so the sampled tokens and recorded log-probs are those of the plain call (same
    logits up to float rounding, same random draws). Only a plain full-attention ``DynamicCache`` is used
    (no sliding windows or hybrid layers); a policy whose ``forward`` takes neither ``cache`` (transformers
    5.2x) nor ``past_key_values`` (e.g. a PEFT wrapper) is left alone.
    """
    forward = getattr(policy, "forward", None)
    name = next((n for n in ("cache", "past_key_values") if _accepts(forward, n)), None)
    if name is None or prompt_ids.shape[1] < 2:
        return {}
    mask = prompt_mask[:, :-1]
    inputs = {"input_ids": prompt_ids[:, :-1], "attention_mask": mask, "use_cache": True}
    if _accepts(forward, "position_ids"):
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if _accepts(forward, "logits_to_keep"):
        inputs["logits_to_keep"] = 1
    out = policy(**inputs)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return {}
    cache.batch_repeat_interleave(repeats)
    return {name: cache}


class HFRollout(RolloutEngine):
    """Sample completions with the policy's own Hugging Face ``generate`` and record their behaviour log-probs.

    The behaviour log-prob of a sampled token is ``log_softmax(logits / temperature)`` at that token, computed
    in float32 from the raw logits of the forward pass that sampled it. It is taken *before* top-k / top-p
    truncation and before EOS is suppressed for ``min_new_tokens``: that is the distribution the training
    forward can recompute from its own logits and the temperature, so with ``precision`` matching the
    trainer the ratio pi/mu starts at 1 up to kernel noise (~1e-5 in float32). With truncation on, the
    sampling distribution is the renormalised truncation of this one, so the reported mu is slightly smaller
    than the probability the token was actually drawn with (the usual convention; truncated tokens get no
    special treatment).

    Only the settings below shape the distribution: ``repetition_penalty``, ``no_repeat_ngram_size``,
    ``typical_p``, ``epsilon_cutoff`` and ``eta_cutoff`` are forced neutral whatever the model's
    ``generation_config`` says (a hub ``generation_config.json`` often sets them, which would make the reported
    mu disagree with the trainer's recomputation). Fields that cannot be forced neutral (``min_p``,
    ``suppress_tokens``, ``bad_words_ids``, ...) are left to the model and reported once with a warning.
    ``policy.generation_config`` itself is never modified.

    The policy only needs a Hugging Face compatible ``.generate(input_ids=..., attention_mask=...,
    generation_config=..., logits_processor=...)`` (a ``PreTrainedModel``, a PEFT model, an FSDP2
    ``fully_shard``-ed model); it must live on the device of the prompt tensors. Generation runs under
    ``torch.no_grad()`` (not ``inference_mode``: the returned tensors feed the training forward) with the
    policy in eval mode; every submodule's training flag is restored afterwards.

    Args:
        max_new_tokens: Most tokens generated per completion. Every returned batch has exactly this many
            completion columns (right-padded), and a completion with no EOS within it is flagged truncated.
        temperature: Softmax temperature (> 0). The behaviour log-probs are those of the temperature-scaled
            distribution, as the trainer must recompute them.
        top_p: Nucleus sampling mass in (0, 1]; 1.0 turns it off. Truncation does not change the reported
            behaviour log-probs (see above).
        top_k: Sample only among the k most likely tokens; 0 turns it off. Does not change the reported
            behaviour log-probs.
        min_new_tokens: EOS is suppressed for the first ``min_new_tokens`` steps (for benchmarks that need
            fixed-length completions). Not reflected in the behaviour log-probs.
        precision: Numerics of the sampling forward. ``None``: whatever the surrounding code runs in (under a
            Lightning ``bf16-mixed`` trainer that is bf16 autocast). ``"bf16"`` / ``"bf16-mixed"``: bfloat16
            autocast; ``"fp16"`` / ``"16-mixed"``: float16 autocast; ``"32"`` / ``"fp32"``: autocast forced off.
            Sampling in bf16 while training in float32 reproduces the training-inference mismatch that
            DRPO/DPPO's trust region controls (up to ~0.3 nats per token on a tiny model). ``"fp8"``: sample
            from a copy of the policy whose linear weights (all but the output head) are rounded to float8
            e4m3 with one scale per output row (as FP8 checkpoints with channel-wise scales are served), run
            under bf16 autocast; ``"fp8-tensor"``: the same with one scale per weight matrix (as vLLM's online
            ``quantization: fp8`` does). The behaviour log-probs are
            the copy's, so they carry the quantisation error the trainer's float32/bf16 recomputation does
            not. The copy (one extra copy of the weights, kept by the engine) is refreshed from the policy
            at every call; see :class:`~drpo_lightning.rollouts.fp8.FP8PolicyCopy` for the format and
            what is refused (bitsandbytes layers, FSDP-sharded policies).
        use_cache: Use the KV cache during generation (turn off only to debug cache issues; much slower).
        share_prompt: Prefill each prompt once and give ``generate`` that KV cache repeated for the
            ``num_generations`` samples, instead of prefilling every sample's copy of the prompt (same samples,
            less work; see :func:`_shared_prompt_cache`). Needs ``use_cache``.
    """

    def __init__(
        self,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_new_tokens: int = 0,
        precision: str | None = None,
        use_cache: bool = True,
        share_prompt: bool = True,
    ) -> None:
        self.sampling = SamplingParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
        )
        self.max_new_tokens = max_new_tokens
        key = None if precision is None else str(precision).lower()
        if key not in _PRECISIONS:
            names = ", ".join(repr(k) for k in _PRECISIONS if k is not None)
            raise ValueError(f"HFRollout: precision must be None or one of {names}; got {precision!r}")
        self.precision = precision
        self._autocast_setting = _PRECISIONS[key]
        self._fp8 = FP8PolicyCopy(_FP8_PER_ROW[key], key) if key in _FP8_PER_ROW else None
        self.use_cache = use_cache
        self.share_prompt = share_prompt
        self._warned_fields: set[str] = set()

    def __repr__(self) -> str:
        s = self.sampling
        return (
            f"HFRollout(max_new_tokens={s.max_new_tokens}, temperature={s.temperature}, top_p={s.top_p}, "
            f"top_k={s.top_k}, min_new_tokens={s.min_new_tokens}, precision={self.precision!r}, "
            f"use_cache={self.use_cache}, share_prompt={self.share_prompt})"
        )

    def _generation_config(self, eos_token_ids: list[int], pad_token_id: int) -> GenerationConfig:
        # Every distribution-shaping flag explicit and neutral: the recorder applies temperature, EOS
        # suppression and truncation itself (see _BehaviourRecorder).
        return GenerationConfig(
            do_sample=True,
            num_beams=1,
            num_return_sequences=1,
            max_new_tokens=self.sampling.max_new_tokens,
            min_new_tokens=0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            use_cache=self.use_cache,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            return_dict_in_generate=False,
            output_scores=False,
            output_logits=False,
        )

    def _warn_uncontrolled(self, policy: torch.nn.Module) -> None:
        config = getattr(policy, "generation_config", None)
        if config is None:
            return
        for field in _UNCONTROLLED_GENERATION_FIELDS:
            if getattr(config, field, None) is not None and field not in self._warned_fields:
                self._warned_fields.add(field)
                warnings.warn(
                    f"HFRollout: policy.generation_config.{field}={getattr(config, field)!r} also shapes "
                    "sampling; the reported behaviour log-probs do not account for it",
                    stacklevel=3,
                )

    def generate(
        self,
        policy: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        num_generations: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        topk: int = 0,
    ) -> RolloutBatch:
        """Sample ``num_generations`` completions per left-padded prompt; see :class:`RolloutEngine`.

        Returns a :class:`RolloutBatch` with ``N = B * num_generations`` rows (a prompt's rows adjacent) and
        exactly ``max_new_tokens`` completion columns. ``completion_mask`` is 1 up to and including the first
        EOS; tokens after it are ``pad_token_id`` and their behaviour log-probs 0. With ``topk > 0`` the top-K
        log-probs/ids come from the same float32 temperature-scaled distribution; at masked positions they
        are 0 / ``pad_token_id`` (consumers must select with the mask, not multiply by it).
        """
        if num_generations < 1:
            raise ValueError(f"HFRollout: num_generations must be >= 1, got {num_generations}")
        if topk < 0:
            raise ValueError(f"HFRollout: topk must be >= 0, got {topk}")
        if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(
                f"HFRollout: prompt_ids and prompt_mask must both be [B, P]; got {tuple(prompt_ids.shape)} "
                f"and {tuple(prompt_mask.shape)}"
            )
        if prompt_ids.shape[1] == 0 or not bool(prompt_mask[:, -1].bool().all()):
            raise ValueError(
                "HFRollout: prompts must be left-padded (prompt_mask[:, -1] all 1) and non-empty; "
                "decoder-only generation with right padding samples garbage"
            )
        eos_ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        if not eos_ids:
            raise ValueError("HFRollout: eos_token_id must name at least one token")
        self._warn_uncontrolled(policy)

        device = prompt_ids.device
        batch = prompt_ids.shape[0]
        unique_ids, unique_mask = prompt_ids.long(), prompt_mask.long()  # [B, P]
        prompt_ids = unique_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = unique_mask.repeat_interleave(num_generations, dim=0)
        group_ids = torch.arange(batch, device=device).repeat_interleave(num_generations)

        recorder = _BehaviourRecorder(self.sampling, eos_ids, topk, pad_token_id)
        # The model that samples: the policy itself, or its fp8 copy refreshed with the current weights.
        sampler = policy if self._fp8 is None else self._fp8.sync(policy)
        with (
            _eval_mode(sampler),
            torch.no_grad(),
            _autocast(self._autocast_setting, device.type),
            _quiet_transformers(),
        ):
            shared = {}
            if self.share_prompt and self.use_cache and num_generations > 1:
                shared = _shared_prompt_cache(sampler, unique_ids, unique_mask, num_generations)
            out = sampler.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=self._generation_config(eos_ids, pad_token_id),
                logits_processor=LogitsProcessorList([recorder]),
                **shared,
            )
        sequences = out.sequences if hasattr(out, "sequences") else out
        completion = sequences[:, prompt_ids.shape[1] :]
        logps, topk_logps, topk_ids = recorder.finish(completion)

        is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
        # 1 on tokens up to and including the first EOS: no EOS strictly before this position.
        mask = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
        truncated = ~is_eos.any(dim=1)

        width = self.sampling.max_new_tokens
        missing = width - completion.shape[1]  # > 0 only when every row stopped early

        def pad(x: torch.Tensor, value: float | int) -> torch.Tensor:
            if missing == 0:
                return x
            filler = x.new_full((x.shape[0], missing, *x.shape[2:]), value)
            return torch.cat([x, filler], dim=1)

        mask = pad(mask, False)
        completion_ids = pad(completion, pad_token_id).masked_fill(~mask, pad_token_id)
        behavior_logprobs = pad(logps, 0.0).masked_fill(~mask, 0.0)
        if topk_logps is not None and topk_ids is not None:
            topk_logps = pad(topk_logps, 0.0).masked_fill(~mask[..., None], 0.0)
            topk_ids = pad(topk_ids, pad_token_id).masked_fill(~mask[..., None], pad_token_id)

        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids.long(),
            completion_mask=mask.float(),
            behavior_logprobs=behavior_logprobs.float(),
            truncated=truncated,
            group_ids=group_ids,
            topk_logprobs=topk_logps,
            topk_ids=topk_ids,
        )
