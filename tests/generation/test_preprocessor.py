"""``PaliGemmaCausalLMPreprocessor`` against keras-hub's on the same tokenizer proto, plus hand-checked packing."""

from __future__ import annotations

import numpy as np
import pytest

from _generation_helpers import needs_keras
from refimpl.image_converter import PaliGemmaImageConverter
from refimpl.preprocessor import PaliGemmaCausalLMPreprocessor, pack, round_robin_trim
from refimpl.tokenizer import PaliGemmaTokenizer

PROMPTS = ["caption en\n", "ne the ka lo mi ne the ka lo mi ru ta", "", "answer en cat dog\n"]
RESPONSES = ["cat dog", "ru ta se po di gu an en in", "sky red", ""]


def test_round_robin_trim_hand_checked():
    # Budget 5 over segments of 4 and 3: take one of each in turn, a0 b0 a1 b1 a2 -> 3 + 2.
    assert round_robin_trim([[1, 2, 3, 4], [5, 6, 7]], 5) == [[1, 2, 3], [5, 6]]
    # A short segment drops out of the turn: budget 5 over [a0] and [b0..b5] -> a0, then b0..b3.
    assert round_robin_trim([[1], [5, 6, 7, 8, 9, 10]], 5) == [[1], [5, 6, 7, 8]]
    assert round_robin_trim([[1, 2], [3]], 10) == [[1, 2], [3]]
    assert round_robin_trim([[1, 2], [3]], 0) == [[], []]


def test_pack_layout_hand_checked():
    # [bos] prompt response [eos] [pad]...; segment ids 0 for bos and prompt, 1 for response and eos, 0 for pad.
    ids, seg = pack([[10, 11], [20]], 7, start=2, end=1, pad=0)
    assert ids == [2, 10, 11, 20, 1, 0, 0] and seg == [0, 0, 0, 1, 1, 0, 0]
    ids, seg = pack([[10, 11, 12]], 5, start=2, end=1, pad=0, add_end=False)
    assert ids == [2, 10, 11, 12, 0] and seg == [0, 0, 0, 0, 0]


def test_training_layout_shifts_labels(vocabulary):
    tokenizer = PaliGemmaTokenizer(vocabulary)
    pre = PaliGemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    x, y, weight = pre({"images": np.zeros((4, 4, 3)), "prompts": "caption en\n", "responses": "cat"})
    prompt, response = tokenizer("caption en\n").tolist(), tokenizer("cat").tolist()
    full = [2] + prompt + response + [1]
    assert len(full) < 17, "the example must fit without truncation"
    full += [0] * (17 - len(full))
    np.testing.assert_array_equal(x["token_ids"], full[:-1])
    np.testing.assert_array_equal(y, full[1:])
    np.testing.assert_array_equal(x["padding_mask"], np.array(full[:-1]) != 0)
    n_prompt = 1 + len(prompt)
    expected_response = [False] * n_prompt + [True] * (len(response) + 1)
    expected_response += [False] * (17 - len(expected_response))
    np.testing.assert_array_equal(x["response_mask"], expected_response[:-1])
    np.testing.assert_array_equal(weight, expected_response[1:])  # the loss covers response and eos targets


@needs_keras
@pytest.mark.keras
@pytest.mark.parametrize("length", [4, 7, 12, 30])
def test_equal_to_keras(vocabulary, length):
    import keras_hub

    proto = vocabulary.read_bytes()
    theirs = keras_hub.models.PaliGemmaCausalLMPreprocessor(
        tokenizer=keras_hub.models.PaliGemmaTokenizer(proto=proto), sequence_length=length)
    ours = PaliGemmaCausalLMPreprocessor(PaliGemmaTokenizer(proto), sequence_length=length)
    images = np.zeros((len(PROMPTS), 8, 8, 3), np.float32)
    x = {"images": images, "prompts": PROMPTS, "responses": RESPONSES}
    (kx, ky, kw), (mx, my, mw) = theirs(dict(x)), ours(dict(x))
    for key in ("token_ids", "padding_mask", "response_mask"):
        np.testing.assert_array_equal(mx[key], np.asarray(kx[key]), err_msg=f"{key}, length {length}")
    np.testing.assert_array_equal(my, np.asarray(ky))
    np.testing.assert_array_equal(mw, np.asarray(kw))
    for with_responses in (False, True):
        g = {"images": images, "prompts": PROMPTS, **({"responses": RESPONSES} if with_responses else {})}
        kg, mg = theirs.generate_preprocess(dict(g)), ours.generate_preprocess(dict(g))
        for key in ("token_ids", "padding_mask", "response_mask"):
            np.testing.assert_array_equal(mg[key], np.asarray(kg[key]), err_msg=f"generate {key}, length {length}")
    # Unbatched: one string in, rank-1 arrays out.
    kg = theirs.generate_preprocess({"images": images[0], "prompts": PROMPTS[0]})
    mg = ours.generate_preprocess({"images": images[0], "prompts": PROMPTS[0]})
    np.testing.assert_array_equal(mg["token_ids"], np.asarray(kg["token_ids"]))
    ids = np.asarray(kg["token_ids"])[None].repeat(2, 0)
    post = {"token_ids": ids, "padding_mask": ids != 0}
    assert ours.generate_postprocess(post) == list(theirs.generate_postprocess(post))


@needs_keras
@pytest.mark.keras
def test_from_preset_reads_keras_preprocessor_json(vocabulary, tmp_path):
    import keras_hub

    theirs = keras_hub.models.PaliGemmaCausalLMPreprocessor(
        tokenizer=keras_hub.models.PaliGemmaTokenizer(proto=vocabulary.read_bytes()),
        image_converter=keras_hub.layers.PaliGemmaImageConverter(image_size=(14, 14), scale=1 / 127.5, offset=-1.0),
        sequence_length=17, add_end_token=False)
    theirs.save_to_preset(str(tmp_path))
    ours = PaliGemmaCausalLMPreprocessor.from_preset(tmp_path)
    assert (ours.sequence_length, ours.add_start_token, ours.add_end_token) == (17, True, False)
    assert ours.image_converter == PaliGemmaImageConverter(image_size=(14, 14), scale=1 / 127.5, offset=-1.0)
    image = np.random.default_rng(0).integers(0, 256, (20, 31, 3)).astype(np.uint8)
    x = {"images": image, "prompts": "caption en\n", "responses": "cat dog"}
    kx, ky, kw = theirs(dict(x))
    mx, my, mw = ours(dict(x))
    np.testing.assert_array_equal(mx["token_ids"], np.asarray(kx["token_ids"]))
    np.testing.assert_array_equal(my, np.asarray(ky))
    np.testing.assert_allclose(mx["images"], np.asarray(kx["images"]), atol=1e-5)


def test_bad_inputs(vocabulary):
    pre = PaliGemmaCausalLMPreprocessor(PaliGemmaTokenizer(vocabulary), sequence_length=8)
    with pytest.raises(ValueError, match=r"missing \['responses'\]"):
        pre({"images": np.zeros((4, 4, 3)), "prompts": "a"})
    with pytest.raises(ValueError, match="same batch structure"):
        pre({"images": np.zeros((2, 4, 4, 3)), "prompts": ["a", "b"], "responses": ["c"]})
    with pytest.raises(ValueError, match="sequence_length=0"):
        PaliGemmaCausalLMPreprocessor(PaliGemmaTokenizer(vocabulary), sequence_length=0)
    with pytest.raises(ValueError, match="input 'prompts': tokenize: element 0 must be a string"):
        pre.generate_preprocess({"images": np.zeros((4, 4, 3)), "prompts": [7]})
