"""Fuzzing the backbone's input validation: any input dict gets a ValueError naming the input, or a valid output.

Inputs come from ``conformance.strategies.malformed_inputs``: valid batches with entries broken (shapes near and
far from valid, every numpy dtype family, NaN/inf and out-of-range values, non-array values, missing, extra and
non-string keys, empty batches, zero-length text). The documented results: an empty batch is an error; T = 0 is
valid and gives the image tokens only (refimpl/inputs.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.strategies import batch_from_layouts, malformed_inputs
from refimpl.config import PaliGemmaConfig
from refimpl.inputs import validate_inputs
from refimpl.model import PaliGemmaBackbone

pytestmark = [pytest.mark.hardening, pytest.mark.property]

CONFIG = PaliGemmaConfig(vocabulary_size=11, image_size=4, num_layers=1, num_query_heads=2, num_key_value_heads=1,
                         hidden_dim=6, intermediate_dim=4, head_dim=2, vit_patch_size=2, vit_num_heads=1,
                         vit_hidden_dim=3, vit_num_layers=1, vit_intermediate_dim=5, include_rescaling=False)
RESCALING = CONFIG.replace(include_rescaling=True)
MODELS = {config: PaliGemmaBackbone.from_config_object(config, seed=3) for config in (CONFIG, RESCALING)}
INPUT_NAMES = ("'images'", "'token_ids'", "'padding_mask'", "'response_mask'", "inputs")


def check_valid_output(model, inputs, out) -> None:
    batch, text = np.shape(inputs["token_ids"])
    assert out.shape == (batch, model.config.image_sequence_length + text, model.config.hidden_dim)
    assert out.dtype == np.float32 and np.isfinite(out).all()


@settings(max_examples=max(60, settings.default.max_examples * 8))
@given(config=st.sampled_from([CONFIG, RESCALING]), check_range=st.booleans(), data=st.data())
def test_any_input_is_rejected_clearly_or_runs(config, check_range, data):
    inputs = data.draw(malformed_inputs(config))
    model = MODELS[config]
    try:
        out = model(inputs, check_image_range=check_range)
    except ValueError as error:  # the only exception allowed, and it must say which input is wrong
        assert any(name in str(error) for name in INPUT_NAMES), str(error)
        return
    check_valid_output(model, inputs, out)


@given(data=st.data())
def test_validator_canonicalises_what_it_accepts(data):
    inputs = data.draw(malformed_inputs(CONFIG))
    try:
        checked = validate_inputs(inputs, CONFIG)
    except ValueError:
        return
    batch, text = checked.token_ids.shape
    assert batch >= 1 and checked.token_ids.dtype == np.int64
    assert checked.padding_mask.dtype == bool and checked.padding_mask.shape == (batch, text)
    assert checked.response_mask.dtype == bool and checked.response_mask.shape == (batch, text)
    assert checked.images.shape == (batch, 4, 4, 3)
    assert ((checked.token_ids >= 0) & (checked.token_ids < CONFIG.vocabulary_size)).all()


def test_empty_batch_is_an_error_and_empty_text_is_images_only():
    model = MODELS[CONFIG]
    empty_text = batch_from_layouts(CONFIG, [(0, 0, 0), (0, 0, 0)], seed=0)
    out = model(empty_text)
    assert out.shape == (2, CONFIG.image_sequence_length, CONFIG.hidden_dim) and np.isfinite(out).all()
    empty_batch = {"images": np.zeros((0, 4, 4, 3), np.float32), "token_ids": np.zeros((0, 3), np.int32),
                   "padding_mask": np.zeros((0, 3), bool), "response_mask": np.zeros((0, 3), bool)}
    with pytest.raises(ValueError, match="batch is empty"):
        model(empty_batch)


def test_non_string_keys_are_named_not_crashed_on():
    inputs = batch_from_layouts(CONFIG, [(2, 1, 0)], seed=0)
    inputs.update({1: 0, None: 0, (1, 2): 0})
    with pytest.raises(ValueError, match=r"unknown \[.*1.*None.*\]"):
        MODELS[CONFIG](inputs)
