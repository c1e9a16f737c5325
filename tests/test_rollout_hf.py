"""HFRollout: shapes, EOS masking, padding, and behaviour log-probs that a teacher-forced forward reproduces."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from drpo_lightning.rollouts.hf import HFRollout
from drpo_lightning.types import RolloutBatch

VOCAB = 40
PAD, BOS, EOS, EOS2 = 0, 1, 2, 3


def _set_eos_bias(model: torch.nn.Module, bias: float, eos_ids=(EOS,)) -> None:
    """Give the LM head a bias that shifts the EOS logit(s): > 0 makes completions stop early."""
    head = model.get_output_embeddings()
    b = torch.zeros(head.out_features)
    for e in eos_ids:
        b[e] = bias
    head.bias = torch.nn.Parameter(b)


def _llama(eos_bias: float = 0.0, eos_ids=(EOS,)) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)
    _set_eos_bias(model, eos_bias, eos_ids)
    return model.eval()  # built from a config: train mode, and GPT-2 has dropout


def _gpt2(eos_bias: float = 0.0, eos_ids=(EOS,)) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = GPT2LMHeadModel(config)
    _set_eos_bias(model, eos_bias, eos_ids)
    return model.eval()  # built from a config: train mode, and GPT-2 has dropout


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _prompts(batch: int = 3, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (row i has i pad tokens on the left, at most length - 1)."""
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(4, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pads = min(i * 2, length - 1)
        mask[i, :pads] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _rollout(model, engine: HFRollout, *, g: int = 4, topk: int = 0, eos=EOS, pad=PAD, seed: int = 0, **kw):
    ids, mask = _prompts(**kw)
    torch.manual_seed(seed)
    return engine.generate(model, ids, mask, num_generations=g, eos_token_id=eos, pad_token_id=pad, topk=topk)


def _recompute(model: torch.nn.Module, rb: RolloutBatch, temperature: float) -> torch.Tensor:
    """Independent fp32 teacher-forced log-softmax ``[N, T, V]`` over the completion positions."""
    full_ids = torch.cat([rb.prompt_ids, rb.completion_ids], dim=1)
    full_mask = torch.cat([rb.prompt_mask, rb.completion_mask.long()], dim=1)
    position_ids = (full_mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids).logits.float()
    p = rb.prompt_ids.shape[1]
    return torch.log_softmax(logits[:, p - 1 : -1] / temperature, dim=-1)


def _first_eos_mask(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Reference mask by a plain loop: 1 up to and including the first EOS."""
    out = torch.zeros(ids.shape)
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            out[r, t] = 1.0
            if int(ids[r, t]) in eos_ids:
                break
    return out


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_shapes_groups_and_prompt_repetition(arch):
    model = MODELS[arch](eos_bias=1.5)
    engine = HFRollout(max_new_tokens=10)
    rb = _rollout(model, engine, g=4, topk=3)
    ids, mask = _prompts()
    n, t = 3 * 4, 10
    assert rb.prompt_ids.shape == (n, 6) and rb.prompt_mask.shape == (n, 6)
    assert torch.equal(rb.prompt_ids, ids.repeat_interleave(4, dim=0))
    assert torch.equal(rb.prompt_mask, mask.repeat_interleave(4, dim=0))
    assert rb.completion_ids.shape == (n, t) and rb.completion_ids.dtype == torch.long
    assert rb.completion_mask.shape == (n, t) and rb.completion_mask.dtype == torch.float32
    assert rb.behavior_logprobs.shape == (n, t) and rb.behavior_logprobs.dtype == torch.float32
    assert rb.truncated.shape == (n,) and rb.truncated.dtype == torch.bool
    assert torch.equal(rb.group_ids, torch.tensor([0] * 4 + [1] * 4 + [2] * 4))
    assert rb.topk_logprobs.shape == (n, t, 3) and rb.topk_ids.shape == (n, t, 3)
    assert rb.topk_logprobs.dtype == torch.float32 and rb.topk_ids.dtype == torch.long
    assert torch.isfinite(rb.behavior_logprobs).all()
    assert (rb.behavior_logprobs <= 0).all()
    # no top-K asked: None
    rb0 = _rollout(model, engine, g=2)
    assert rb0.topk_logprobs is None and rb0.topk_ids is None


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize(("eos", "pad"), [(EOS, PAD), ([EOS, EOS2], PAD), (EOS, EOS)])
def test_mask_ends_at_first_eos_and_tail_is_pad(arch, eos, pad):
    eos_ids = eos if isinstance(eos, list) else [eos]
    model = MODELS[arch](eos_bias=2.0 if len(eos_ids) == 1 else 1.3, eos_ids=eos_ids)  # ~same EOS rate
    rb = _rollout(model, HFRollout(max_new_tokens=10), g=6, topk=2, eos=eos, pad=pad)
    ids, mask = rb.completion_ids, rb.completion_mask
    assert torch.equal(mask, _first_eos_mask(ids, eos_ids))
    lengths = mask.sum(dim=1)
    assert (lengths < 10).any() and (lengths >= 1).all(), "some completions must stop early"
    assert rb.truncated.any(), "this seed also yields completions without EOS"
    is_eos = torch.isin(ids, torch.tensor(eos_ids))
    assert torch.equal(rb.truncated, ~(is_eos & mask.bool()).any(dim=1))
    # the EOS itself is kept, in the mask
    for r in torch.nonzero(~rb.truncated).flatten():
        last = int(lengths[r]) - 1
        assert int(ids[r, last]) in eos_ids
    after = mask == 0
    assert (ids[after] == pad).all()
    assert (rb.behavior_logprobs[after] == 0).all()
    assert (rb.behavior_logprobs[~after] < 0).all()
    assert (rb.topk_logprobs[after] == 0).all() and (rb.topk_ids[after] == pad).all()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_all_rows_stop_early_still_full_width(arch):
    model = MODELS[arch](eos_bias=30.0)
    rb = _rollout(model, HFRollout(max_new_tokens=12), g=3, topk=2)
    assert rb.completion_ids.shape[1] == 12 and rb.topk_ids.shape[1] == 12
    assert torch.equal(rb.completion_mask.sum(dim=1), torch.ones(9))  # EOS straight away
    assert (rb.completion_ids[:, 0] == EOS).all() and (rb.completion_ids[:, 1:] == PAD).all()
    assert not rb.truncated.any()
    assert (rb.behavior_logprobs[:, 0] > -1e-3).all() and (rb.behavior_logprobs[:, 1:] == 0).all()


def test_no_eos_means_all_truncated():
    model = _llama(eos_bias=-30.0)
    rb = _rollout(model, HFRollout(max_new_tokens=7), g=2)
    assert rb.truncated.all()
    assert (rb.completion_mask == 1).all()


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 8, 0.9), (1.3, 0, 0.8)]
)
def test_behavior_logprobs_match_teacher_forced_fp32(arch, temperature, top_k, top_p):
    """Log mu = log_softmax(logits / T) at the sampled id, before truncation, as the trainer recomputes it.

    The prompts are left-padded by different amounts, so this also checks the positions (GPT-2 has absolute
    position embeddings: a wrong offset would change every log-prob).
    """
    model = MODELS[arch](eos_bias=1.5)
    engine = HFRollout(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, precision="32")
    rb = _rollout(model, engine, g=4, topk=4)
    ref = _recompute(model, rb, temperature)
    m = rb.completion_mask.bool()
    ref_tok = ref.gather(2, rb.completion_ids[..., None]).squeeze(2)
    diff = (ref_tok - rb.behavior_logprobs)[m].abs().max()
    assert diff < 1e-4, f"max |logprob diff| {diff:.2e}"
    # top-K: same values as the recomputed top-K, and the returned ids carry those values
    ref_topk = ref.topk(4, dim=-1).values
    assert (ref_topk - rb.topk_logprobs)[m].abs().max() < 1e-4
    at_ids = ref.gather(2, rb.topk_ids)
    assert (at_ids - rb.topk_logprobs)[m].abs().max() < 1e-4
    # the top-K list is sorted and the sampled token's log-prob never exceeds the best one
    assert (rb.topk_logprobs[..., :-1] >= rb.topk_logprobs[..., 1:])[m].all()
    assert (rb.behavior_logprobs <= rb.topk_logprobs[..., 0] + 1e-6)[m].all()
    if top_k:
        # sampled ids lie within the top_k most likely tokens of the (untruncated) distribution
        kth = ref.topk(top_k, dim=-1).values[..., -1]
        assert (ref_tok >= kth - 1e-5)[m].all()


def test_deterministic_under_seed_and_cache_invariant():
    model = _llama(eos_bias=1.5)
    a = _rollout(model, HFRollout(max_new_tokens=8, temperature=0.8), g=3, topk=2, seed=7)
    b = _rollout(model, HFRollout(max_new_tokens=8, temperature=0.8), g=3, topk=2, seed=7)
    for name, x, y in zip(a._fields, a, b):
        assert (x is None and y is None) if x is None else torch.equal(x, y), name  # policy_version: None
    c = _rollout(model, HFRollout(max_new_tokens=8, temperature=0.8), g=3, topk=2, seed=8)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    nc = _rollout(model, HFRollout(max_new_tokens=8, temperature=0.8, use_cache=False), g=3, topk=2, seed=7)
    assert torch.equal(a.completion_ids, nc.completion_ids)
    assert torch.allclose(a.behavior_logprobs, nc.behavior_logprobs, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_bf16_sampling_shows_mismatch_against_fp32_scoring(arch):
    model = MODELS[arch](eos_bias=1.0)
    temperature = 0.7
    rb = _rollout(model, HFRollout(max_new_tokens=12, temperature=temperature, precision="bf16"), g=4)
    ref = _recompute(model, rb, temperature)
    m = rb.completion_mask.bool()
    ref_tok = ref.gather(2, rb.completion_ids[..., None]).squeeze(2)
    diff = (ref_tok - rb.behavior_logprobs)[m].abs()
    assert torch.isfinite(rb.behavior_logprobs).all()
    assert diff.max() > 1e-3, "bf16 sampling should not reproduce fp32 scoring to fp32 precision"
    assert diff.max() < 3.0


def test_precision_32_forces_autocast_off_and_none_inherits_it():
    model = _llama(eos_bias=1.0)
    ids, mask = _prompts()
    kw = dict(num_generations=3, eos_token_id=EOS, pad_token_id=PAD)

    def max_diff(engine):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rb = engine.generate(model, ids, mask, **kw)
        ref = _recompute(model, rb, 1.0).gather(2, rb.completion_ids[..., None]).squeeze(2)
        return (ref - rb.behavior_logprobs)[rb.completion_mask.bool()].abs().max()

    assert max_diff(HFRollout(max_new_tokens=8, precision="fp32")) < 1e-4
    inherited = max_diff(HFRollout(max_new_tokens=8, precision=None))
    assert inherited > 1e-4
    assert inherited == max_diff(HFRollout(max_new_tokens=8, precision="bf16"))


def test_min_new_tokens_suppresses_eos_but_not_in_logprobs():
    model = _llama(eos_bias=30.0)
    rb = _rollout(model, HFRollout(max_new_tokens=8, min_new_tokens=3, precision="32"), g=2)
    assert (rb.completion_ids[:, :3] != EOS).all()
    assert torch.equal(rb.completion_mask.sum(dim=1), torch.full((6,), 4.0))
    ref = _recompute(model, rb, 1.0).gather(2, rb.completion_ids[..., None]).squeeze(2)
    m = rb.completion_mask.bool()
    assert (ref - rb.behavior_logprobs)[m].abs().max() < 1e-4
    assert (rb.behavior_logprobs[:, :3] < -20).all()  # mu counts EOS's mass, which generation suppressed


def test_training_flags_and_generation_config_restored():
    model = _llama(eos_bias=1.0)
    model.train()
    model.model.layers[0].eval()  # a submodule deliberately in eval mode stays so
    before = {name: m.training for name, m in model.named_modules()}
    config_before = model.generation_config.to_dict()
    _rollout(model, HFRollout(max_new_tokens=4, temperature=0.5, top_k=3), g=2)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.generation_config.to_dict() == config_before
    model.eval()
    _rollout(model, HFRollout(max_new_tokens=4), g=2)
    assert not model.training


def test_outputs_have_no_grad_and_are_usable_in_training_forward():
    model = _llama(eos_bias=1.0)
    rb = _rollout(model, HFRollout(max_new_tokens=5), g=2)
    assert not rb.behavior_logprobs.requires_grad
    full = torch.cat([rb.prompt_ids, rb.completion_ids], dim=1)
    model(input_ids=full).logits.sum().backward()  # not inference tensors


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens"),
        ({"precision": "int8"}, "precision"),
        # a YAML null or .nan/.inf must be named too, not end in a TypeError from a comparison
        ({"temperature": None}, "temperature must be a finite number, got None"),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
        ({"top_p": None}, "top_p must be a finite number, got None"),
        ({"top_p": float("nan")}, "top_p must be a finite number, got nan"),
        ({"max_new_tokens": None}, "max_new_tokens must be an integer, got None"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
        ({"min_new_tokens": None}, "min_new_tokens must be an integer, got None"),
        ({"top_k": None}, "top_k must be an integer, got None"),
        ({"temperature": True}, "temperature must be a finite number, got True"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HFRollout(**kwargs)


def test_bad_call_arguments():
    model = _llama()
    ids, mask = _prompts()
    engine = HFRollout(max_new_tokens=3)
    with pytest.raises(ValueError, match="num_generations"):
        engine.generate(model, ids, mask, num_generations=0, eos_token_id=EOS, pad_token_id=PAD)
    right_padded = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        engine.generate(model, ids, right_padded, num_generations=1, eos_token_id=EOS, pad_token_id=PAD)


def test_precision_names_and_entry_point():
    for p in (None, "bf16", "bf16-mixed", "fp16", "16-mixed", "32", "fp32", 32):
        assert HFRollout(precision=p).max_new_tokens == 64
    (ep,) = [e for e in entry_points(group="drpo_lightning.rollouts") if e.name == "hf"]
    assert ep.load() is HFRollout
    assert "Args:" in HFRollout.__doc__ and "precision:" in HFRollout.__doc__
