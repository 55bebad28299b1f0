"""The prefix-LM mask: refimpl's ``prefix_lm_mask`` against an independent, element-by-element formulation of
keras-hub's rule (``conformance.properties.reference_mask``), which itself reproduces the literal matrices of spec
section 4.3 (tests/unit/test_mask.py); plus the rule's consequences on valid batches, in words."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import strategies as strat
from conformance.properties import influence, layer_masks, reference_mask
from refimpl.attention import prefix_lm_mask, sliding_window_band
from refimpl.config import PaliGemmaConfig
from refimpl.gemma import layer_mask
from tests.unit.test_mask import PADDING, RESPONSE, WITH_RESPONSE, WITHOUT_RESPONSE

pytestmark = pytest.mark.property


def test_reference_reproduces_the_spec_examples():
    np.testing.assert_array_equal(reference_mask(PADDING, RESPONSE, 2)[0], WITH_RESPONSE)
    np.testing.assert_array_equal(reference_mask(PADDING, None, 2)[0], WITHOUT_RESPONSE)
    np.testing.assert_array_equal(prefix_lm_mask(PADDING, RESPONSE, 2)[0], WITH_RESPONSE)


@given(batch=st.integers(1, 3), text_len=st.integers(0, 9), image_tokens=st.sampled_from([0, 1, 4, 9]),
       data=st.data())
def test_mask_equals_the_rule_for_any_masks(batch, text_len, image_tokens, data):
    padding, response = data.draw(strat.arbitrary_masks(batch, text_len))
    np.testing.assert_array_equal(prefix_lm_mask(padding, response, image_tokens),
                                  reference_mask(padding, response, image_tokens))
    np.testing.assert_array_equal(prefix_lm_mask(padding, None, image_tokens),
                                  reference_mask(padding, np.zeros_like(padding), image_tokens))


@given(image_tokens=st.sampled_from([1, 4, 9]), data=st.data())
def test_mask_on_valid_batches_in_words(image_tokens, data):
    """Image and prompt see each other both ways, responses are causal, padding keys are seen by nobody."""
    config = PaliGemmaConfig(vocabulary_size=5, image_size=3 * int(np.sqrt(image_tokens)), num_layers=1,
                             num_query_heads=1, num_key_value_heads=1, hidden_dim=3, intermediate_dim=2, head_dim=2,
                             vit_patch_size=3, vit_num_heads=1, vit_hidden_dim=2, vit_num_layers=1)
    inputs = data.draw(strat.valid_batches(config, text_lengths=(0, 9)))
    mask = prefix_lm_mask(inputs["padding_mask"], inputs["response_mask"], image_tokens)
    kind = np.concatenate([np.full((len(mask), image_tokens), strat.PROMPT), strat.segments(inputs)], axis=1)
    for b in range(len(mask)):
        prefix, response, pad = (kind[b] == k for k in (strat.PROMPT, strat.RESPONSE, strat.PADDING))
        assert mask[b][np.ix_(prefix, prefix)].all()  # image + prompt: a bidirectional block
        assert mask[b][:, prefix].all()  # every query (response and padding queries too) sees the whole prefix
        assert not mask[b][:, pad].any()  # padding keys: nobody
        positions = np.arange(mask.shape[-1])
        for s in np.flatnonzero(response):  # response keys: exactly the queries at or after them
            np.testing.assert_array_equal(mask[b][:, s], positions >= s)


@given(length=st.integers(1, 12), window=st.integers(1, 16), start=st.integers(0, 5))
def test_sliding_band_is_the_distance_rule(length, window, start):
    positions = np.arange(start, start + length)
    band = sliding_window_band(positions, start + length, window)
    expected = np.array([[abs(int(p) - s) <= window - 1 for s in range(start + length)] for p in positions])
    np.testing.assert_array_equal(band, expected)
    if start + length <= window:
        assert band.all()  # the sequence fits: the window hides nothing


@given(data=st.data())
def test_window_applies_to_even_layers_only(data):
    config = data.draw(strat.configs(use_sliding_window_attention=True, num_layers=3))
    inputs = data.draw(strat.valid_batches(config))
    mask = prefix_lm_mask(inputs["padding_mask"], inputs["response_mask"], config.image_sequence_length)
    positions = np.arange(mask.shape[-1])
    expected = layer_masks(config, inputs["padding_mask"], inputs["response_mask"])
    for i in range(config.num_layers):
        np.testing.assert_array_equal(layer_mask(mask, i, positions, config), expected[i])
    np.testing.assert_array_equal(expected[1], mask)  # odd layers: the plain prefix-LM mask


def test_influence_oracle_on_the_spec_example():
    """The dependency oracle of the backend properties, by hand, on the spec's sequence with one image token:
    positions 0..5 are I0 bos p r eos pad (padding [1,1,1,1,0], response [0,0,1,1,0])."""
    config = PaliGemmaConfig(vocabulary_size=5, image_size=2, num_layers=1, num_query_heads=1, num_key_value_heads=1,
                             hidden_dim=3, intermediate_dim=2, head_dim=2, vit_patch_size=2, vit_num_heads=1,
                             vit_hidden_dim=2, vit_num_layers=1)
    assert config.image_sequence_length == 1
    cases = {2: [1, 1, 1, 1, 1, 1],  # "p" (prompt): every query sees the prefix, the padding query too
             3: [0, 0, 0, 1, 1, 1],  # "r" (response): itself and the queries after it
             5: [0, 0, 0, 0, 0, 1]}  # "pad": only itself
    for position, expected in cases.items():
        got = influence(config, PADDING, RESPONSE, 0, position)
        np.testing.assert_array_equal(got, np.array(expected, bool), err_msg=f"position {position}")
    deeper = config.replace(num_layers=2)  # two layers: a response still reaches nothing before it
    np.testing.assert_array_equal(influence(deeper, PADDING, RESPONSE, 0, 3), np.array([0, 0, 0, 1, 1, 1], bool))
    windowed = config.replace(use_sliding_window_attention=True, sliding_window_size=2)  # |t - s| <= 1 on layer 0
    np.testing.assert_array_equal(influence(windowed, PADDING, RESPONSE, 0, 2), np.array([0, 1, 1, 1, 0, 0], bool))
