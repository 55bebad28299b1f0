"""Samplers with keras-hub's semantics: hand-checked probabilities and supports, seeded reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refimpl.samplers import (GreedySampler, RandomSampler, TopKSampler, TopPSampler, get_sampler,
                              softmax_float32)


def test_softmax_float32_with_temperature():
    logits = np.array([[0.0, math.log(3.0)]])
    np.testing.assert_allclose(softmax_float32(logits), [[0.25, 0.75]], rtol=1e-6)
    # Temperature 2 halves the logits: probabilities 1 : sqrt(3).
    r = math.sqrt(3.0)
    np.testing.assert_allclose(softmax_float32(logits, 2.0), [[1 / (1 + r), r / (1 + r)]], rtol=1e-6)
    assert softmax_float32(np.array([[1e4, 0.0]], np.float64)).dtype == np.float32


def test_greedy_takes_the_lowest_id_on_ties():
    np.testing.assert_array_equal(GreedySampler()(np.array([[1.0, 3.0, 3.0], [5.0, 0.0, 5.0]])), [1, 0])


def draw(sampler, probabilities, n=4000):
    with np.errstate(divide="ignore"):  # a probability of 0 is a logit of -inf on purpose
        logits = np.log(np.asarray(probabilities, np.float64))[None].repeat(n, 0)
    return sampler(logits)


def test_top_k_draws_only_the_k_best_in_proportion():
    ids = draw(TopKSampler(k=2, seed=0), [0.1, 0.2, 0.3, 0.4])
    assert set(ids.tolist()) == {2, 3}
    assert abs(np.mean(ids == 3) - 4 / 7) < 0.03


def test_top_p_keeps_keras_head():
    # keras keeps a token if the cumulative probability before it is <= p (the first is always kept):
    # probs 0.5, 0.3, 0.2 -> cumulative 0.5, 0.8, 1.0.
    assert set(draw(TopPSampler(p=0.45, seed=0), [0.5, 0.3, 0.2]).tolist()) == {0}
    head = draw(TopPSampler(p=0.55, seed=0), [0.5, 0.3, 0.2])
    assert set(head.tolist()) == {0, 1} and abs(np.mean(head == 0) - 0.5 / 0.8) < 0.03
    assert set(draw(TopPSampler(p=0.9, seed=0), [0.5, 0.3, 0.2]).tolist()) == {0, 1, 2}
    # k first cuts the candidates to the k best.
    assert set(draw(TopPSampler(p=1.0, k=1, seed=0), [0.2, 0.5, 0.3]).tolist()) == {1}


def test_random_sampler_frequencies_and_seed():
    ids = draw(RandomSampler(seed=3), [0.7, 0.0, 0.3])
    assert 1 not in ids and abs(np.mean(ids == 0) - 0.7) < 0.03
    np.testing.assert_array_equal(draw(RandomSampler(seed=3), [0.5, 0.5], 50), draw(RandomSampler(seed=3),
                                                                                    [0.5, 0.5], 50))


def test_get_sampler_and_bad_arguments():
    assert isinstance(get_sampler("top_k", k=3, seed=1), TopKSampler)
    sampler = GreedySampler()
    assert get_sampler(sampler) is sampler
    with pytest.raises(ValueError, match="sampler='beam' is unknown"):
        get_sampler("beam")
    with pytest.raises(ValueError, match="k=0"):
        get_sampler("top_k", k=0)
    with pytest.raises(ValueError, match="p=1.5"):
        get_sampler("top_p", p=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        get_sampler("greedy", temperature=0)
    with pytest.raises(ValueError, match="sampler 'greedy'"):
        get_sampler("greedy", seed=1)
