"""Tiny offline models, the character tokenizer and the shipped quickstart policy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from drpo_lightning.tiny import (
    QUICKSTART_POLICY,
    build_char_tokenizer,
    build_tiny_llama,
    build_tiny_model,
    heldout_pairs,
    is_heldout,
    quickstart_policy_path,
    train_pairs,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_special_ids_and_no_auto_special_tokens(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    assert len(tok) == 4 + len("0123456789+-*=() ")
    ids = tok("12+34=")["input_ids"]
    assert len(ids) == 6  # one token per character, no BOS/EOS added
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


@pytest.mark.parametrize("text", ["12+34=46", "0+0=0", "(1 + 2) * 3 - 4 = 5", "  9 "])
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode(ids + [tok.eos_token_id]) == text + "<eos>"


def test_unknown_char_maps_to_unk(tok):
    assert tok("1x2")["input_ids"][1] == tok.unk_token_id


def test_left_padding(tok):
    enc = tok(["1+2=", "12+34="], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape == (2, 6)
    assert enc["input_ids"][0, :2].tolist() == [0, 0]
    assert enc["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    assert enc["attention_mask"][1].tolist() == [1] * 6


def test_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.padding_side == "left"
    assert again.get_vocab() == tok.get_vocab()
    assert again.decode(again("12+34=46")["input_ids"]) == "12+34=46"


def test_heldout_split():
    assert is_heldout(0, 0)
    held, train = heldout_pairs(), train_pairs()
    assert len(held) == 500 and len(train) == 9500
    assert not set(held) & set(train)
    assert all((a * 7919 + b * 104729) % 20 == 0 for a, b in held)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_builders_forward_and_generate(tok, arch):
    model = build_tiny_model(arch, tok, seed=0)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    enc = tok(["1+2=", "12+34="], padding=True, return_tensors="pt")
    out = model(**enc)
    assert out.logits.shape == (2, 6, len(tok))
    assert torch.isfinite(out.logits).all()
    gen = model.generate(**enc, do_sample=False, max_new_tokens=3)
    assert gen.shape[0] == 2 and gen.shape[1] <= 9


def test_tiny_llama_default_size(tok):
    model = build_tiny_llama(len(tok), seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert 0.9e6 < n < 1.2e6
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4


def test_quickstart_policy_shipped():
    assert Path(quickstart_policy_path()) == QUICKSTART_POLICY
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "pretrain_info.json"):
        assert (QUICKSTART_POLICY / name).is_file(), name
    size = sum(f.stat().st_size for f in QUICKSTART_POLICY.iterdir())
    assert size < 10 * 2**20


def _accuracy(model, tok, pairs, do_sample):
    enc = tok([f"{a}+{b}=" for a, b in pairs], return_tensors="pt", padding=True)
    kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, **kwargs)
    completions = out[:, enc["input_ids"].shape[1] :].tolist()
    correct, well_formed = 0, 0
    for (a, b), c in zip(pairs, completions):
        if tok.eos_token_id in c:
            text = tok.decode(c[: c.index(tok.eos_token_id)])
            well_formed += text.isdigit()
            correct += text == str(a + b)
    return correct / len(pairs), well_formed / len(pairs)


def test_quickstart_policy_loads_offline_and_has_some_skill():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = quickstart_policy_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert tok.padding_side == "left" and tok.eos_token_id == model.config.eos_token_id
    assert tok.decode(tok("12+34=46")["input_ids"]) == "12+34=46"

    pairs = random.Random(0).sample(heldout_pairs(), 200)
    torch.manual_seed(0)
    sampled, well_formed = _accuracy(model, tok, pairs, do_sample=True)
    greedy, _ = _accuracy(model, tok, pairs, do_sample=False)
    print(f"held-out (200): sampled {sampled:.3f} greedy {greedy:.3f} well-formed {well_formed:.3f}")
    # Measured (torch 2.13 CPU, transformers 5.24): sampled 0.400, greedy 0.930, well-formed 1.000 (full
    # 500-pair held-out set in pretrain_info.json: greedy 0.940, sampled 0.370). The skill is there (greedy)
    # but sampling at T=1 is right only about a third of the time: the room RL has to sharpen it.
    assert 0.2 <= sampled <= 0.6
    assert greedy >= 0.8
    assert greedy - sampled >= 0.25
    assert well_formed >= 0.9  # digits then EOS

    info = json.loads((QUICKSTART_POLICY / "pretrain_info.json").read_text())
    assert info["recipe"] == "noisy-teacher" and 0.2 <= info["sampled_acc"] <= 0.5 and info["greedy_acc"] >= 0.85
    assert abs(sampled - info["sampled_acc"]) < 0.15  # 200 samples: std ~0.03, plus sampling-seed spread
