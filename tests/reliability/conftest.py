"""Fixtures of the reliability suite (see docs/reliability.md for the scenario table)."""

from __future__ import annotations

import pytest

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
