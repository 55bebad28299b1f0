"""Cached generation against full recomputation, and the masks keras-hub's generate_step implies (spec 5.2).

No keras here: random perturbed refimpl models. The properties:
- the KV-cache path and the full-recompute path (``use_cache=False``: keras' seed pass and causal steps redone
  from scratch at every step) give the same ids, and logits within float32 noise, at every step, for any batch of
  ragged prompts and stop lists;
- when all prompts have the same length, each step's logits equal a plain scoring forward pass (``lm(inputs)``,
  the backbone's prefix-LM mask) over the prompt plus the tokens generated so far, with the prompt as prefix and
  the generated tokens as response. (With ragged prompts no single-mask pass reproduces keras: see
  ``refimpl/causal_lm.py``; the last test pins that quirk.)
- the seed-pass mask equals the literal matrix of spec 4.3 (verified there against keras' mask code).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from _generation_helpers import CONFIGS
from refimpl.causal_lm import PaliGemmaCausalLM, _returned_padding_mask, seed_mask
from refimpl.config import PaliGemmaConfig
from refimpl.init import random_params
from refimpl.model import PaliGemmaBackbone

# float32 cache vs recompute: the same maths over different matmul shapes, so only summation order differs.
RTOL = 1e-5
TEXT_LENGTH = 9


def make_lm(name: str, seed: int, sampler="greedy") -> PaliGemmaCausalLM:
    config = PaliGemmaConfig.from_keras_config(CONFIGS[name])
    params = random_params(config, seed=seed, perturb=True)
    return PaliGemmaCausalLM(PaliGemmaBackbone.from_config_object(config, params), sampler=sampler)


@pytest.fixture(scope="module")
def lms():
    return {name: make_lm(name, seed) for seed, name in enumerate(CONFIGS, start=3)}


def ragged_inputs(lengths, seed: int, vocabulary: int = 211):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), TEXT_LENGTH), np.int32)
    for row, n in enumerate(lengths):
        ids[row, 0] = 2
        ids[row, 1:n] = rng.integers(3, vocabulary, n - 1)
    images = rng.uniform(-1, 1, (len(lengths), 28, 28, 3)).astype(np.float32)
    return {"images": images, "token_ids": ids, "padding_mask": ids != 0}


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.max(np.abs(reference)))


# ---- literal masks -------------------------------------------------------------------------------------------
def test_seed_mask_is_keras_response_mask_none_matrix():
    # Spec 4.3 worked example (verified there against keras' _compute_attention_mask): 2 image tokens, text
    # [bos, p, r, eos, pad], padding [1, 1, 1, 1, 0], response_mask=None: the middle matrix.
    expected = np.array([[1, 1, 1, 1, 1, 1, 0]] * 6 + [[1, 1, 1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(seed_mask(np.array([[1, 1, 1, 1, 0]], bool), 2)[0], expected)


def test_returned_padding_mask_rule():
    # keras: True up to and including the first stop token after the prompt; all True without stop ids.
    tokens = np.array([[2, 7, 5, 1, 9, 1], [2, 1, 8, 8, 8, 8]])
    prompt = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)  # row 1's prompt contains the stop id
    expected = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(_returned_padding_mask(tokens, np.array([1]), prompt), expected)
    assert _returned_padding_mask(tokens, None, prompt).all()


# ---- cache == recompute --------------------------------------------------------------------------------------
def assert_same_generation(cached, recomputed, label):
    assert cached["logits"].shape == recomputed["logits"].shape, label
    for step, (a, b) in enumerate(zip(cached["logits"], recomputed["logits"])):
        error = relative_error(a, b)
        assert error <= RTOL, f"{label} step {step}: cached vs recomputed logits differ by {error:.2e}"
    np.testing.assert_array_equal(cached["token_ids"], recomputed["token_ids"], err_msg=label)
    np.testing.assert_array_equal(cached["padding_mask"], recomputed["padding_mask"], err_msg=label)


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)),
       lengths=st.lists(st.integers(1, TEXT_LENGTH), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 16), stop=st.sampled_from([None, [4, 9], list(range(3, 60))]))
def test_cached_generation_equals_full_recompute(lms, name, lengths, seed, stop):
    x = ragged_inputs(lengths, seed)
    cached = lms[name].generate_step(x, stop, return_logits=True)
    recomputed = lms[name].generate_step(x, stop, return_logits=True, use_cache=False)
    assert_same_generation(cached, recomputed, f"{name} lengths={lengths} seed={seed} stop={stop}")


@pytest.mark.parametrize("name,lengths", [("pg1", [3]), ("pg2", [3]), ("pg2", [4, 4]), ("pg1", [1, 1])])
def test_step_logits_equal_scoring_forward_over_the_prefix(lms, name, lengths):
    """Equal prompts: step logits == lm(prompt as prefix + generated tokens as response) at the last position."""
    lm = lms[name]
    x = ragged_inputs(lengths, seed=5)
    out = lm.generate_step(x, return_logits=True)
    prompt_length = lengths[0]
    for logits, idx in zip(out["logits"], out["steps"]):
        prefix = out["token_ids"][:, :idx]
        response = np.broadcast_to(np.arange(idx)[None] >= prompt_length, prefix.shape)
        scoring = {"images": x["images"], "token_ids": prefix, "padding_mask": np.ones_like(prefix, bool),
                   "response_mask": response}
        error = relative_error(logits, lm(scoring)[:, -1])
        assert error <= RTOL, f"{name} {lengths} step {idx}: {error:.2e}"
    assert len(out["steps"]) == TEXT_LENGTH - prompt_length


def test_longer_prompts_in_a_batch_are_recomputed_causally(lms):
    """keras' quirk, kept on purpose: a row's result depends on the shortest prompt of its batch."""
    lm = lms["pg1"]
    x = ragged_inputs([2, 5], seed=8)
    alone = lm.generate_step({k: v[1:] for k, v in x.items()}, return_logits=True)
    batched = lm.generate_step(x, return_logits=True)
    # Row 1 alone starts sampling at idx 5; in the batch, steps 2-4 recompute its prompt causally first.
    last_alone, last_batched = alone["logits"][0][0], batched["logits"][3][1]  # both predict text position 5
    assert relative_error(last_batched, last_alone) > 1e-3


def test_progress_callback_counts_steps_and_stops_early():
    lm = make_lm("pg2", seed=1)
    x = ragged_inputs([2, 4], seed=2)
    calls = []
    every_token = list(range(1, lm.config.vocabulary_size))  # any generated token stops its row (0 is <pad>)
    out = lm.generate_step(x, every_token, progress=lambda done, total: calls.append((done, total)))
    # Steps run until both rows have a stop token after their prompts: row 1 needs its first generated token at 4.
    assert calls == [(1, 7), (2, 7), (3, 7)]
    np.testing.assert_array_equal(out["padding_mask"].sum(axis=1), [3, 5])
