"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest
from rl_helpers import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide Llama with a character tokenizer, saved like any local model folder."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
