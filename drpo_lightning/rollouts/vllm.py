"""Rollouts with vLLM: an in-process ``vllm.LLM`` (colocated) or a ``vllm serve`` process (server).

**Status: written against vLLM's documented API and not yet run with a real vLLM.** vLLM's wheel is a CUDA
build that cannot be installed where drpo-lightning is developed, so only the pure-Python parts below
(sampling-parameter translation, request payloads, weight-name mapping, log-prob extraction from
vLLM-shaped outputs) are tested; the GPU integration test skips without vLLM.

Supported vLLM: ``>=0.28,<0.35`` (checked when the engine is built, one-line error otherwise). The bounds
come from the APIs this module calls and the vLLM release that introduced each:

- ``logprobs_mode="processed_logprobs"`` (engine argument / ``--logprobs-mode``): 0.10.0. Log-probs are taken
  after the sampler's processing (temperature, penalties, ...), so at ``temperature != 1`` they are those of
  the distribution actually sampled (raw log-probs would be of the unscaled softmax).
- Native weight transfer (``WeightTransferConfig``, ``LLM.init_weight_transfer_engine`` /
  ``update_weights``): 0.16.0. The ``start_weight_update`` / ``finish_weight_update`` phases and the HTTP
  routes of all four (plus ``/pause``, ``/resume``, ``/get_world_size``) are in the 0.25 documentation.
- The trainer-side engine used here (``WeightTransferTrainerFactory.trainer_init(init_info, client=...,
  source=...)`` then ``send_weights()``, fed by a ``WeightSource``): 0.28.0, which also removed the static
  ``NCCLWeightTransferEngine.trainer_send_weights`` of 0.16-0.27. Hence the lower bound.
- Upper bound: the newest release whose documentation was checked (0.34.0). The weight-transfer API has
  changed in most minor releases so far, so a newer vLLM is refused until checked.

Modes:

- ``colocated``: an in-process ``vllm.LLM`` on the trainer's GPU (``gpu_memory_utilization`` leaves room for
  training). Weights travel by CUDA IPC handles (vLLM's ``ipc`` weight-transfer backend, zero copy). Until
  :meth:`VLLMRollout.load_weights` is first called, each :meth:`~VLLMRollout.generate` first pushes the
  policy it is given, so the synchronous loop samples with the current weights; from then on the caller's
  ``load_weights`` schedule (staleness) decides.
- ``server``: a ``vllm serve`` process (started by this engine with ``launch_server=True`` or by you with
  :meth:`VLLMRollout.server_command`). Completions come from ``/v1/completions`` (token ids in and out);
  weights are broadcast by NCCL with the server's ``/start_weight_update`` ... ``/finish_weight_update``
  routes, which need ``VLLM_SERVER_DEV_MODE=1`` and ``--weight-transfer-config '{"backend": "nccl"}'``.

Every weight update ends with a prefix-cache reset: cached prompt KV computed with the old weights would
otherwise be reused by the next rollout.

Behaviour log-probs: ``log mu`` of each sampled token from vLLM's processed log-probs, which with every
other processor neutral is ``log_softmax(logits / temperature)``: the quantity :class:`HFRollout` reports
and the trainer recomputes. top-p / top-k are refused: vLLM's processed log-probs are then normalised over
the truncated support, which the trainer can only reproduce with the per-token sampling mask
(``return_sampling_mask``), and no drpo-lightning batch carries that mask yet. ``min_new_tokens`` is
refused for the same reason (vLLM suppresses EOS with a logits processor that processed log-probs include).

Weight names: vLLM's model classes load Hugging Face checkpoint names as they are (Llama / Qwen2
``load_weights`` fuse ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``
themselves and skip ``rotary_emb.inv_freq``), so :func:`vllm_weight_names` only removes wrapper prefixes
(``torch.compile``, FSDP1, activation checkpointing, DDP) and refuses un-merged LoRA adapters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from drpo_lightning.errors import ConfigError, UserError
from drpo_lightning.rollouts.base import RolloutEngine
from drpo_lightning.types import RolloutBatch, SamplingParams

__all__ = [
    "VLLM_REQUIREMENT",
    "VLLMRollout",
    "check_vllm_version",
    "completion_payload",
    "samples_from_completion",
    "samples_from_request_outputs",
    "vllm_sampling_kwargs",
    "vllm_weight_names",
]

log = logging.getLogger(__name__)

VLLM_MIN = (0, 28)
VLLM_BELOW = (0, 35)
VLLM_REQUIREMENT = "vllm>=0.28,<0.35"
INSTALL_HINT = 'pip install "drpo-lightning[vllm]"'
MAX_LOGPROBS = 20
"""vLLM's default ``max_logprobs``: the most top-K log-probs one position can return."""
_KEY = "model.rollout.init_args"
_MODES = ("colocated", "server")

# Module-name prefixes that wrappers add in front of the Hugging Face names (torch.compile, FSDP1,
# activation checkpointing, DDP). They are not part of any checkpoint name vLLM knows.
_WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.")
# Buffers some checkpoints carry that are not weights; vLLM's loaders skip them, sending them is waste.
_NOT_WEIGHTS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


# -- version and import -------------------------------------------------------------------------------------


def _release(version: str) -> tuple[int, ...]:
    """``"0.30.1rc2.dev5+gabc"`` -> ``(0, 30, 1)``: the numeric release, pre/dev/local parts dropped."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise UserError(
            f"vllm rollout: cannot read the installed vLLM version {version!r}; need {VLLM_REQUIREMENT}"
        )
    return tuple(int(part) for part in match.group(1).split("."))


def check_vllm_version(version: str) -> None:
    """Raise a one-line :class:`UserError` unless ``version`` is in the supported range."""
    release = _release(version)
    if not VLLM_MIN <= release[:2] < VLLM_BELOW:
        raise UserError(
            f"vllm rollout: vLLM {version} is installed but drpo-lightning supports {VLLM_REQUIREMENT} "
            f"(its weight-transfer API differs); run: {INSTALL_HINT}"
        )


def _import_vllm() -> Any:
    """vLLM itself, after checking it is installed, in the supported range and has the APIs used here."""
    try:
        import vllm
    except ModuleNotFoundError as err:
        if err.name != "vllm":
            raise UserError(f"vllm rollout: vLLM is installed but cannot be imported: {err}") from err
        raise UserError(f"the vllm rollout needs vLLM, which is not installed: {INSTALL_HINT}") from err
    except ImportError as err:
        raise UserError(f"vllm rollout: vLLM is installed but cannot be imported: {err}") from err
    check_vllm_version(getattr(vllm, "__version__", "0"))
    try:
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"vllm rollout: vLLM {vllm.__version__} has no weight_transfer.WeightTransferTrainerFactory "
            f"({err}); need {VLLM_REQUIREMENT}: {INSTALL_HINT}"
        ) from err
    return vllm


# -- sampling parameters and request payloads ----------------------------------------------------------------


def vllm_sampling_kwargs(
    sampling: SamplingParams,
    *,
    num_generations: int,
    seed: int | None,
    eos_token_ids: Sequence[int],
    topk: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt's ``num_generations`` samples.

    Every field that reshapes the distribution is given its neutral value explicitly, so a model's
    ``generation_config.json`` defaults cannot slip in. ``logprobs=topk`` returns the sampled token's
    log-prob plus ``topk`` alternatives (vLLM always adds the sampled one). Generation stops only at the
    trainer's EOS ids (``ignore_eos`` drops the model's own EOS, ``stop_token_ids`` adds ours), and vLLM keeps
    the stop token in ``token_ids``, as :class:`HFRollout` keeps EOS in the completion.
    """
    if sampling.top_p < 1.0 or sampling.top_k > 0 or sampling.min_new_tokens > 0:
        raise ConfigError(
            f"{_KEY}: the vllm rollout samples with top_p=1, top_k=0 and min_new_tokens=0 only; got "
            f"top_p={sampling.top_p}, top_k={sampling.top_k}, min_new_tokens={sampling.min_new_tokens}"
        )
    if not 0 <= topk <= MAX_LOGPROBS:
        raise ValueError(
            f"vllm rollout: topk must be in [0, {MAX_LOGPROBS}] (vLLM's max_logprobs), got {topk}"
        )
    return {
        "n": int(num_generations),
        "temperature": float(sampling.temperature),
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": int(sampling.max_new_tokens),
        "min_tokens": 0,
        "seed": None if seed is None else int(seed),
        "logprobs": int(topk),
        "stop_token_ids": [int(e) for e in eos_token_ids],
        "ignore_eos": True,
        "skip_special_tokens": False,
    }


def completion_payload(
    model: str, prompt: Sequence[int], sampling_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """JSON body of one ``POST /v1/completions`` request: token ids in, token ids and log-probs out.

    ``return_token_ids`` puts the sampled ids in each choice and ``return_tokens_as_token_ids`` names the
    top log-prob entries ``"token_id:<id>"``, so nothing depends on detokenising.
    """
    body = {"model": model, "prompt": [int(t) for t in prompt], "stream": False, "echo": False}
    body.update(sampling_kwargs)
    body["return_token_ids"] = True
    body["return_tokens_as_token_ids"] = True
    return body


def _request_seeds(base: int | None, call: int, num_prompts: int, num_generations: int) -> list[int]:
    """One seed per prompt request, reproducible from (``base``, call index, prompt index).

    vLLM seeds a request's ``n`` samples ``seed, seed + 1, ...``, so prompts are spaced ``num_generations``
    apart; ``base=None`` draws the start from torch's global generator (seeded by ``seed_everything``).
    """
    if base is None:
        start = int(torch.randint(0, 2**30, ()).item())
    else:
        digest = hashlib.blake2b(f"{base}:{call}".encode(), digest_size=4).digest()
        start = int.from_bytes(digest, "little") >> 2
    return [(start + b * num_generations) % 2**31 for b in range(num_prompts)]


# -- weight names --------------------------------------------------------------------------------------------


def vllm_weight_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainer's full state dict under the names vLLM's ``load_weights`` accepts.

    Those are the Hugging Face checkpoint names (``model.layers.0.self_attn.q_proj.weight``, ...): vLLM's
    Llama/Qwen2 loaders map them onto their fused parameters themselves. Wrapper prefixes are stripped and
    non-weight rotary buffers dropped. A PEFT model must be merged first (``merge_and_unload``): vLLM's model
    has no ``lora_A``/``lora_B`` parameters.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if "lora_A" in name or "lora_B" in name or name.startswith("base_model.model."):
            raise UserError(
                f"vllm rollout: weight {name!r} belongs to an un-merged LoRA/PEFT model; send "
                "merge_and_unload()'s state dict (vLLM loads plain Hugging Face weights)"
            )
        clean = name
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if clean.startswith(prefix):
                    clean, stripped = clean[len(prefix) :], True
            clean = clean.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
            clean = clean.replace("._checkpoint_wrapped_module.", ".")
        if any(part in clean for part in _NOT_WEIGHTS):
            continue
        if clean in out:
            raise UserError(f"vllm rollout: two state-dict entries map to the same weight {clean!r}")
        out[clean] = tensor
    return out


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    # An FSDP2 parameter is a DTensor shard; vLLM needs the whole weight.
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach()


class _StateDictSource:
    """A vLLM ``WeightSource`` over a state dict that :meth:`VLLMRollout.load_weights` swaps each round.

    ``metadata()`` and iteration list the same names, dtypes and shapes in the same order (vLLM's NCCL
    backend sizes its receive buffers from the metadata). Tensors are moved to ``device`` one at a time, as
    they are sent. At run time this mixin is combined with vLLM's ``WeightSource`` (see ``_make_source``).
    """

    def __init__(self, param_meta: Callable[..., Any], device: torch.device | str | None = None) -> None:
        self._param_meta = param_meta
        self._device = device
        self.tensors: dict[str, torch.Tensor] = {}

    def metadata(self) -> list[Any]:
        return [self._param_meta(name, t.dtype, tuple(t.shape)) for name, t in self.tensors.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.tensors.items():
            if self._device is not None:
                tensor = tensor.to(self._device, non_blocking=False)
            yield name, tensor.contiguous()


class _LLMClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol (four calls) over an in-process ``vllm.LLM``."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update()


# -- log-prob extraction -------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One completion as vLLM returned it."""

    token_ids: list[int]
    logprobs: list[float]
    """log mu of each sampled token."""
    topk: list[list[tuple[int, float]]] | None = None
    """Per position, the ``K`` most likely ``(token id, log-prob)`` pairs, best first."""


def _top(entries: Mapping[int, float], k: int) -> list[tuple[int, float]]:
    # The sampled token is always in vLLM's dict, so it holds K or K+1 entries; a sampled token outside the
    # top K has the smallest log-prob of them and falls off here.
    return sorted(entries.items(), key=lambda kv: -kv[1])[:k]


def samples_from_request_outputs(outputs: Sequence[Any], num_generations: int, topk: int = 0) -> list[Sample]:
    """``LLM.generate``'s ``RequestOutput`` list (one per prompt, in prompt order) -> ``B * G`` samples.

    Each ``CompletionOutput`` has ``token_ids`` and ``logprobs``: per position a mapping token id ->
    ``Logprob`` (with ``.logprob``), holding the sampled token and ``topk`` alternatives.
    """
    samples: list[Sample] = []
    for p, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != num_generations:
            raise RuntimeError(
                f"vllm rollout: prompt {p} came back with {len(completions)} completions, "
                f"expected n={num_generations}"
            )
        for completion in completions:
            ids = [int(t) for t in completion.token_ids]
            entries = completion.logprobs
            if entries is None or len(entries) != len(ids):
                got = None if entries is None else len(entries)
                raise RuntimeError(
                    f"vllm rollout: prompt {p} returned {got} log-prob entries for {len(ids)} tokens "
                    "(SamplingParams.logprobs must be set)"
                )
            logps: list[float] = []
            tops: list[list[tuple[int, float]]] = []
            for t, (token, entry) in enumerate(zip(ids, entries)):
                values = {int(k): float(v.logprob) for k, v in entry.items()}
                if token not in values:
                    raise RuntimeError(f"vllm rollout: no log-prob for sampled token {token} at position {t}")
                logps.append(values[token])
                if topk > 0:
                    tops.append(_top(values, topk))
            samples.append(Sample(ids, logps, tops if topk > 0 else None))
    return samples


def _token_id(key: str) -> int:
    if not key.startswith("token_id:"):
        raise RuntimeError(
            f"vllm rollout: the server named a token {key!r}, not 'token_id:<id>' "
            "(it ignored return_tokens_as_token_ids)"
        )
    return int(key[len("token_id:") :])


def samples_from_completion(response: Mapping[str, Any], num_generations: int, topk: int = 0) -> list[Sample]:
    """One prompt's ``/v1/completions`` JSON response (``n`` choices) -> ``n`` samples in choice order."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != num_generations:
        raise RuntimeError(
            f"vllm rollout: the server returned {len(choices)} choices for n={num_generations}"
        )
    samples = []
    for choice in choices:
        lp = choice.get("logprobs") or {}
        values = lp.get("token_logprobs")
        ids = choice.get("token_ids")
        if ids is None:
            ids = [_token_id(tok) for tok in lp.get("tokens") or []]
        ids = [int(t) for t in ids]
        if values is None or len(values) != len(ids):
            raise RuntimeError(
                f"vllm rollout: the server returned {None if values is None else len(values)} log-probs for "
                f"{len(ids)} tokens"
            )
        tops = None
        if topk > 0:
            tops = [
                _top({_token_id(k): float(v) for k, v in (entry or {}).items()}, topk)
                for entry in lp.get("top_logprobs") or []
            ]
            if len(tops) != len(ids):
                raise RuntimeError(
                    f"vllm rollout: the server returned {len(tops)} top-log-prob entries "
                    f"for {len(ids)} tokens"
                )
        samples.append(Sample(ids, [float(v) for v in values], tops))
    return samples


def build_batch(
    samples: Sequence[Sample],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_generations: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
    topk: int = 0,
    policy_version: int | None = None,
) -> RolloutBatch:
    """Lay ``B * G`` samples out as :class:`HFRollout` does: rows of one prompt adjacent, completions
    right-padded to ``max_new_tokens``, mask 1 up to and including the first EOS, log-probs (and top-K) zeroed
    / padded where the mask is 0, ``truncated`` where no EOS was emitted."""
    batch = prompt_ids.shape[0]
    rows = batch * num_generations
    if len(samples) != rows:
        raise RuntimeError(
            f"vllm rollout: {len(samples)} completions for {batch} prompts x {num_generations}"
        )
    width = max_new_tokens
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    logps = torch.zeros(rows, width, dtype=torch.float32)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    truncated = torch.ones(rows, dtype=torch.bool)
    top_lp = torch.zeros(rows, width, topk, dtype=torch.float32) if topk > 0 else None
    top_ids = torch.full((rows, width, topk), pad_token_id, dtype=torch.long) if topk > 0 else None
    eos = {int(e) for e in eos_token_ids}
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        if n > width:
            raise RuntimeError(
                f"vllm rollout: completion {row} has {n} tokens, more than max_new_tokens={width}"
            )
        end = next((t + 1 for t, tok in enumerate(sample.token_ids) if tok in eos), None)
        truncated[row] = end is None
        keep = n if end is None else end
        if keep == 0:
            continue
        ids[row, :keep] = torch.tensor(sample.token_ids[:keep], dtype=torch.long)
        row_logps = torch.tensor(sample.logprobs[:keep], dtype=torch.float64)
        if not bool(torch.isfinite(row_logps).all()):
            raise RuntimeError(f"vllm rollout: completion {row} has a non-finite behaviour log-prob")
        logps[row, :keep] = row_logps.float()
        mask[row, :keep] = True
        if top_lp is not None and top_ids is not None and sample.topk is not None:
            for t in range(keep):
                pairs = sample.topk[t]
                if len(pairs) < topk:
                    raise RuntimeError(
                        f"vllm rollout: {len(pairs)} top log-probs at position {t}, need {topk}"
                    )
                top_ids[row, t] = torch.tensor([tok for tok, _ in pairs], dtype=torch.long)
                top_lp[row, t] = torch.tensor([v for _, v in pairs], dtype=torch.float32)
    device = prompt_ids.device
    version = None if policy_version is None else torch.full((rows,), int(policy_version), dtype=torch.long)
    return RolloutBatch(
        prompt_ids=prompt_ids.long().repeat_interleave(num_generations, dim=0),
        prompt_mask=prompt_mask.long().repeat_interleave(num_generations, dim=0),
        completion_ids=ids.to(device),
        completion_mask=mask.float().to(device),
        behavior_logprobs=logps.to(device),
        truncated=truncated.to(device),
        group_ids=torch.arange(batch, device=device).repeat_interleave(num_generations),
        topk_logprobs=None if top_lp is None else top_lp.to(device),
        topk_ids=None if top_ids is None else top_ids.to(device),
        policy_version=None if version is None else version.to(device),
    )


# -- HTTP ----------------------------------------------------------------------------------------------------


def _http_json(method: str, url: str, payload: Any = None, timeout: float = 60.0) -> Any:
    """One JSON request; any failure is a RuntimeError naming the URL (the worker) and the cause."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode(errors="replace")
        raise RuntimeError(f"vllm rollout: {method} {url} failed with HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise RuntimeError(f"vllm rollout: {method} {url} failed after at most {timeout:g}s: {err}") from err
    return json.loads(body) if body else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


# -- the engine ----------------------------------------------------------------------------------------------


class VLLMRollout(RolloutEngine):
    """Sample completions with vLLM and report their behaviour log-probs (see the module docstring).

    Not yet run with a real vLLM: see the module docstring for what is tested.

    Args:
        model: Model folder (or hub name) vLLM starts from. Colocated: ``None`` saves the policy given to the
            first :meth:`generate` to a temporary folder (``save_pretrained``) and starts from that, without a
            tokenizer. Server: the name the server serves (``--served-model-name``); with ``launch_server``
            also what it loads.
        mode: ``"colocated"`` (in-process ``vllm.LLM``) or ``"server"`` (``vllm serve`` at ``server_url``).
        max_new_tokens: Most tokens per completion; every batch is padded to it.
        temperature: Softmax temperature (> 0); the behaviour log-probs are those of the scaled distribution.
        top_p: Must stay 1.0 (refused otherwise; see the module docstring).
        top_k: Must stay 0 (refused otherwise).
        min_new_tokens: Must stay 0 (refused otherwise).
        seed: Base of the per-prompt request seeds (reproducible rollouts); ``None`` draws them from torch's
            global generator, which ``seed_everything`` seeds.
        dtype: vLLM's weight dtype (``"auto"``, ``"bfloat16"``, ``"float16"``, ``"float32"``). Sampling in a
            lower precision than the trainer is a source of the off-policy gap DRPO/DPPO control.
        gpu_memory_utilization: Colocated: fraction of the GPU vLLM may take (weights + KV cache); the rest is
            the trainer's.
        max_model_len: Longest prompt + completion vLLM plans for (``None``: the model's).
        enforce_eager: Colocated: skip CUDA graphs (faster start, slower decoding).
        server_url: Server mode: base URL of the ``vllm serve`` process.
        launch_server: Server mode: start ``vllm serve`` with :meth:`server_command` and wait for it.
        server_gpu: With ``launch_server``: ``CUDA_VISIBLE_DEVICES`` for the server process.
        weight_sync_address: Server mode: address of this (trainer) host that the server reaches for the
            NCCL weight broadcast (``None``: this host's name resolved).
        weight_sync_port: Server mode: NCCL rendezvous port (0: a free one).
        timeout_s: Limit of every HTTP request (the weight-update calls included) and of the server start,
            in seconds.
        llm_kwargs: Colocated: more ``vllm.LLM`` arguments (they override the ones above).
    """

    def __init__(
        self,
        model: str | None = None,
        mode: str = "colocated",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_new_tokens: int = 0,
        seed: int | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        server_url: str = "http://127.0.0.1:8000",
        launch_server: bool = False,
        server_gpu: str | None = None,
        weight_sync_address: str | None = None,
        weight_sync_port: int = 0,
        timeout_s: float = 300.0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ConfigError(f"{_KEY}.mode: must be one of {', '.join(_MODES)}; got {mode!r}")
        try:
            self.sampling = SamplingParams(
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
            )
        except ValueError as err:
            raise ConfigError(f"{_KEY}: {err}") from err
        if top_p < 1.0 or top_k > 0:
            raise ConfigError(
                f"{_KEY}.top_p/top_k: the vllm rollout cannot use top_p={top_p}, top_k={top_k}: vLLM's "
                "log-probs are then normalised over the truncated support, which the trainer cannot "
                "recompute without vLLM's sampling mask (not supported yet); use top_p: 1.0 and top_k: 0"
            )
        if min_new_tokens > 0:
            raise ConfigError(
                f"{_KEY}.min_new_tokens: the vllm rollout needs 0 (vLLM's EOS suppression changes the "
                f"reported log-probs); got {min_new_tokens}"
            )
        if mode == "server" and model is None:
            raise ConfigError(f"{_KEY}.model: server mode needs the served model name")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(
                f"{_KEY}.gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization}"
            )
        if timeout_s <= 0:
            raise ConfigError(f"{_KEY}.timeout_s: must be > 0, got {timeout_s}")
        _import_vllm()  # fail now, with one line, rather than at the first rollout
        self.model = model
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.server_url = server_url.rstrip("/")
        self.launch_server = launch_server
        self.server_gpu = server_gpu
        self.weight_sync_address = weight_sync_address
        self.weight_sync_port = weight_sync_port
        self.timeout_s = float(timeout_s)
        self.llm_kwargs = dict(llm_kwargs or {})
        self._http: Callable[..., Any] = _http_json
        self._llm: Any = None
        self._model_dir: tempfile.TemporaryDirectory | None = None
        self._server: subprocess.Popen | None = None
        self._sender: Any = None
        self._source: Any = None
        self._calls = 0
        self._checked = False
        # Colocated: generate() pushes the policy it is given before sampling until load_weights() is first
        # called; the push is skipped once, right after the LLM was built from that very policy.
        self._auto_push = True
        self._fresh_from_policy = False

    def __repr__(self) -> str:
        return (
            f"VLLMRollout(model={self.model!r}, mode={self.mode!r}, max_new_tokens={self.max_new_tokens}, "
            f"temperature={self.sampling.temperature}, seed={self.seed}, dtype={self.dtype!r})"
        )

    # -- vLLM processes --------------------------------------------------------------------------------------

    def llm_args(self, model_path: str, *, tokenizer: bool = True) -> dict[str, Any]:
        """Arguments of the colocated ``vllm.LLM`` (without ``weight_transfer_config``, added at build)."""
        args: dict[str, Any] = {
            "model": model_path,
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "logprobs_mode": "processed_logprobs",
            # The model's generation_config.json would set default top_p/top_k/penalties.
            "generation_config": "vllm",
            "max_logprobs": MAX_LOGPROBS,
            "seed": 0 if self.seed is None else int(self.seed),
        }
        if self.max_model_len is not None:
            args["max_model_len"] = int(self.max_model_len)
        if not tokenizer:
            args["skip_tokenizer_init"] = True
        args.update(self.llm_kwargs)
        return args

    def server_command(self, port: int | None = None) -> tuple[list[str], dict[str, str]]:
        """``vllm serve`` argv and the environment variables this engine needs the server to run with."""
        if port is None:
            port = urllib.parse.urlsplit(self.server_url).port or 8000
        argv = [
            "vllm",
            "serve",
            str(self.model),
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--logprobs-mode",
            "processed_logprobs",
            "--generation-config",
            "vllm",
            "--max-logprobs",
            str(MAX_LOGPROBS),
            "--weight-transfer-config",
            json.dumps({"backend": "nccl"}),
            # pause, the weight-update routes and resume must all reach the same API process.
            "--api-server-count",
            "1",
        ]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        return argv, {"VLLM_SERVER_DEV_MODE": "1"}

    def _build_llm(self, policy: torch.nn.Module | None) -> None:
        path, tokenizer = self.model, True
        if path is None:
            save = getattr(policy, "save_pretrained", None)
            if save is None:
                raise ConfigError(
                    f"{_KEY}.model: the policy has no save_pretrained to start vLLM from; "
                    "give the model folder"
                )
            self._model_dir = tempfile.TemporaryDirectory(prefix="drpo-vllm-")
            save(self._model_dir.name)
            path, tokenizer = self._model_dir.name, False
            self._fresh_from_policy = True
        # vLLM's engine core runs in a child process; CUDA IPC handles reach it pickled, which vLLM only
        # accepts with this set (its IPC weight-transfer documentation says the same).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm.config import WeightTransferConfig

        args = self.llm_args(path, tokenizer=tokenizer)
        args.setdefault("weight_transfer_config", WeightTransferConfig(backend="ipc"))
        self._llm = _import_vllm().LLM(**args)

    def _start_server(self) -> None:
        argv, env = self.server_command()
        if self.server_gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.server_gpu
        log.info("vllm rollout: starting %s", " ".join(argv))
        self._server = subprocess.Popen(argv, env={**os.environ, **env})
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._server.poll() is not None:
                raise RuntimeError(
                    f"vllm rollout: `vllm serve` exited with code {self._server.returncode} on start"
                )
            try:
                self._http("GET", f"{self.server_url}/health", None, 5.0)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"vllm rollout: {self.server_url} not healthy {self.timeout_s:g}s after "
                        "starting vllm serve"
                    ) from None
                time.sleep(2.0)

    def _check_server(self) -> None:
        # /server_info exists in dev mode, which weight transfer needs anyway; it shows the engine config.
        info = self._http("GET", f"{self.server_url}/server_info", None, self.timeout_s)
        text = json.dumps(info)
        if "logprobs_mode" in text and "processed_logprobs" not in text:
            raise UserError(
                f"vllm rollout: the server at {self.server_url} does not return processed log-probs; "
                "start it with --logprobs-mode processed_logprobs (see VLLMRollout.server_command)"
            )

    def _ensure_started(self, policy: torch.nn.Module | None) -> None:
        if self.mode == "colocated":
            if self._llm is None:
                self._build_llm(policy)
            return
        if self._server is None and self.launch_server:
            self._start_server()
        if not self._checked:
            self._checked = True
            try:
                self._check_server()
            except RuntimeError as err:  # /server_info needs dev mode; generation alone does not
                log.warning("vllm rollout: could not check the server's logprobs mode: %s", err)

    def close(self) -> None:
        """Stop a server this engine launched and drop the in-process LLM."""
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._server.kill()
        self._server = None
        self._llm = None
        self._sender = None
        if self._model_dir is not None:
            self._model_dir.cleanup()
            self._model_dir = None

    # -- weight sync -----------------------------------------------------------------------------------------

    def _make_source(self) -> Any:
        from vllm.distributed.weight_transfer import ParamMeta, WeightSource

        cls = type("DrpoStateDictSource", (_StateDictSource, WeightSource), {})
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else None
        return cls(ParamMeta, device)

    def _make_sender(self, source: Any) -> Any:
        """vLLM's trainer-side engine: IPC into the in-process LLM, or NCCL to the server."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        if self.mode == "colocated":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            return WeightTransferTrainerFactory.trainer_init(
                init_info=IPCTrainerInitInfo(rank=0), client=_LLMClient(self._llm), source=source
            )
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        workers = self._http("GET", f"{self.server_url}/get_world_size", None, self.timeout_s)["world_size"]
        address = self.weight_sync_address or socket.gethostbyname(socket.gethostname())
        return WeightTransferTrainerFactory.trainer_init(
            init_info=NCCLTrainerInitInfo(
                master_address=address,
                master_port=self.weight_sync_port or _free_port(),
                world_size=int(workers) + 1,
                rank=0,
            ),
            client=HTTPVLLMWeightSyncClient(self.server_url, timeout=self.timeout_s),
            source=source,
        )

    def _send(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        tensors = {name: _full_tensor(t) for name, t in vllm_weight_names(state_dict).items()}
        if self._source is None:
            self._source = self._make_source()
        self._source.tensors = tensors
        if self._sender is None:
            self._sender = self._make_sender(self._source)
        start = time.monotonic()
        self._sender.send_weights()
        # Cached prompt KV was computed with the old weights; reusing it would sample from neither version.
        if self.mode == "colocated":
            self._llm.reset_prefix_cache()
        else:
            self._http("POST", f"{self.server_url}/reset_prefix_cache", None, self.timeout_s)
        log.debug("vllm rollout: sent %d tensors in %.3fs", len(tensors), time.monotonic() - start)

    def load_weights(self, state_dict: dict[str, torch.Tensor] | None, version: int) -> None:
        """Send the trainer's full (unsharded) state dict to vLLM; later rollouts sample with it, as
        ``version``.

        Server mode pauses the server around the transfer. From the first call on, a colocated engine no
        longer pushes the policy itself before each rollout: the caller's schedule (staleness) decides what
        vLLM samples with. ``state_dict=None`` is refused: vLLM keeps its own copy of the weights.
        """
        if state_dict is None:
            raise ValueError(
                "vllm rollout: load_weights needs the state dict (vLLM keeps its own copy of the weights)"
            )
        if self.mode == "colocated" and self._llm is None:
            if self.model is None:
                raise RuntimeError(
                    "vllm rollout: colocated load_weights before the first generate needs `model` set"
                )
            self._build_llm(None)
        self._ensure_started(None)
        if self.mode == "server":
            self.pause()
            try:
                self._send(state_dict)
            finally:
                self.resume()
        else:
            self._send(state_dict)
        self._auto_push = False
        super().load_weights(None, version)

    def pause(self) -> None:
        """Server mode: stop the server starting new generations (``POST /pause``). Colocated: nothing runs
        between calls."""
        if self.mode == "server":
            self._http("POST", f"{self.server_url}/pause", None, self.timeout_s)

    def resume(self) -> None:
        """Server mode: ``POST /resume``."""
        if self.mode == "server":
            self._http("POST", f"{self.server_url}/resume", None, self.timeout_s)

    # -- sampling --------------------------------------------------------------------------------------------

    def _prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
        ids, mask = prompt_ids.detach().cpu(), prompt_mask.detach().cpu().bool()
        return [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]

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

        The batch has the layout of :class:`HFRollout`'s. ``policy_version`` is the version of the last
        :meth:`load_weights`, or None when the colocated engine pushed ``policy`` itself before sampling.
        """
        if num_generations < 1:
            raise ValueError(f"vllm rollout: num_generations must be >= 1, got {num_generations}")
        if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(
                "vllm rollout: prompt_ids and prompt_mask must both be [B, P]; got "
                f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}"
            )
        if prompt_ids.shape[1] == 0 or not bool(prompt_mask[:, -1].bool().all()):
            raise ValueError(
                "vllm rollout: prompts must be left-padded (prompt_mask[:, -1] all 1) and non-empty"
            )
        eos_ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        if not eos_ids:
            raise ValueError("vllm rollout: eos_token_id must name at least one token")
        prompts = self._prompts(prompt_ids, prompt_mask)
        seeds = _request_seeds(self.seed, self._calls, len(prompts), num_generations)
        self._calls += 1
        kwargs = [
            vllm_sampling_kwargs(
                self.sampling, num_generations=num_generations, seed=s, eos_token_ids=eos_ids, topk=topk
            )
            for s in seeds
        ]
        self._ensure_started(policy)
        version: int | None = self.policy_version
        if self.mode == "colocated":
            if self._auto_push:
                if not self._fresh_from_policy:
                    self._send(policy.state_dict())
                version = None  # sampled with the trainer's current weights
            self._fresh_from_policy = False
            samples = self._generate_colocated(prompts, kwargs, num_generations, topk)
        else:
            samples = self._generate_server(prompts, kwargs, num_generations, topk)
        return build_batch(
            samples,
            prompt_ids,
            prompt_mask,
            num_generations=num_generations,
            eos_token_ids=eos_ids,
            pad_token_id=pad_token_id,
            max_new_tokens=self.max_new_tokens,
            topk=topk,
            policy_version=version,
        )

    def _generate_colocated(
        self, prompts: list[list[int]], kwargs: list[dict[str, Any]], num_generations: int, topk: int
    ) -> list[Sample]:
        # detokenize=False: only token ids are used, and a tokenizer-less LLM could not detokenize anyway.
        params = [_import_vllm().SamplingParams(**kw, detokenize=False) for kw in kwargs]
        outputs = self._llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return samples_from_request_outputs(outputs, num_generations, topk)

    def _generate_server(
        self, prompts: list[list[int]], kwargs: list[dict[str, Any]], num_generations: int, topk: int
    ) -> list[Sample]:
        url = f"{self.server_url}/v1/completions"
        bodies = [completion_payload(str(self.model), p, kw) for p, kw in zip(prompts, kwargs)]
        # One request per prompt (each with its own seed), sent together so the server batches them.
        with ThreadPoolExecutor(max_workers=min(len(bodies), 64)) as pool:
            responses = list(pool.map(lambda body: self._http("POST", url, body, self.timeout_s), bodies))
        samples: list[Sample] = []
        for response in responses:
            samples.extend(samples_from_completion(response, num_generations, topk))
        return samples
