"""Bad input gets a ValueError that names the input, what was expected and what was found."""

import numpy as np
import pytest

from refimpl import PaliGemmaBackbone

TINY = dict(vocabulary_size=97, image_size=28, num_layers=1, num_query_heads=4, num_key_value_heads=2,
            hidden_dim=40, intermediate_dim=58, head_dim=10, vit_patch_size=7, vit_num_heads=3, vit_hidden_dim=24,
            vit_num_layers=1, vit_intermediate_dim=37, include_rescaling=False)


@pytest.fixture(scope="module")
def model():
    return PaliGemmaBackbone(**TINY, seed=1)


def good(batch=2, text=5):
    return {"images": np.zeros((batch, 28, 28, 3), np.float32),
            "token_ids": np.full((batch, text), 5, np.int32),
            "padding_mask": np.ones((batch, text), bool),
            "response_mask": np.zeros((batch, text), bool)}


def test_good_input_runs_and_missing_response_mask_means_zeros(model):
    inputs = good()
    out = model(inputs)
    assert out.shape == (2, 16 + 5, 40) and out.dtype == np.float32 and np.isfinite(out).all()
    del inputs["response_mask"]
    np.testing.assert_array_equal(model(inputs), out)


def test_empty_text_is_images_only(model):
    out = model(good(text=0))
    assert out.shape == (2, 16, 40) and np.isfinite(out).all()


@pytest.mark.parametrize("change,fragments", [
    (lambda x: x.update(images=np.zeros((2, 28, 27, 3), np.float32)), ["'images'", "(batch, 28, 28, 3)", "(2, 28, 27, 3)"]),
    (lambda x: x.update(images=np.zeros((2, 21, 21, 3), np.float32)), ["'images'", "(2, 21, 21, 3)"]),
    (lambda x: x.update(images=np.zeros((28, 28, 3), np.float32)), ["'images'", "(28, 28, 3)"]),
    (lambda x: x["images"].__setitem__((1, 3, 4, 2), np.nan), ["'images'", "finite", "nan", "(1, 3, 4, 2)"]),
    (lambda x: x["images"].__setitem__((0, 0, 0, 0), np.inf), ["'images'", "finite", "inf"]),
    (lambda x: x.update(images=np.full((2, 28, 28, 3), 200.0, np.float32)), ["'images'", "[-1, 1]", "200"]),
    (lambda x: x.update(images=np.zeros((2, 28, 28, 3), bool)), ["'images'", "found bool"]),
    (lambda x: x["token_ids"].__setitem__((1, 2), 97), ["'token_ids'", "[0, 97)", "97", "(1, 2)"]),
    (lambda x: x["token_ids"].__setitem__((0, 0), -1), ["'token_ids'", "-1"]),
    (lambda x: x.update(token_ids=np.zeros((2, 5), np.float32)), ["'token_ids'", "integer", "float32"]),
    (lambda x: x.update(token_ids=np.zeros((10,), np.int32)), ["'token_ids'", "(10,)"]),
    (lambda x: x.update(padding_mask=np.ones((2, 4), bool)), ["'padding_mask'", "(2, 5)", "(2, 4)"]),
    (lambda x: x.update(response_mask=np.full((2, 5), 2)), ["'response_mask'", "0 and 1", "2"]),
    (lambda x: x.update(padding_mask=np.full((2, 5), 0.5)), ["'padding_mask'", "float64"]),
    (lambda x: x.update(images=np.zeros((3, 28, 28, 3), np.float32)), ["batch sizes differ", "3", "2"]),
    (lambda x: x.update(pixel_values=1), ["unknown ['pixel_values']"]),
    (lambda x: x.pop("padding_mask"), ["missing ['padding_mask']"]),
])
def test_bad_inputs(model, change, fragments):
    inputs = good()
    change(inputs)
    with pytest.raises(ValueError) as error:
        model(inputs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_empty_batch(model):
    with pytest.raises(ValueError, match="batch is empty"):
        model(good(batch=0))


def test_not_a_dict(model):
    with pytest.raises(ValueError, match="expected a dict"):
        model([1, 2, 3])


def test_range_check_can_be_disabled(model):
    inputs = good()
    inputs["images"][:] = 3.0
    assert np.isfinite(model(inputs, check_image_range=False)).all()
