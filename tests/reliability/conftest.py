"""Fixtures of the reliability suite (see docs/reliability.md for the scenario table)."""

from __future__ import annotations

import pytest
import torch

from drpo_lightning.tiny import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide Llama with a character tokenizer, saved like any local model folder."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("llama", tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models here are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine its
    spin-waiting made single in-process fits 10x slower. Restored after each test (other folders keep theirs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
