"""Fixtures shared by the whole suite, and the hypothesis profiles.

Property tests draw the same examples on every run by default (profile ``deterministic``: examples derived
from each test's name, no example database), so CI is repeatable and a red run reproduces locally. To
search new examples, run with ``HYPOTHESIS_PROFILE=random pytest ...`` (or hypothesis' own
``--hypothesis-profile=random``, plus ``--hypothesis-seed=N`` to replay a seed); a failure prints the
``@reproduce_failure`` blob that replays it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings
from rl_helpers import make_tiny_model

# Registered and loaded here, at import, because the tests' own @settings(...) objects are built when their
# modules are imported and take every value they do not set from the profile loaded at that moment.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("random", derandomize=False, print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide Llama with a character tokenizer, saved like any local model folder."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
