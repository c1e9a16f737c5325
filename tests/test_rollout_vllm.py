"""VLLMRollout without vLLM: sampling parameters, request payloads, weight names, log-prob extraction into
the HFRollout batch layout, and the weight-sync protocol, against fake objects shaped like vLLM's documented
API (``RequestOutput`` / ``CompletionOutput`` / ``Logprob``, ``/v1/completions`` JSON, the weight-transfer
trainer engine). The one test with a real vLLM is marked ``gpu`` and skips without vLLM.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from drpo_lightning.errors import ConfigError, UserError
from drpo_lightning.rollouts import vllm as rv
from drpo_lightning.types import SamplingParams

PAD, EOS, EOS2 = 0, 2, 3

# Field names of vllm.SamplingParams and of the /v1/completions request body as vLLM documents them
# (vllm/sampling_params.py; the OpenAI completion request plus vLLM's extra parameters). A misspelt key would
# only fail with a real vLLM (SamplingParams rejects unknown keywords; a server may ignore unknown fields), so
# the names are pinned here.


def _names(text: str) -> set[str]:
    return set(text.split())


VLLM_SAMPLING_FIELDS = _names(
    """n presence_penalty frequency_penalty repetition_penalty temperature top_p top_k min_p seed stop
    stop_token_ids ignore_eos max_tokens min_tokens logprobs prompt_logprobs flat_logprobs detokenize
    skip_special_tokens spaces_between_special_tokens include_stop_str_in_output output_kind logit_bias
    allowed_token_ids bad_words"""
)
VLLM_COMPLETION_FIELDS = _names(
    """model prompt stream echo n max_tokens temperature top_p top_k min_p seed presence_penalty
    frequency_penalty repetition_penalty logprobs stop_token_ids ignore_eos min_tokens skip_special_tokens
    return_token_ids return_tokens_as_token_ids"""
)


# -- fakes shaped like vLLM's output objects -----------------------------------------------------------------


class Logprob(NamedTuple):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text: str = ""
    cumulative_logprob: float | None = None
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def completion(index: int, tokens: list[int], logps: list[float], alts: list[dict[int, float]] | None = None):
    """A CompletionOutput whose position t holds the sampled token (logps[t]) plus alternatives alts[t]."""
    entries = []
    for t, (tok, lp) in enumerate(zip(tokens, logps)):
        entry = {tok: Logprob(lp)}
        for k, v in (alts[t] if alts else {}).items():
            entry[k] = Logprob(v)
        entries.append(entry)
    return CompletionOutput(index=index, token_ids=list(tokens), logprobs=entries)


# -- a fake vllm package (only what the engine touches) ------------------------------------------------------


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - VLLM_SAMPLING_FIELDS
        assert not unknown, f"not a vllm.SamplingParams field: {unknown}"
        self.kwargs = kwargs


class FakeLLM:
    instances: list[FakeLLM] = []
    script: Any = None  # (prompt_token_ids, FakeSamplingParams) -> list[CompletionOutput]

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.generate_calls: list[tuple[list, list]] = []
        self.rpc: list[tuple[str, Any]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.generate_calls.append((prompts, sampling_params))
        return [
            RequestOutput(str(i), p["prompt_token_ids"], FakeLLM.script(p["prompt_token_ids"], sp))
            for i, (p, sp) in enumerate(zip(prompts, sampling_params))
        ]

    # the four documented weight-transfer methods of vllm.LLM
    def init_weight_transfer_engine(self, request):
        self.rpc.append(("init", request))

    def start_weight_update(self):
        self.rpc.append(("start", None))

    def update_weights(self, request):
        self.rpc.append(("update", request))

    def finish_weight_update(self, weight_version=None):
        self.rpc.append(("finish", weight_version))

    def reset_prefix_cache(self):
        self.rpc.append(("reset_prefix_cache", None))


class ParamMeta(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightSource:
    """Stands in for vLLM's ABC: a re-iterable source of (name, full tensor) with matching metadata()."""


@dataclass
class IPCTrainerInitInfo:
    rank: int = field(kw_only=True)
    packed: bool = False


@dataclass
class NCCLTrainerInitInfo:
    master_address: str
    master_port: int
    world_size: int
    rank: int = field(kw_only=True)
    packed: bool = True


class HTTPVLLMWeightSyncClient:
    def __init__(self, base_url: str, timeout: float = 300) -> None:
        self.base_url, self.timeout = base_url, timeout


class FakeTrainerEngine:
    """Drives the documented round: start, update (names/dtypes/shapes from metadata), finish."""

    def __init__(self, init_info, client, source) -> None:
        self.init_info, self.client, self.source = init_info, client, source
        self.sent: list[dict[str, torch.Tensor]] = []
        if hasattr(client, "init_weight_transfer_engine"):
            client.init_weight_transfer_engine({"rank_offset": 1})

    def send_weights(self) -> None:
        meta = self.source.metadata()
        got = dict(iter(self.source))
        assert [m.name for m in meta] == list(got), "metadata() and iteration disagree"
        for m in meta:
            assert got[m.name].dtype == m.dtype and tuple(got[m.name].shape) == m.shape
        if hasattr(self.client, "start_weight_update"):
            self.client.start_weight_update()
            self.client.update_weights({"names": [m.name for m in meta]})
            self.client.finish_weight_update()
        self.sent.append(got)


class WeightTransferTrainerFactory:
    engines: list[FakeTrainerEngine] = []

    @classmethod
    def trainer_init(cls, init_info, *, client, source=None):
        engine = FakeTrainerEngine(init_info, client, source)
        cls.engines.append(engine)
        return engine


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install a fake ``vllm`` package at version 0.30.0 with the modules and names the engine imports."""
    FakeLLM.instances = []
    FakeLLM.script = None
    WeightTransferTrainerFactory.engines = []
    root = types.ModuleType("vllm")
    root.__version__ = "0.30.0"
    root.LLM = FakeLLM
    root.SamplingParams = FakeSamplingParams
    config = types.ModuleType("vllm.config")
    config.WeightTransferConfig = lambda backend: ("WeightTransferConfig", backend)
    wt = types.ModuleType("vllm.distributed.weight_transfer")
    wt.WeightTransferTrainerFactory = WeightTransferTrainerFactory
    wt.WeightSource = WeightSource
    wt.ParamMeta = ParamMeta
    wt.HTTPVLLMWeightSyncClient = HTTPVLLMWeightSyncClient
    ipc = types.ModuleType("vllm.distributed.weight_transfer.ipc_engine")
    ipc.IPCTrainerInitInfo = IPCTrainerInitInfo
    nccl = types.ModuleType("vllm.distributed.weight_transfer.nccl_engine")
    nccl.NCCLTrainerInitInfo = NCCLTrainerInitInfo
    modules = {
        "vllm": root,
        "vllm.config": config,
        "vllm.distributed": types.ModuleType("vllm.distributed"),
        "vllm.distributed.weight_transfer": wt,
        "vllm.distributed.weight_transfer.ipc_engine": ipc,
        "vllm.distributed.weight_transfer.nccl_engine": nccl,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    # Sources move tensors to the GPU when there is one; the fakes compare them on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return root


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# -- import and version --------------------------------------------------------------------------------------


def test_module_imports_without_vllm():
    code = (
        "import sys, importlib.util\n"
        "import drpo_lightning.rollouts.vllm as m\n"
        "assert 'vllm' not in sys.modules, 'vllm imported eagerly'\n"
        "print(m.VLLM_REQUIREMENT)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "vllm>=0.28,<0.35"


def test_constructing_without_vllm_is_one_line_pip_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(UserError) as info:
        rv.VLLMRollout(model="m")
    assert 'pip install "drpo-lightning[vllm]"' in _one_line(info.value)


def test_drpo_fit_without_vllm_is_one_line_pip_hint(tmp_path):
    """What a user sees choosing the vllm rollout where vLLM is missing: one line, exit code 2, no
    traceback."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    root = Path(__file__).resolve().parents[1]
    args = [
        "fit", "--config", str(root / "configs" / "quickstart.yaml"), "--trainer.logger=false",
        "--trainer.callbacks=null", "--trainer.enable_checkpointing=false", "--trainer.max_steps=1",
        f"--trainer.default_root_dir={tmp_path}", "--model.export_dir=",
        "--model.rollout=drpo_lightning.rollouts.vllm.VLLMRollout",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "drpo_lightning.cli", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if line.startswith("drpo: error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert errors == [
        'drpo: error: the vllm rollout needs vLLM, which is not installed: pip install "drpo-lightning[vllm]"'
    ]


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.28.0", True),
        ("0.34.0", True),
        ("0.30.1.dev5+gabc123", True),
        ("0.31.0rc1", True),
        ("0.27.1", False),
        ("0.16.0", False),
        ("0.35.0", False),
        ("1.0.0", False),
    ],
)
def test_version_range(version, ok):
    if ok:
        rv.check_vllm_version(version)
    else:
        with pytest.raises(UserError) as info:
            rv.check_vllm_version(version)
        message = _one_line(info.value)
        assert version in message and "vllm>=0.28,<0.35" in message


def test_out_of_range_vllm_refused_at_construction(fake_vllm):
    fake_vllm.__version__ = "0.27.1"
    with pytest.raises(UserError) as info:
        rv.VLLMRollout(model="m")
    assert "0.27.1" in _one_line(info.value)


def test_vllm_without_trainer_engine_refused(fake_vllm, monkeypatch):
    monkeypatch.delattr(sys.modules["vllm.distributed.weight_transfer"], "WeightTransferTrainerFactory")
    with pytest.raises(UserError) as info:
        rv.VLLMRollout(model="m")
    assert "WeightTransferTrainerFactory" in _one_line(info.value)


# -- configuration refused before vLLM is needed -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"top_p": 0.9}, "top_p"),
        ({"top_k": 20}, "top_k"),
        ({"min_new_tokens": 2}, "min_new_tokens"),
        ({"mode": "remote"}, "mode"),
        ({"temperature": 0.0}, "temperature"),
        ({"mode": "server", "model": None}, "model"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ],
    ids=["top_p", "top_k", "min_new_tokens", "mode", "temperature", "server_without_model", "gpu_fraction"],
)
def test_bad_config_is_one_line_config_error_without_vllm(monkeypatch, kwargs, key):
    monkeypatch.setitem(sys.modules, "vllm", None)  # the check must not need vLLM
    with pytest.raises(ConfigError) as info:
        rv.VLLMRollout(**{"model": "m", **kwargs})
    message = _one_line(info.value)
    assert message.startswith("model.rollout.init_args") and key in message


# -- sampling-parameter translation and request payloads -----------------------------------------------------


def test_sampling_kwargs_translate_and_neutralise():
    sampling = SamplingParams(max_new_tokens=7, temperature=0.7)
    kw = rv.vllm_sampling_kwargs(sampling, num_generations=4, seed=123, eos_token_ids=[EOS, EOS2], topk=5)
    assert set(kw) <= VLLM_SAMPLING_FIELDS
    assert kw["n"] == 4 and kw["max_tokens"] == 7 and kw["seed"] == 123 and kw["logprobs"] == 5
    assert kw["temperature"] == pytest.approx(0.7, abs=0)
    # every other distribution-shaping field explicitly neutral
    assert (kw["top_p"], kw["top_k"], kw["min_p"], kw["min_tokens"]) == (1.0, 0, 0.0, 0)
    assert (kw["repetition_penalty"], kw["presence_penalty"], kw["frequency_penalty"]) == (1.0, 0.0, 0.0)
    assert kw["stop_token_ids"] == [EOS, EOS2] and kw["ignore_eos"] is True
    assert (
        rv.vllm_sampling_kwargs(sampling, num_generations=1, seed=None, eos_token_ids=[EOS])["logprobs"] == 0
    )


@pytest.mark.parametrize("bad", [{"top_p": 0.95}, {"top_k": 50}, {"min_new_tokens": 1}])
def test_sampling_kwargs_refuse_truncation(bad):
    with pytest.raises(ConfigError):
        rv.vllm_sampling_kwargs(SamplingParams(**bad), num_generations=2, seed=0, eos_token_ids=[EOS])


def test_sampling_kwargs_refuse_more_than_20_top_logprobs():
    with pytest.raises(ValueError, match="max_logprobs"):
        rv.vllm_sampling_kwargs(SamplingParams(), num_generations=2, seed=0, eos_token_ids=[EOS], topk=21)


def test_completion_payload():
    kw = rv.vllm_sampling_kwargs(
        SamplingParams(max_new_tokens=5, temperature=0.5),
        num_generations=3,
        seed=9,
        eos_token_ids=[EOS],
        topk=2,
    )
    body = rv.completion_payload("policy", [5, 6, 7], kw)
    assert set(body) <= VLLM_COMPLETION_FIELDS
    assert body["model"] == "policy" and body["prompt"] == [5, 6, 7]
    assert (body["n"], body["max_tokens"], body["seed"], body["logprobs"]) == (3, 5, 9, 2)
    assert body["return_token_ids"] is True and body["return_tokens_as_token_ids"] is True
    assert body["stream"] is False


def test_request_seeds_reproducible_spaced_and_fresh_per_call():
    a = rv._request_seeds(7, 0, 3, 4)
    assert a == rv._request_seeds(7, 0, 3, 4)
    assert [s - a[0] for s in a] == [0, 4, 8]  # vLLM seeds a request's n samples seed, seed+1, ...
    assert rv._request_seeds(7, 1, 3, 4) != a and rv._request_seeds(8, 0, 3, 4) != a
    torch.manual_seed(0)
    b = rv._request_seeds(None, 0, 2, 4)
    torch.manual_seed(0)
    assert rv._request_seeds(None, 5, 2, 4) == b  # base None: follows torch's (seed_everything'd) generator


# -- weight names --------------------------------------------------------------------------------------------


def _tiny(kind: str) -> torch.nn.Module:
    common = dict(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))


# What vLLM's Llama / Qwen2 ``load_weights`` do with a Hugging Face name: a q/k/v or gate/up projection is
# loaded as a shard of the fused qkv_proj / gate_up_proj; every other name must equal a vLLM parameter name,
# which for these models is the Hugging Face name itself.
_SHARDS = (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")
_DIRECT = (
    r"model\.embed_tokens\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.o_proj\.weight",
    r"model\.layers\.\d+\.mlp\.down_proj\.weight",
)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_names_are_what_vllm_loads(kind):
    import re

    model = _tiny(kind)
    state = model.state_dict()
    mapped = rv.vllm_weight_names(state)
    assert list(mapped) == list(state)  # unchanged, in order
    for name in mapped:
        assert any(s in name for s in _SHARDS) or any(re.fullmatch(p, name) for p in _DIRECT), name
    if kind == "qwen2":  # Qwen2's q/k/v biases are shards too
        assert "model.layers.0.self_attn.q_proj.bias" in mapped


def test_wrapper_prefixes_stripped_and_rotary_buffers_dropped():
    state = _tiny("llama").state_dict()
    wrapped = {
        f"_orig_mod.{k}".replace("layers.0.", "layers.0._fsdp_wrapped_module."): v for k, v in state.items()
    }
    wrapped["_orig_mod.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    mapped = rv.vllm_weight_names(wrapped)
    assert list(mapped) == list(state)
    assert all(mapped[k] is state[k] for k in state)


def test_unmerged_lora_and_name_collisions_refused():
    with pytest.raises(UserError, match="merge_and_unload"):
        rv.vllm_weight_names(
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(1)}
        )
    with pytest.raises(UserError, match="same weight"):
        rv.vllm_weight_names(
            {"model.norm.weight": torch.ones(1), "_orig_mod.model.norm.weight": torch.ones(1)}
        )


def test_state_dict_source_channels_agree():
    source = rv._StateDictSource(ParamMeta)
    source.tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    assert source.metadata() == [ParamMeta("a", torch.float32, (2, 3)), ParamMeta("b", torch.bfloat16, (4,))]
    first, second = list(source), list(source)  # re-iterable: a fresh pass each round
    assert [n for n, _ in first] == [n for n, _ in second] == ["a", "b"]


# -- log-prob extraction into the batch layout ---------------------------------------------------------------


def _scripted_outputs():
    """2 prompts x G=2 completions, max_new_tokens=4: EOS mid-way, EOS2 as last token, no EOS (truncated),
    and an immediate EOS. Log-probs are distinct float64 values so misplacement shows."""
    return [
        RequestOutput(
            "0",
            [5, 6],
            [
                completion(1, [9, EOS2, 0, 0][:2], [-0.25, -1.5]),  # given out of index order on purpose
                completion(0, [7, 8, EOS], [-0.125, -2.0625, -0.3125]),
            ],
        ),
        RequestOutput(
            "1",
            [6],
            [
                completion(0, [4, 5, 6, 7], [-1.0, -0.5, -0.75, -3.25]),
                completion(1, [EOS], [-0.0625]),
            ],
        ),
    ]


def test_request_outputs_to_batch_layout():
    samples = rv.samples_from_request_outputs(_scripted_outputs(), num_generations=2)
    prompt_ids = torch.tensor([[5, 6], [PAD, 6]])
    prompt_mask = torch.tensor([[1, 1], [0, 1]])
    batch = rv.build_batch(
        samples,
        prompt_ids,
        prompt_mask,
        num_generations=2,
        eos_token_ids=[EOS, EOS2],
        pad_token_id=PAD,
        max_new_tokens=4,
        policy_version=3,
    )
    assert batch.completion_ids.tolist() == [
        [7, 8, EOS, PAD],
        [9, EOS2, PAD, PAD],
        [4, 5, 6, 7],
        [EOS, PAD, PAD, PAD],
    ]
    assert batch.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    expected = torch.tensor(
        [[-0.125, -2.0625, -0.3125, 0], [-0.25, -1.5, 0, 0], [-1.0, -0.5, -0.75, -3.25], [-0.0625, 0, 0, 0]],
        dtype=torch.float64,
    )
    assert batch.behavior_logprobs.dtype == torch.float32
    torch.testing.assert_close(batch.behavior_logprobs.double(), expected, rtol=0, atol=1e-7)
    assert batch.truncated.tolist() == [False, False, True, False]
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.prompt_ids.tolist() == [[5, 6], [5, 6], [PAD, 6], [PAD, 6]]
    assert batch.prompt_mask.tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]
    assert batch.policy_version.tolist() == [3, 3, 3, 3]
    assert batch.topk_logprobs is None and batch.topk_ids is None


def test_tokens_after_eos_masked_and_zeroed():
    samples = [rv.Sample([7, EOS, 9], [-0.5, -0.25, -4.0])]
    batch = rv.build_batch(
        samples,
        torch.tensor([[5]]),
        torch.tensor([[1]]),
        num_generations=1,
        eos_token_ids=[EOS],
        pad_token_id=PAD,
        max_new_tokens=3,
    )
    assert batch.completion_ids.tolist() == [[7, EOS, PAD]]
    assert batch.behavior_logprobs.tolist() == [[-0.5, -0.25, 0.0]]
    assert batch.policy_version is None


def test_topk_extraction_best_first_and_sampled_token_outside_topk_dropped():
    # position 0: sampled 7 is the best; position 1: sampled 8 ranks below the top 2 (vLLM then returns
    # K+1 entries)
    out = [
        RequestOutput(
            "0", [5], [completion(0, [7, 8], [-0.5, -3.0], alts=[{11: -1.5}, {12: -0.25, 13: -1.25}])]
        )
    ]
    samples = rv.samples_from_request_outputs(out, num_generations=1, topk=2)
    assert samples[0].topk == [[(7, -0.5), (11, -1.5)], [(12, -0.25), (13, -1.25)]]
    batch = rv.build_batch(
        samples,
        torch.tensor([[5]]),
        torch.tensor([[1]]),
        num_generations=1,
        eos_token_ids=[EOS],
        pad_token_id=PAD,
        max_new_tokens=3,
        topk=2,
    )
    assert batch.topk_ids.tolist() == [[[7, 11], [12, 13], [PAD, PAD]]]
    assert batch.topk_logprobs.tolist() == [[[-0.5, -1.5], [-0.25, -1.25], [0.0, 0.0]]]
    assert batch.behavior_logprobs.tolist() == [[-0.5, -3.0, 0.0]]


def test_missing_or_misaligned_logprobs_raise():
    bad = [RequestOutput("0", [5], [CompletionOutput(0, [7, 8], None)])]
    with pytest.raises(RuntimeError, match="logprobs must be set"):
        rv.samples_from_request_outputs(bad, num_generations=1)
    wrong_token = [RequestOutput("0", [5], [CompletionOutput(0, [7], [{9: Logprob(-1.0)}])])]
    with pytest.raises(RuntimeError, match="sampled token 7"):
        rv.samples_from_request_outputs(wrong_token, num_generations=1)
    with pytest.raises(RuntimeError, match="expected n=3"):
        rv.samples_from_request_outputs(_scripted_outputs(), num_generations=3)
    with pytest.raises(RuntimeError, match="non-finite"):
        rv.build_batch(
            [rv.Sample([7], [-math.inf])],
            torch.tensor([[5]]),
            torch.tensor([[1]]),
            num_generations=1,
            eos_token_ids=[EOS],
            pad_token_id=PAD,
            max_new_tokens=2,
        )
    with pytest.raises(RuntimeError, match="more than max_new_tokens"):
        rv.build_batch(
            [rv.Sample([7, 7, 7], [-1.0] * 3)],
            torch.tensor([[5]]),
            torch.tensor([[1]]),
            num_generations=1,
            eos_token_ids=[EOS],
            pad_token_id=PAD,
            max_new_tokens=2,
        )


def _choice(index, tokens, logps, tops=None, with_ids=True):
    choice = {
        "index": index,
        "text": "",
        "finish_reason": "stop",
        "logprobs": {
            "tokens": [f"token_id:{t}" for t in tokens],
            "token_logprobs": logps,
            "top_logprobs": tops,
            "text_offset": [0] * len(tokens),
        },
    }
    if with_ids:
        choice["token_ids"] = tokens
    return choice


@pytest.mark.parametrize("with_ids", [True, False], ids=["token_ids", "token_strings"])
def test_completion_response_to_samples(with_ids):
    tops = [
        {"token_id:7": -0.5, "token_id:11": -1.5},
        {"token_id:12": -0.25, "token_id:13": -1.0, "token_id:2": -2.0},
    ]
    response = {
        "choices": [
            _choice(1, [9], [-0.75], [{"token_id:9": -0.75, "token_id:4": -0.8}], with_ids),
            _choice(0, [7, EOS], [-0.5, -2.0], tops, with_ids),
        ]
    }
    samples = rv.samples_from_completion(response, num_generations=2, topk=2)
    assert [s.token_ids for s in samples] == [[7, EOS], [9]]
    assert [s.logprobs for s in samples] == [[-0.5, -2.0], [-0.75]]
    assert samples[0].topk == [[(7, -0.5), (11, -1.5)], [(12, -0.25), (13, -1.0)]]


def test_completion_response_without_token_ids_and_plain_tokens_raises():
    response = {"choices": [{"index": 0, "logprobs": {"tokens": ["hello"], "token_logprobs": [-1.0]}}]}
    with pytest.raises(RuntimeError, match="return_tokens_as_token_ids"):
        rv.samples_from_completion(response, num_generations=1)


# -- the engine, colocated, against the fake vllm ------------------------------------------------------------


def _echo_script(prompt, params):
    """Deterministic fake sampler: G completions [first prompt token + g, EOS], log-probs from the seed."""
    kw = params.kwargs
    outs = []
    for g in range(kw["n"]):
        tokens = [prompt[0] + g, EOS]
        outs.append(completion(g, tokens, [-(kw["seed"] % 7 + 1) / 8.0, -0.5]))
    return outs


def test_colocated_engine_end_to_end(fake_vllm):
    FakeLLM.script = _echo_script
    engine = rv.VLLMRollout(
        model="/models/tiny", max_new_tokens=3, temperature=0.7, seed=11, gpu_memory_utilization=0.25
    )
    assert FakeLLM.instances == []  # the LLM is built on first use, not when the config is parsed
    policy = _tiny("llama")
    prompt_ids = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    batch = engine.generate(
        policy, prompt_ids, prompt_mask, num_generations=2, eos_token_id=EOS, pad_token_id=PAD
    )

    (llm,) = FakeLLM.instances
    assert llm.kwargs["model"] == "/models/tiny"
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm.kwargs["generation_config"] == "vllm"
    assert llm.kwargs["weight_transfer_config"] == ("WeightTransferConfig", "ipc")
    assert llm.kwargs["gpu_memory_utilization"] == 0.25
    prompts, params = llm.generate_calls[0]
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7, 8, 9]}]  # padding stripped
    seeds = [p.kwargs["seed"] for p in params]
    assert seeds == rv._request_seeds(11, 0, 2, 2)
    assert all(
        p.kwargs["temperature"] == 0.7 and p.kwargs["n"] == 2 and p.kwargs["detokenize"] is False
        for p in params
    )

    assert batch.completion_ids.tolist() == [[5, EOS, PAD], [6, EOS, PAD], [7, EOS, PAD], [8, EOS, PAD]]
    assert batch.completion_mask.tolist() == [[1, 1, 0]] * 4
    first = [-(seeds[0] % 7 + 1) / 8.0, -0.5, 0.0]
    assert batch.behavior_logprobs[0].tolist() == first
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    # Built from a folder, so the policy's weights were pushed before sampling (IPC round through the LLM).
    (sender,) = WeightTransferTrainerFactory.engines
    assert isinstance(sender.init_info, IPCTrainerInitInfo) and sender.init_info.rank == 0
    assert list(sender.sent[0]) == list(policy.state_dict())
    assert [kind for kind, _ in llm.rpc] == ["init", "start", "update", "finish", "reset_prefix_cache"]
    assert llm.rpc[2][1]["update_info"]["names"] == list(policy.state_dict())
    assert batch.policy_version is None  # sampled with the trainer's current weights


def test_colocated_pushes_policy_each_rollout_until_load_weights(fake_vllm):
    FakeLLM.script = _echo_script
    engine = rv.VLLMRollout(model="/models/tiny", max_new_tokens=2, seed=0)
    policy = _tiny("llama")
    ids, mask = torch.tensor([[5]]), torch.tensor([[1]])
    engine.generate(policy, ids, mask, num_generations=1, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    engine.generate(policy, ids, mask, num_generations=1, eos_token_id=EOS, pad_token_id=PAD)
    (sender,) = WeightTransferTrainerFactory.engines  # built once, reused every round
    assert len(sender.sent) == 2
    torch.testing.assert_close(sender.sent[1]["lm_head.weight"], policy.lm_head.weight.detach())

    stale = {k: v.clone() - 1 for k, v in policy.state_dict().items()}
    engine.load_weights(stale, version=4)
    batch = engine.generate(policy, ids, mask, num_generations=1, eos_token_id=EOS, pad_token_id=PAD)
    assert len(sender.sent) == 3  # the explicit load only: the caller's schedule now decides the weights
    torch.testing.assert_close(sender.sent[2]["lm_head.weight"], stale["lm_head.weight"])
    assert engine.policy_version == 4 and batch.policy_version.tolist() == [4]
    with pytest.raises(ValueError, match="state dict"):
        engine.load_weights(None, version=5)


def test_colocated_without_model_starts_from_the_policy(fake_vllm):
    FakeLLM.script = _echo_script
    engine = rv.VLLMRollout(max_new_tokens=2, seed=0)
    policy = _tiny("qwen2")
    engine.generate(
        policy,
        torch.tensor([[5]]),
        torch.tensor([[1]]),
        num_generations=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    (llm,) = FakeLLM.instances

    assert os.path.isfile(os.path.join(llm.kwargs["model"], "config.json"))
    assert llm.kwargs["skip_tokenizer_init"] is True
    assert WeightTransferTrainerFactory.engines == []  # vLLM loaded these very weights: nothing to push
    engine.close()
    assert not os.path.exists(llm.kwargs["model"])


def test_engine_survives_deepcopy(fake_vllm):
    import copy

    FakeLLM.script = _echo_script
    engine = rv.VLLMRollout(model="/models/tiny", max_new_tokens=2, seed=3)
    clone = copy.deepcopy(engine)  # e.g. a strategy that pickles the LightningModule and its plugins
    assert clone.sampling == engine.sampling and clone.seed == 3


def test_llm_client_wraps_requests_as_vllm_llm_expects():
    llm = FakeLLM()
    client = rv._LLMClient(llm)
    client.init_weight_transfer_engine({"a": 1})
    client.start_weight_update()
    client.update_weights({"names": ["x"]})
    client.finish_weight_update("v3")
    assert llm.rpc == [
        ("init", {"init_info": {"a": 1}}),
        ("start", None),
        ("update", {"update_info": {"names": ["x"]}}),
        ("finish", None),
    ]


# -- the engine, server mode, against fake HTTP --------------------------------------------------------------


class FakeServer:
    def __init__(self, logprobs_mode: str | None = "processed_logprobs"):
        self.calls: list[tuple[str, str, Any]] = []
        self.logprobs_mode = logprobs_mode  # None: /server_info is not served (server not in dev mode)

    def __call__(self, method, url, payload=None, timeout=60.0):
        route = urllib.parse.urlsplit(url).path
        self.calls.append((method, route, payload))
        if route == "/v1/completions":
            first = payload["prompt"][0]
            return {"choices": [_choice(g, [first + g, EOS], [-0.5 - g, -0.25]) for g in range(payload["n"])]}
        if route == "/get_world_size":
            return {"world_size": 2}
        if route == "/server_info":
            if self.logprobs_mode is None:
                raise RuntimeError(f"vllm rollout: GET {url} failed with HTTP 404")
            return {"vllm_config": f"model_config=ModelConfig(logprobs_mode='{self.logprobs_mode}', ...)"}
        return None


def test_server_generate_one_request_per_prompt(fake_vllm):
    engine = rv.VLLMRollout(model="policy", mode="server", max_new_tokens=3, temperature=0.9, seed=5)
    server = engine._http = FakeServer()
    batch = engine.generate(
        None,
        torch.tensor([[PAD, 5], [6, 7]]),
        torch.tensor([[0, 1], [1, 1]]),
        num_generations=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        topk=0,
    )
    posts = sorted((c for c in server.calls if c[1] == "/v1/completions"), key=lambda c: c[2]["prompt"])
    assert [c[2]["prompt"] for c in posts] == [[5], [6, 7]]
    assert sorted(c[2]["seed"] for c in posts) == sorted(rv._request_seeds(5, 0, 2, 2))
    assert all(c[2]["temperature"] == 0.9 and c[2]["model"] == "policy" for c in posts)
    assert batch.completion_ids.tolist() == [[5, EOS, PAD], [6, EOS, PAD], [6, EOS, PAD], [7, EOS, PAD]]
    assert batch.behavior_logprobs.tolist() == [[-0.5, -0.25, 0], [-1.5, -0.25, 0]] * 2
    assert batch.policy_version.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "send_fails"])
def test_server_load_weights_pauses_sends_by_nccl_and_resumes(fake_vllm, monkeypatch, fail):
    engine = rv.VLLMRollout(
        model="policy",
        mode="server",
        server_url="http://10.0.0.1:8000",
        weight_sync_address="10.0.0.2",
        weight_sync_port=29555,
        timeout_s=30,
    )
    server = engine._http = FakeServer()
    if fail:
        monkeypatch.setattr(
            FakeTrainerEngine, "send_weights", lambda self: (_ for _ in ()).throw(RuntimeError("nccl"))
        )
    state = _tiny("llama").state_dict()
    if fail:
        with pytest.raises(RuntimeError, match="nccl"):
            engine.load_weights(state, version=2)
    else:
        engine.load_weights(state, version=2)
    routes = [route for _, route, _ in server.calls if route != "/server_info"]
    # resumed even when the transfer failed; the prefix cache (old weights' KV) dropped after a transfer
    sync = [] if fail else ["/reset_prefix_cache"]
    assert routes == ["/pause", "/get_world_size", *sync, "/resume"]
    (sender,) = WeightTransferTrainerFactory.engines
    info = sender.init_info
    assert isinstance(info, NCCLTrainerInitInfo)
    assert (info.master_address, info.master_port, info.world_size, info.rank) == ("10.0.0.2", 29555, 3, 0)
    assert (
        isinstance(sender.client, HTTPVLLMWeightSyncClient)
        and sender.client.base_url == "http://10.0.0.1:8000"
    )
    assert sender.client.timeout == 30
    if not fail:
        assert list(sender.sent[0]) == list(state) and engine.policy_version == 2


def test_server_command_and_processed_logprobs_check(fake_vllm):
    engine = rv.VLLMRollout(
        model="/models/tiny", mode="server", server_url="http://127.0.0.1:8123", dtype="bfloat16"
    )
    argv, env = engine.server_command()
    assert argv[:3] == ["vllm", "serve", "/models/tiny"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--port"] == "8123" and flags["--logprobs-mode"] == "processed_logprobs"
    assert flags["--generation-config"] == "vllm" and flags["--dtype"] == "bfloat16"
    assert flags["--weight-transfer-config"] == '{"backend": "nccl"}'
    assert env == {"VLLM_SERVER_DEV_MODE": "1"}
    engine._http = FakeServer("raw_logprobs")
    with pytest.raises(UserError, match="--logprobs-mode processed_logprobs"):
        engine.generate(
            None,
            torch.tensor([[5]]),
            torch.tensor([[1]]),
            num_generations=1,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )


def test_server_without_dev_mode_warns_and_still_generates(fake_vllm, caplog):
    engine = rv.VLLMRollout(model="policy", mode="server", max_new_tokens=2)
    server = engine._http = FakeServer(logprobs_mode=None)
    for _ in range(2):
        batch = engine.generate(
            None,
            torch.tensor([[5]]),
            torch.tensor([[1]]),
            num_generations=1,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    assert batch.completion_ids.tolist() == [[5, EOS]]
    assert [route for _, route, _ in server.calls].count("/server_info") == 1  # checked once
    assert "could not check" in caplog.text


def test_http_failure_names_the_server():
    port = rv._free_port()
    url = f"http://127.0.0.1:{port}/health"
    with pytest.raises(RuntimeError, match=f"GET {url}"):
        rv._http_json("GET", url, timeout=2.0)


# -- with a real vLLM (GPU) ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_colocated_vllm_logprobs_match_the_trainer(tmp_path):
    """Colocated engine on a tiny Llama: vLLM's behaviour log-probs agree with a float32 teacher-forced
    forward at temperature 0.7, and after load_weights they follow the new weights. Not yet run anywhere."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    policy = LlamaForCausalLM(config).cuda().float()
    engine = rv.VLLMRollout(
        max_new_tokens=8,
        temperature=0.7,
        seed=0,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        max_model_len=64,
    )
    prompt_ids = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11]], device="cuda")
    prompt_mask = (prompt_ids != PAD).long()

    def check(batch):
        full = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        attn = torch.cat([batch.prompt_mask, batch.completion_mask.long()], dim=1)
        with torch.no_grad():
            logits = policy(
                input_ids=full, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)
            ).logits.float()
        p = batch.prompt_ids.shape[1]
        logp = torch.log_softmax(logits[:, p - 1 : -1] / 0.7, dim=-1)
        ref = logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1) * batch.completion_mask
        torch.testing.assert_close(batch.behavior_logprobs, ref, atol=2e-3, rtol=0)

    try:
        check(
            engine.generate(
                policy, prompt_ids, prompt_mask, num_generations=4, eos_token_id=EOS, pad_token_id=PAD
            )
        )
        with torch.no_grad():
            for param in policy.parameters():
                param.mul_(1.5)
        engine.load_weights(policy.state_dict(), version=1)
        batch = engine.generate(
            policy, prompt_ids, prompt_mask, num_generations=4, eos_token_id=EOS, pad_token_id=PAD
        )
        assert batch.policy_version.tolist() == [1] * 8
        check(batch)
    finally:
        engine.close()
