"""FP8 rollouts: the e4m3 quantiser against an independent float64 reference, which weights the copy rounds,
and HFRollout(precision="fp8") sampling from a refreshed copy whose log-probs differ from the policy's."""

from __future__ import annotations

import copy
import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import drpo_lightning.distributed
from drpo_lightning.errors import ConfigError
from drpo_lightning.rollouts import fp8
from drpo_lightning.rollouts.fp8 import FP8PolicyCopy, fake_quantize_fp8, quantization_plan, quantize_fp8_
from drpo_lightning.rollouts.hf import HFRollout
from drpo_lightning.rollouts.worker_engine import engine_settings
from drpo_lightning.tasks import arithmetic
from drpo_lightning.tiny import build_char_tokenizer, build_tiny_model, quickstart_policy_path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one torch thread is faster and does not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ reference e4m3, in float64


def _e4m3_grid() -> torch.Tensor:
    """Every non-negative finite e4m3fn value, ascending, index i = 8 * exponent_field + mantissa_field (so an
    even index is an even mantissa): subnormals m/8 * 2^-6, normals (1 + m/8) * 2^(e-7); e=15, m=7 is NaN."""
    values = [m / 8 * 2.0**-6 for m in range(8)]
    values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)]
    return torch.tensor(values[:-1], dtype=torch.float64)


GRID = _e4m3_grid()


def _round_e4m3_ref(x: torch.Tensor) -> torch.Tensor:
    """Round float64 ``x`` to the nearest e4m3 value, ties to the even mantissa, saturating at 448."""
    a = x.abs().clamp(max=448.0).flatten()
    hi = torch.searchsorted(GRID, a).clamp(max=len(GRID) - 1)  # first grid value >= a
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    pick = torch.where(d_lo < d_hi, lo, hi)
    pick = torch.where(d_lo == d_hi, torch.where(lo % 2 == 0, lo, hi), pick)
    return GRID[pick].reshape(x.shape) * x.sign()


def _fake_quant_ref(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    w = w.double()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax().reshape(1, 1)
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return _round_e4m3_ref(w / s) * s


def test_reference_grid_is_torchs_e4m3():
    assert len(GRID) == 127 and GRID[-1] == 448.0 and GRID[8] == 2.0**-6 and GRID[1] == 2.0**-9
    assert torch.equal(GRID.to(torch.float8_e4m3fn).double(), GRID)  # all exactly representable


# ------------------------------------------------------------------------------------------ the quantiser


def test_hand_derived_values_round_trip_or_round_to_nearest():
    s = 2.0**-5
    w = torch.tensor(
        [
            [448.0, 3.0, -13.0, 1.0625, 1.1875, 0.0, 21.0, 20.9, -21.1, 2.0**-9, 2.0**-11],
            [0.0] * 11,  # a zero row: scale 1, stays zero
        ],
        dtype=torch.float64,
    )
    w[0] *= s
    q = fake_quantize_fp8(w, per_row=True)
    expected = torch.tensor(
        # 448, 3, -13 and 2^-9 are e4m3 values: exact. 1.0625 lies halfway between 1 and 1.125 -> 1 (even
        # mantissa); 1.1875 halfway between 1.125 and 1.25 -> 1.25 (even). In [16, 32) the step is 2: 21 is a
        # tie -> 20 (mantissa 010), 20.9 -> 20, -21.1 -> -22. 2^-11 is below half the smallest subnormal -> 0.
        [448.0, 3.0, -13.0, 1.0, 1.25, 0.0, 20.0, 20.0, -22.0, 2.0**-9, 0.0],
        dtype=torch.float64,
    ) * s
    assert torch.equal(q[0], expected)
    assert torch.equal(q[1], torch.zeros(11, dtype=torch.float64))
    # a scale that is not a power of two: s = 0.7 / 448; 0.3 / s = 192 and -0.05 / s = -32 are e4m3 values
    row = torch.tensor([[0.7, 0.3, -0.05, 1e-6]], dtype=torch.float64)
    q = fake_quantize_fp8(row, per_row=True)
    torch.testing.assert_close(q, torch.tensor([[0.7, 0.3, -0.05, 0.0]], dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("per_row", [True, False])
def test_matches_the_float64_reference_and_relative_error_is_at_most_2_to_minus_4(per_row):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen, dtype=torch.float64) * torch.logspace(-3, 1, 64, dtype=torch.float64)[:, None]
    w[5] = 0.0
    ref = _fake_quant_ref(w, per_row)
    assert torch.equal(fake_quantize_fp8(w, per_row), ref)  # float64 arithmetic both sides: bitwise
    # float32 weights: same values up to float32 rounding of the result
    q32 = fake_quantize_fp8(w.float(), per_row)
    assert q32.dtype == torch.float32
    torch.testing.assert_close(q32.double(), ref, rtol=2e-7, atol=1e-30)
    # normal range (|w / s| >= 2^-6): relative error <= 2^-4, and reached nearly (3 mantissa bits)
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    normal = (w.abs() / (amax / 448.0) >= 2.0**-6) & (w != 0)
    rel = ((ref - w).abs() / w.abs())[normal]
    assert rel.max() <= 2.0**-4 and rel.max() > 2.0**-5


@pytest.mark.parametrize(("factor", "gain"), [(1e3, None), (1e5, 20.0)])
def test_per_row_scale_beats_per_tensor_with_one_large_row(factor, gain):
    """e4m3 spans 2^-6 .. 448 in normal numbers (~2^15), so one per-tensor scale costs the small rows little
    until the large row is > ~2^15 times larger; beyond that their entries become subnormal or flush to 0."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=gen) * 0.01
    w[0] *= factor  # one row much larger than the rest
    small = slice(1, None)
    err_row = (fake_quantize_fp8(w, per_row=True) - w)[small].abs().mean()
    err_tensor = (fake_quantize_fp8(w, per_row=False) - w)[small].abs().mean()
    print(f"\nlarge row x{factor:g}: mean |error| of the small rows: per-row {err_row:.3e}, "
          f"per-tensor {err_tensor:.3e}")
    assert err_row < err_tensor
    if gain is not None:
        assert err_row * gain < err_tensor
    else:
        assert err_tensor < 1.5 * err_row
    # the large row itself has the same scale either way
    assert torch.equal(fake_quantize_fp8(w, True)[0], fake_quantize_fp8(w, False)[0])


def test_dst_dtype_chunking_and_bad_shapes(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(37, 20, generator=gen)
    whole = {per_row: fake_quantize_fp8(w, per_row) for per_row in (True, False)}
    monkeypatch.setattr(fp8, "_CHUNK_ELEMENTS", 50)  # 2 rows per chunk: the per-tensor scale spans chunks
    for per_row in (True, False):
        assert torch.equal(fake_quantize_fp8(w, per_row), whole[per_row])
    dst = torch.empty(37, 20, dtype=torch.bfloat16)  # computed in float32, rounded once to bf16
    assert torch.equal(quantize_fp8_(dst, w, True), whole[True].to(torch.bfloat16))
    with pytest.raises(ValueError, match="same"):
        quantize_fp8_(torch.empty(20, 37), w, True)


# ------------------------------------------------------------------------------------- the policy copy

VOCAB_TOK = build_char_tokenizer()


def _tiny(arch: str = "llama", tie: bool = True) -> nn.Module:
    kwargs = {} if arch != "llama" else {"tie_word_embeddings": tie}
    return build_tiny_model(arch, VOCAB_TOK, hidden_size=32, num_layers=2, num_heads=2, seed=0, **kwargs).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_copy_rounds_every_linear_but_the_head_and_leaves_the_rest(tie):
    model = _tiny(tie=tie)
    holder = FP8PolicyCopy(per_row=True)
    replica = holder.sync(model)
    live = dict(model.named_parameters())
    plan = quantization_plan(model)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(plan) == linears and len(linears) == 2 * 7
    for name, p in replica.named_parameters():
        assert not p.requires_grad and p.dtype == live[name].dtype
        if name in plan:
            assert torch.equal(p, fake_quantize_fp8(live[name], per_row=True)), name
            assert not torch.equal(p, live[name]), name
        else:  # embeddings, norms, an untied head
            assert torch.equal(p, live[name]), name
    assert torch.equal(replica.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert (replica.get_output_embeddings().weight is replica.get_input_embeddings().weight) == tie
    for (name, b), (_, b_live) in zip(replica.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(b, b_live), name


def test_gpt2_conv1d_weights_are_rounded_per_output_column():
    model = _tiny("gpt2")
    replica = FP8PolicyCopy(per_row=True).sync(model)
    plan = quantization_plan(model)
    assert len(plan) == 2 * 4 and all(plan.values())  # c_attn, c_proj (attn), c_fc, c_proj (mlp): [in, out]
    w = model.transformer.h[0].attn.c_attn.weight  # [in, out]
    q = replica.transformer.h[0].attn.c_attn.weight
    assert torch.equal(q, fake_quantize_fp8(w.t(), per_row=True).t())
    assert not torch.equal(q, fake_quantize_fp8(w, per_row=True))


class _LoraLinear(nn.Module):
    """What a PEFT LoRA layer looks like to the plan: a base layer plus adapters named by adapter_layer_names."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 4, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(4, base.out_features, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_lora_adapters_stay_in_high_precision_and_their_base_layers_are_rounded():
    model = _tiny()
    attn = model.model.layers[0].self_attn
    attn.q_proj = _LoraLinear(attn.q_proj)
    plan = quantization_plan(model)
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in plan
    assert not any("lora_" in name for name in plan)


def _one_line_config_error(fn, *needles: str) -> str:
    with pytest.raises(ConfigError) as raised:
        fn()
    text = str(raised.value)
    assert "\n" not in text and text.startswith("model.rollout.init_args.precision: fp8"), text
    for needle in needles:
        assert needle in text, text
    return text


class Linear8bitLt(nn.Linear):
    """Stands in for bitsandbytes' layer: an nn.Linear subclass whose forward does not use weight as a matrix."""

    def forward(self, x):
        return super().forward(x) * 2


def test_refusals_are_one_line_naming_the_option(monkeypatch):
    model = _tiny()
    attn = model.model.layers[1].self_attn
    attn.v_proj = Linear8bitLt(attn.v_proj.in_features, attn.v_proj.out_features, bias=False)
    engine = HFRollout(max_new_tokens=2, precision="fp8")
    ids, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)

    def generate(policy):
        return lambda: engine.generate(policy, ids, mask, num_generations=1, eos_token_id=2, pad_token_id=0)

    _one_line_config_error(generate(model), "model.layers.1.self_attn.v_proj", "Linear8bitLt")

    class HeadOnly(nn.Module):  # nothing but an output head: nothing to quantise
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(8, 4)
            self.head = nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.head

    _one_line_config_error(lambda: quantization_plan(HeadOnly()), "no torch.nn.Linear")

    monkeypatch.setattr(drpo_lightning.distributed, "is_sharded", lambda module: True)
    _one_line_config_error(generate(_tiny()), "FSDP", "DTensor")
    monkeypatch.undo()

    monkeypatch.setattr(fp8, "fp8_available", lambda: False)
    _one_line_config_error(lambda: HFRollout(precision="fp8"), "float8_e4m3fn")
    with pytest.raises(ValueError, match="'fp8', 'fp8-tensor'"):  # listed with the other precisions
        HFRollout(precision="fp4")


def test_fresh_and_used_engines_pickle_deepcopy_and_rebuild_for_a_worker():
    engine = HFRollout(max_new_tokens=3, precision="fp8-tensor")
    for clone in (pickle.loads(pickle.dumps(engine)), copy.deepcopy(engine)):
        assert clone.precision == "fp8-tensor" and clone._fp8.per_row is False and clone._fp8.model is None
    settings = engine_settings(engine)  # what a rollout worker rebuilds its engine from
    assert settings["precision"] == "fp8-tensor"
    assert HFRollout(**settings)._fp8.per_row is False
    model = _tiny()
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    engine.generate(model, ids, mask, num_generations=2, eos_token_id=2, pad_token_id=0)
    assert engine._fp8.model is not None
    for clone in (pickle.loads(pickle.dumps(engine)), copy.deepcopy(engine)):
        assert clone._fp8.model is None  # the cached copy does not travel
        clone.generate(model, ids, mask, num_generations=2, eos_token_id=2, pad_token_id=0)
        assert clone._fp8.model is not None


# ------------------------------------------------------------------------------------- sampling with it


def _quickstart():
    path = quickstart_policy_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, tok


def _prompts(tok, n: int):
    rows, _ = arithmetic(n, 0, seed=0)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _policy_logps(model, rb) -> torch.Tensor:
    """The float32 policy's own log-probs ``[N, T]`` of the sampled tokens, teacher-forced, autocast off."""
    ids = torch.cat([rb.prompt_ids, rb.completion_ids], dim=1)
    mask = torch.cat([rb.prompt_mask, rb.completion_mask.long()], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    p = rb.prompt_ids.shape[1]
    return torch.log_softmax(logits[:, p - 1 : -1], dim=-1).gather(2, rb.completion_ids[..., None]).squeeze(2)


def _sample(model, tok, precision, n_prompts=32, g=8, seed=0, engine=None):
    engine = engine or HFRollout(max_new_tokens=5, precision=precision)
    ids, mask = _prompts(tok, n_prompts)
    torch.manual_seed(seed)
    return engine.generate(model, ids, mask, num_generations=g, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)


def _gap(model, rb) -> torch.Tensor:
    """|log pi - log mu| per real completion token."""
    return (_policy_logps(model, rb) - rb.behavior_logprobs)[rb.completion_mask.bool()].abs()


def test_quickstart_mismatch_fp32_bf16_fp8_fp8_tensor():
    """The measurement: 32 "a+b=" prompts x 8 samples x 5 tokens, each precision against fp32 scoring."""
    model, tok = _quickstart()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {}
    for precision in ("32", "bf16", "fp8", "fp8-tensor"):
        gap = _gap(model, _sample(model, tok, precision))
        stats[precision] = (gap.mean().item(), gap.quantile(0.99).item(), gap.max().item(), gap.numel())
        mean, p99, top, n = stats[precision]
        print(f"\nprecision {precision:>10}: |log pi - log mu| mean {mean:.2e}  p99 {p99:.2e}  max {top:.2e}  "
              f"({n} tokens)")
    assert stats["32"][2] < 1e-4
    assert stats["bf16"][0] > 1e-3
    # fp8 weights (and bf16 activations): more mismatch than bf16 alone, still a small fraction of a nat.
    # Per-row and per-tensor scales come out alike here (see the test above: e4m3's range absorbs the spread).
    for precision in ("fp8", "fp8-tensor"):
        assert 1.5 * stats["bf16"][0] < stats[precision][0] < 0.05, precision
        assert stats[precision][2] < 0.5, precision
    for name, value in model.state_dict().items():  # the live policy is never touched
        assert torch.equal(value, before[name]), name


def test_behaviour_logprobs_are_the_fp8_copys_and_follow_weight_changes():
    model, tok = _quickstart()
    engine = HFRollout(max_new_tokens=5, precision="fp8")
    engine._autocast_setting = False  # float32 activations: only the weight rounding separates mu from pi
    rb = _sample(model, tok, "fp8", n_prompts=8, g=4, engine=engine)
    replica = engine._fp8.model
    real = rb.completion_mask.bool()
    own = (_policy_logps(replica, rb) - rb.behavior_logprobs)[real].abs().max()
    policy_gap = _gap(model, rb).mean()
    assert own < 1e-4 and policy_gap > 1e-3, (own, policy_gap)  # mu is the copy's distribution

    # the trainer updates the weights in place: the next generate samples from the new ones, same copy
    old = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.5)
        model.model.norm.weight.add_(0.25)  # not quantised, still refreshed
    rb2 = _sample(model, tok, "fp8", n_prompts=8, g=4, engine=engine)
    assert engine._fp8.model is replica
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(replica.model.layers[0].mlp.down_proj.weight, fake_quantize_fp8(w))
    assert torch.equal(replica.model.norm.weight, model.model.norm.weight)
    assert (_policy_logps(replica, rb2) - rb2.behavior_logprobs)[rb2.completion_mask.bool()].abs().max() < 1e-4
    new_gap, old_gap = _gap(model, rb2).mean(), _gap(old, rb2).mean()
    assert new_gap < 0.05 and old_gap > 10 * new_gap, (new_gap, old_gap)

    # another policy object (a worker's own copy, another layout): the copy is rebuilt for it
    other, _ = _quickstart()
    _sample(other, tok, "fp8", n_prompts=2, g=2, engine=engine)
    assert engine._fp8.model is not replica
    w = other.model.layers[0].mlp.down_proj.weight
    assert torch.equal(engine._fp8.model.model.layers[0].mlp.down_proj.weight, fake_quantize_fp8(w))


def test_live_policy_parameters_grads_and_modes_untouched():
    model = _tiny(tie=False).train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = HFRollout(max_new_tokens=4, precision="fp8")
    ids, mask = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    engine.generate(model, ids, mask, num_generations=3, eos_token_id=2, pad_token_id=0)
    engine.generate(model, ids, mask, num_generations=3, eos_token_id=2, pad_token_id=0)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad and torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in engine._fp8.model.parameters())


def _mismatch_rows(cwd: Path, precision: str) -> list[dict[str, str]]:
    """`drpo fit --config configs/quickstart.yaml --model.rollout.init_args.precision PRECISION` as the README
    prints it, shortened to 2 rollout steps and 8 held-out prompts; the rows of its metrics.csv that carry
    the mismatch."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "drpo_lightning.cli", "fit", "--config", str(root / "configs" / "quickstart.yaml"),
         "--model.rollout.init_args.precision", precision, "--trainer.max_steps=4", "--data.val_size=8"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(cwd / "runs/quickstart/drpo/version_0/metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("rollout/mismatch_mean")]


def test_quickstart_with_fp8_rollouts_logs_a_mismatch_larger_than_bf16(tmp_path):
    (tmp_path / "fp8").mkdir(), (tmp_path / "bf16").mkdir()
    fp8 = _mismatch_rows(tmp_path / "fp8", "fp8")
    bf16 = _mismatch_rows(tmp_path / "bf16", "bf16")
    assert len(fp8) == len(bf16) == 2  # one row per rollout step
    for rows in (fp8, bf16):
        for row in rows:
            mean, p99 = float(row["rollout/mismatch_mean"]), float(row["rollout/mismatch_p99"])
            assert 0 < mean < p99 < 1, row
    # first rollout, same prompts and policy: e4m3 weights (3 mantissa bits) are coarser than bf16's 7
    assert float(fp8[0]["rollout/mismatch_mean"]) > float(bf16[0]["rollout/mismatch_mean"])
