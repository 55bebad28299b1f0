"""Fixtures of the generation tests: a tiny trained vocabulary, and keras-hub models with what they generated.

The keras-hub cases are built once per session (a keras build and each compiled generate take seconds).
"""

from __future__ import annotations

import pytest

from _generation_helpers import build_keras_case, train_vocabulary
from tools.keras_oracle import keras_hub_available


@pytest.fixture(scope="session")
def vocabulary(tmp_path_factory):
    """Path of a 211-piece SentencePiece proto with <pad>=0, <eos>=1, <bos>=2, <unk>=3 and a few <loc>/<seg>."""
    return train_vocabulary(tmp_path_factory.mktemp("vocabulary") / "vocabulary.spm")


@pytest.fixture(scope="session")
def keras_cases(tmp_path_factory, vocabulary):
    """{"pg1", "pg2"} -> KerasCase: a saved keras-hub PaliGemmaCausalLM preset and its generate() outputs."""
    if not keras_hub_available():
        pytest.skip("keras-hub not installed")
    return {name: build_keras_case(name, tmp_path_factory.mktemp(name), vocabulary, seed)
            for seed, name in enumerate(("pg1", "pg2"), start=11)}
