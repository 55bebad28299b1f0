"""Shared test setup. keras must use the JAX backend here (TensorFlow is not installed); set it before any import.

Hypothesis profiles (tests that set ``max_examples`` themselves keep it; the rest follow the profile):

    ci    the default: few examples, derandomized (the same examples on every run), no deadline
    long  HYPOTHESIS_PROFILE=long python -m pytest tests/property tests/hardening   (500 examples, random)
"""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("KERAS_BACKEND", "jax")

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@pytest.fixture(scope="module")
def cases():
    """Three golden cases (PaliGemma 1, PaliGemma 2 with a window, MHA with soft-caps), loaded once per module."""
    from conformance.cases import load_case

    if not (GOLDEN / "MANIFEST.json").is_file():
        pytest.skip("golden/ cases not present (run python -m tools.make_goldens)")
    return {name: load_case(GOLDEN, name) for name in ("pg1_basic", "pg2_window", "pg2_mha_caps")}
