"""Fixtures of the reliability suite (see docs/reliability.md for the scenario table); ``tiny_model_dir``
comes from ``tests/conftest.py``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models here are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine its
    spin-waiting made single in-process fits 10x slower. Restored after each test (other folders keep theirs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
