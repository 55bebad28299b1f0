"""The prefix-LM mask against the literal worked example of spec section 4.3 (read from keras-hub's
``_compute_attention_mask``), and the sliding band."""

import numpy as np

from refimpl.attention import causal_mask, prefix_lm_mask, sliding_window_band


def matrix(text: str) -> np.ndarray:
    return np.array([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


# N_img = 2, text = [bos, p, r, eos, pad]: sequence I0 I1 bos p r eos pad.
PADDING = np.array([[1, 1, 1, 1, 0]], dtype=bool)
RESPONSE = np.array([[0, 0, 1, 1, 0]], dtype=bool)

WITH_RESPONSE = matrix("""
1 1 1 1 0 0 0
1 1 1 1 0 0 0
1 1 1 1 0 0 0
1 1 1 1 0 0 0
1 1 1 1 1 0 0
1 1 1 1 1 1 0
1 1 1 1 1 1 0
""")
WITHOUT_RESPONSE = matrix("""
1 1 1 1 1 1 0
1 1 1 1 1 1 0
1 1 1 1 1 1 0
1 1 1 1 1 1 0
1 1 1 1 1 1 0
1 1 1 1 1 1 0
1 1 1 1 1 1 0
""")
CAUSAL = matrix("""
1 0 0 0 0 0 0
1 1 0 0 0 0 0
1 1 1 0 0 0 0
1 1 1 1 0 0 0
1 1 1 1 1 0 0
1 1 1 1 1 1 0
1 1 1 1 1 1 1
""")


def test_spec_example_with_response_mask():
    np.testing.assert_array_equal(prefix_lm_mask(PADDING, RESPONSE, 2)[0], WITH_RESPONSE)


def test_spec_example_without_response_mask():
    np.testing.assert_array_equal(prefix_lm_mask(PADDING, None, 2)[0], WITHOUT_RESPONSE)
    np.testing.assert_array_equal(prefix_lm_mask(PADDING, np.zeros_like(RESPONSE), 2)[0], WITHOUT_RESPONSE)


def test_spec_example_cached_step_is_causal():
    np.testing.assert_array_equal(causal_mask(np.arange(7), 7), CAUSAL)


def test_rows_are_independent_in_a_batch():
    padding = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=bool)
    response = np.array([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=bool)
    mask = prefix_lm_mask(padding, response, 2)
    np.testing.assert_array_equal(mask[0], WITH_RESPONSE)
    np.testing.assert_array_equal(mask[1], np.tile([1, 1, 1, 1, 0, 0, 0], (7, 1)).astype(bool))


def test_sliding_band_is_symmetric_with_width_w_minus_one():
    band = sliding_window_band(np.arange(5), 5, 2)  # |t - s| <= 1
    expected = matrix("""
1 1 0 0 0
1 1 1 0 0
0 1 1 1 0
0 0 1 1 1
0 0 0 1 1
""")
    np.testing.assert_array_equal(band, expected)
    assert sliding_window_band(np.arange(5), 5, 5).all()
