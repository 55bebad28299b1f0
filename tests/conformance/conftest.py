"""Fixtures of the harness self-tests: golden-format cases in temporary directories (no golden/ needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _conformance_cases import TINY_PG2, build_case
from conformance.cases import load_case


@pytest.fixture(scope="session")
def golden_root(tmp_path_factory) -> Path:
    """A golden directory with two cases: "tiny" (PaliGemma 1 shape) and "pg2" (post-norms, caps, window)."""
    root = tmp_path_factory.mktemp("golden")
    build_case(root, "tiny", seed=0, manifest=False)
    build_case(root, "pg2", config=TINY_PG2, seed=1)
    return root


@pytest.fixture
def golden_copy(golden_root, tmp_path) -> Path:
    """A private copy of ``golden_root`` that a test may tamper with."""
    return Path(shutil.copytree(golden_root, tmp_path / "golden"))


@pytest.fixture(scope="session")
def tiny_case(golden_root):
    return load_case(golden_root, "tiny")


@pytest.fixture(scope="session")
def pg2_case(golden_root):
    return load_case(golden_root, "pg2")

