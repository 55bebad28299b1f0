"""Attention for both towers and the prefix-LM mask of the decoder.

The mask rule is keras-hub's ``PaliGemmaDecoderBlock._compute_attention_mask`` (spec section 4.3): image tokens
and prompt tokens are a bidirectional prefix that every query sees, response tokens are causal, padding keys are
seen by nobody. Queries at padding positions still get a finite (meaningless) output, which the conformance harness
excludes by default.

Axis letters as in ``refimpl.ops``: B batch, T queries, S keys, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from refimpl import ops
from refimpl.dtypes import identity as _identity

Rounding = Callable[[np.ndarray], np.ndarray]


def prefix_lm_mask(padding_mask: np.ndarray, response_mask: np.ndarray | None,
                   num_image_tokens: int) -> np.ndarray:
    """bool[B, L, L] for L = image tokens + T text tokens, queries on axis 1, keys on axis 2.

    ``mask[b, t, s] = (present[s] and not response[s]) or (response[s] and s <= t)``, with image tokens present
    and never responses. ``response_mask=None`` behaves as all zeros (fully bidirectional over present tokens).
    """
    padding_mask = np.asarray(padding_mask, dtype=bool)
    batch, text_len = padding_mask.shape
    if response_mask is None:
        response_mask = np.zeros_like(padding_mask)
    image = np.ones((batch, num_image_tokens), dtype=bool)
    present = np.concatenate([image, padding_mask], axis=1)  # bool[B, L]
    response = np.concatenate([~image, np.asarray(response_mask, dtype=bool)], axis=1)  # bool[B, L]
    length = num_image_tokens + text_len
    causal = np.tril(np.ones((length, length), dtype=bool))  # causal[t, s] = s <= t
    prefix_keys = (present & ~response)[:, None, :]
    causal_response_keys = causal[None, :, :] & response[:, None, :]
    return prefix_keys | causal_response_keys


def causal_mask(query_positions: np.ndarray, key_len: int) -> np.ndarray:
    """bool[T, S]: query at absolute position p sees keys s <= p (cached generation steps)."""
    return np.arange(key_len)[None, :] <= np.asarray(query_positions)[:, None]


def sliding_window_band(query_positions: np.ndarray, key_len: int, window: int) -> np.ndarray:
    """bool[T, S]: |p - s| <= window - 1. keras-hub ANDs this symmetric band onto even layers' masks."""
    distance = np.abs(np.asarray(query_positions)[:, None] - np.arange(key_len)[None, :])
    return distance <= window - 1


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, *,
              score_divisor: float | None = None, logit_soft_cap: float | None = None,
              softmax_in_float32: bool = True, rnd: Rounding = _identity) -> np.ndarray:
    """Scaled dot-product attention with grouped key/value heads, one query head at a time.

    Args:
      q: f[B, T, N, H] queries (the decoder has already multiplied them by 1/sqrt(H)).
      k, v: f[B, S, K, H]; query head n uses kv head n // G (consecutive query heads share one).
      mask: bool[B, T, S] or None (the ViT attends everywhere).
      score_divisor: the ViT divides the scores by sqrt(head dim) after the matmul; None for the decoder.
      logit_soft_cap: Gemma 2's c*tanh(scores/c), applied before masking.
      softmax_in_float32: the decoder's keras Softmax layer computes in float32 and only its output is rounded;
        the ViT's softmax runs in the compute dtype, so under bf16 each of its steps is rounded.
      rnd: rounding applied wherever keras produces a tensor in the compute dtype (bf16 emulation).
    Returns:
      f[B, T, N, H]. Only one head's f[B, T, S] score matrix exists at a time.
    """
    batch, q_len, num_heads, _ = q.shape
    group = num_heads // k.shape[2]
    out = np.empty((batch, q_len, num_heads, v.shape[3]), dtype=q.dtype)
    mask_or_none = None if mask is None else np.asarray(mask, dtype=bool)
    for head in range(num_heads):
        kv_head = head // group
        scores = rnd(np.matmul(q[:, :, head, :], k[:, :, kv_head, :].transpose(0, 2, 1)))  # f[B, T, S]
        if score_divisor is not None:
            scores = rnd(scores / q.dtype.type(score_divisor))
        if logit_soft_cap is not None:
            scores = ops.soft_cap(scores, logit_soft_cap, rnd)
        probs = rnd(ops.masked_softmax(scores, mask_or_none, _identity if softmax_in_float32 else rnd))
        out[:, :, head, :] = rnd(np.matmul(probs, v[:, :, kv_head, :]))
    return out
