"""The elementwise and reduction maths of both towers, in plain NumPy: this file is the specification.

Every function here takes and returns arrays of one float dtype (float32 or float64) and does its arithmetic in
that dtype, in the order keras does it. Rounding to bf16 is not done here; the towers call ``Policy.cast`` on the
results (see ``refimpl.dtypes``). The numba twins in ``refimpl.kernels`` must match these functions.

Axis letters (dtype first): B batch, T query positions, S key positions, N query heads, K key/value heads,
G = N / K, H head dim, D model width of the tower in question.
"""

from __future__ import annotations

import math

from typing import Callable

import numpy as np

from refimpl.dtypes import identity

Rounding = Callable[[np.ndarray], np.ndarray]

# RoPE base wavelength of every Gemma model (keras-hub's RotaryEmbedding ``max_wavelength``).
ROPE_MAX_WAVELENGTH = 10_000.0
# Value keras' Softmax layer writes into masked logits (``_large_negative_number`` for float32 inputs) before the
# softmax; masked outputs are then set to exactly 0, so a fully masked row gives zeros, never NaN.
MASKED_LOGIT = -1e9


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # f[..., I] @ f[I, O] -> f[..., O]
    """Dense projection without bias (BLAS)."""
    return np.matmul(x, w)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """Keras LayerNormalization over the last axis: population variance, then ``x*inv + (beta - mean*inv)``.

    keras computes ``inv = rsqrt(var + eps) * gamma`` and folds the mean into the bias; we keep its order.
    """
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    inv = (1.0 / np.sqrt(var + x.dtype.type(eps))) * gamma
    return x * inv + (beta - mean * inv)


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """Gemma RMSNorm: ``x * 1/sqrt(mean(x^2) + eps) * (1 + scale)``; no mean subtraction, no bias.

    The weight is stored as an offset from 1 (a fresh layer has scale 0 and is the identity).
    """
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    normed = x * (1.0 / np.sqrt(var + x.dtype.type(eps)))
    return normed * (1 + scale)


def gelu_tanh(x: np.ndarray, rnd: Rounding = identity) -> np.ndarray:
    """GELU with the tanh approximation (keras ``approximate=True``), used by both towers.

    Written in jax's order, ``x * (0.5 * (1 + tanh(c * (x + 0.044715 * ((x * x) * x)))))``, so that under bf16
    emulation ``rnd`` rounds after each primitive exactly where XLA rounds a bf16 computation.
    """
    # Constants take the array's dtype (jax casts them to bf16 too, hence rnd).
    c, k = (rnd(np.asarray(value, dtype=x.dtype))[()] for value in (math.sqrt(2.0 / math.pi), 0.044715))
    cube = rnd(rnd(x * x) * x)
    inner = rnd(c * rnd(x + rnd(k * cube)))
    cdf = rnd(x.dtype.type(0.5) * rnd(1 + rnd(np.tanh(inner))))
    return rnd(x * cdf)


def soft_cap(x: np.ndarray, cap: float, rnd: Rounding = identity) -> np.ndarray:
    """Gemma 2 soft-cap ``tanh(x / cap) * cap``: a smooth clamp of x into (-cap, cap), in keras' op order."""
    c = rnd(np.asarray(cap, dtype=x.dtype))[()]
    return rnd(rnd(np.tanh(rnd(x / c))) * c)


def rope_tables(positions: np.ndarray, head_dim: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables f[T, H] for absolute ``positions`` f[T].

    Inverse frequencies ``10000^(-2i/H)`` and angles are computed in float32 as keras does (float64 in the float64
    policy); each angle appears twice, ``[theta_0 .. theta_{H/2-1}, theta_0 .. theta_{H/2-1}]``.
    """
    work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    exponent = np.arange(0, head_dim, 2, dtype=work) / work(head_dim)
    inverse_freq = np.power(work(ROPE_MAX_WAVELENGTH), -exponent)
    angles = np.asarray(positions, dtype=work)[:, None] * inverse_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rnd: Rounding = identity) -> np.ndarray:
    """Rotate x f[B, T, heads, H] by cos, sin f[T, H]: ``x*cos + concat(-x2, x1)*sin`` (half split).

    Keras then interleaves the halves (Gemma's layout), identically for q and k, so q.k is unchanged; we omit
    that permutation, which matters only for the bit layout of a KV cache.
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return rnd(rnd(x * cos[:, None, :]) + rnd(rotated * sin[:, None, :]))


def masked_softmax(logits: np.ndarray, mask: np.ndarray | None, rnd: Rounding = identity) -> np.ndarray:
    """Softmax over the last axis with keras' masking: masked logits become -1e9, masked outputs exactly 0.

    ``rnd`` rounds each step (shift, exp, sum, divide) as jax's softmax does when it runs in bf16.
    """
    if mask is not None:
        logits = np.where(mask, logits, logits.dtype.type(MASKED_LOGIT))
    shifted = rnd(np.exp(rnd(logits - logits.max(axis=-1, keepdims=True))))
    probs = rnd(shifted / rnd(shifted.sum(axis=-1, keepdims=True)))
    if mask is not None:
        probs = np.where(mask, probs, probs.dtype.type(0))
    return probs
