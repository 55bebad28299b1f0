"""The Gemma text tower: token embedding, decoder blocks, final norm and the tied LM head (spec sections 3-5).

A decoder block, with PaliGemma 2's optional post-norms in brackets:

    x = x + [post_attn_norm](attention(pre_attn_norm(x)))
    x = x + [post_ffw_norm](W_down (gelu_tanh(h W_gate) * h W_up)),   h = pre_ffw_norm(x)

RMSNorm always computes in float32 (float64 in the float64 policy) and casts its output to the compute dtype. The
attention softmax also runs in float32. Everything else produces tensors in the compute dtype (``policy.cast``).
"""

from __future__ import annotations

import math

import numpy as np

from refimpl import ops
from refimpl.attention import sliding_window_band
from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import Policy
from refimpl.kernels import Kernels
from refimpl.params import DecoderBlockParams
from refimpl.taps import NO_TAPS, Recorder

# keras-hub builds every decoder-block RMSNorm with epsilon 1e-6; ``layer_norm_epsilon`` reaches only the final norm.
DECODER_NORM_EPSILON = 1e-6


def embed_text(token_ids: np.ndarray, table: np.ndarray, config: PaliGemmaConfig, policy: Policy) -> np.ndarray:
    """f[B, T, D]: rows of the embedding table times sqrt(D), sqrt(D) cast to the compute dtype first."""
    return policy.cast(policy.cast(table[token_ids]) * policy.scalar(math.sqrt(config.hidden_dim)))


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float, policy: Policy, kernels: Kernels) -> np.ndarray:
    return policy.cast(kernels.rms_norm(x, scale, eps))


def project_qkv(h: np.ndarray, block: DecoderBlockParams, config: PaliGemmaConfig, policy: Policy,
                kernels: Kernels, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries f[B, T, N, H] (RoPE'd and scaled), keys f[B, T, K, H] (RoPE'd), values f[B, T, K, H].

    ``positions`` f[T] are the absolute positions of the T rows of h f[B, T, D] (RoPE angles).
    """
    batch, length, _ = h.shape
    n, k, hd = config.num_query_heads, config.num_key_value_heads, config.head_dim
    q = policy.cast(kernels.matmul(h, block.wq)).reshape(batch, length, n, hd)
    key = policy.cast(kernels.matmul(h, block.wk)).reshape(batch, length, k, hd)
    value = policy.cast(kernels.matmul(h, block.wv)).reshape(batch, length, k, hd)
    cos, sin = (policy.cast(table) for table in ops.rope_tables(positions, hd, policy.dtype))
    q = kernels.rope(q, cos, sin, policy.rounding)
    key = kernels.rope(key, cos, sin, policy.rounding)
    # Quirk Q1: keras-hub scales by 1/sqrt(head_dim) whatever query_head_dim_normalize says.
    q = policy.cast(q * policy.scalar(1.0 / math.sqrt(hd)))
    return q, key, value


def attention_block(h: np.ndarray, block: DecoderBlockParams, config: PaliGemmaConfig, policy: Policy,
                    kernels: Kernels, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Grouped-query self-attention with RoPE. h f[B, T, D], mask bool[B, T, S=T], positions f[T] -> f[B, T, D]."""
    batch, length, _ = h.shape
    q, key, value = project_qkv(h, block, config, policy, kernels, positions)
    o = kernels.attention(q, key, value, mask, logit_soft_cap=config.attention_logit_soft_cap,
                          rnd=policy.rounding)
    return policy.cast(kernels.matmul(o.reshape(batch, length, -1), block.wo))


def feed_forward(h: np.ndarray, block: DecoderBlockParams, policy: Policy, kernels: Kernels) -> np.ndarray:
    """Gated GELU MLP: (gelu_tanh(h W_gate) * (h W_up)) W_down; no biases."""
    gate = kernels.gelu_tanh(policy.cast(kernels.matmul(h, block.w_gate)), policy.rounding)
    up = policy.cast(kernels.matmul(h, block.w_up))
    return policy.cast(kernels.matmul(policy.cast(gate * up), block.w_down))


def layer_mask(mask: np.ndarray, layer: int, positions: np.ndarray, config: PaliGemmaConfig) -> np.ndarray:
    """The prefix-LM mask, ANDed with the symmetric sliding band on the layers that use it."""
    if not config.uses_sliding_window(layer):
        return mask
    return mask & sliding_window_band(positions, mask.shape[-1], config.sliding_window_size)[None]


def decoder_block(x: np.ndarray, block: DecoderBlockParams, config: PaliGemmaConfig, policy: Policy,
                  kernels: Kernels, mask: np.ndarray, positions: np.ndarray, rec: Recorder = NO_TAPS,
                  name: str = "llm/layer") -> np.ndarray:
    """One decoder block: x f[B, T, D] -> f[B, T, D]."""
    h = rms_norm(x, block.pre_attention_norm, DECODER_NORM_EPSILON, policy, kernels)
    rec(f"{name}/pre_attn_norm", h)
    a = attention_block(h, block, config, policy, kernels, mask, positions)
    rec(f"{name}/attn_out", a)
    if block.post_attention_norm is not None:
        a = rms_norm(a, block.post_attention_norm, DECODER_NORM_EPSILON, policy, kernels)
        rec(f"{name}/post_attn_norm", a)
    x = policy.cast(x + a)
    rec(f"{name}/attn_residual", x)
    h = rms_norm(x, block.pre_ffw_norm, DECODER_NORM_EPSILON, policy, kernels)
    rec(f"{name}/pre_ffw_norm", h)
    f = feed_forward(h, block, policy, kernels)
    rec(f"{name}/ffw_out", f)
    if block.post_ffw_norm is not None:
        f = rms_norm(f, block.post_ffw_norm, DECODER_NORM_EPSILON, policy, kernels)
        rec(f"{name}/post_ffw_norm", f)
    return policy.cast(x + f)


def lm_head(hidden: np.ndarray, table: np.ndarray, config: PaliGemmaConfig, policy: Policy,
            kernels: Kernels) -> np.ndarray:
    """Tied LM head f[..., D] -> f[..., V]: hidden @ table^T, then the final soft-cap if configured.

    Under both bf16 policies the logits are bf16 (the reader rounds the table for mixed_bfloat16 too).
    """
    rnd = policy.rounding
    logits = rnd(tied_logits(hidden, table, kernels))
    if config.final_logit_soft_cap is not None:
        logits = ops.soft_cap(logits, config.final_logit_soft_cap, rnd)
    return logits


def tied_logits(hidden: np.ndarray, table, kernels: Kernels) -> np.ndarray:
    """hidden f[..., D] @ table f[V, D]^T -> f[..., V]; a table streamed from the file is walked a slab at a time."""
    if isinstance(table, np.ndarray):
        return kernels.matmul(hidden, table.T)
    # ``weights.StreamedTable`` (from_preset(..., stream=True)): only one slab of rows is ever resident.
    out = np.empty(hidden.shape[:-1] + (table.shape[0],), dtype=hidden.dtype)
    for rows, slab in table.row_slabs():
        out[..., rows] = kernels.matmul(hidden, slab.T)
    return out


# ---- cached decoding (keras-hub's call_with_cache; spec section 5.2) ------------------------------------------
def attention_block_cached(h: np.ndarray, block: DecoderBlockParams, config: PaliGemmaConfig, policy: Policy,
                           kernels: Kernels, mask: np.ndarray, positions: np.ndarray, cache_keys: np.ndarray,
                           cache_values: np.ndarray) -> np.ndarray:
    """Attention of the rows of h over a key/value cache, after writing their own keys and values into it.

    Args:
      h: f[B, T, D] pre-attention-norm output of the T positions being computed.
      positions: int[T], their absolute positions (cache slots), consecutive as keras' ``cache_update_index``.
      cache_keys, cache_values: f[B, S, K, H], updated in place at ``positions`` (keys RoPE'd, in the compute
        dtype; keras also interleaves the key halves, which does not change q.k, so we do not).
      mask: bool[B, T, S] over all S cache slots; unwritten slots must be masked.
    Returns:
      f[B, T, D].
    """
    batch, length, _ = h.shape
    q, key, value = project_qkv(h, block, config, policy, kernels, positions)
    cache_keys[:, positions] = key
    cache_values[:, positions] = value
    o = kernels.attention(q, cache_keys, cache_values, mask, logit_soft_cap=config.attention_logit_soft_cap,
                          rnd=policy.rounding)
    return policy.cast(kernels.matmul(o.reshape(batch, length, -1), block.wo))


def decoder_block_cached(x: np.ndarray, block: DecoderBlockParams, config: PaliGemmaConfig, policy: Policy,
                         kernels: Kernels, mask: np.ndarray, positions: np.ndarray, cache_keys: np.ndarray,
                         cache_values: np.ndarray) -> np.ndarray:
    """``decoder_block`` for x f[B, T, D] at absolute ``positions``, attending over (and updating) a KV cache."""
    h = rms_norm(x, block.pre_attention_norm, DECODER_NORM_EPSILON, policy, kernels)
    a = attention_block_cached(h, block, config, policy, kernels, mask, positions, cache_keys, cache_values)
    if block.post_attention_norm is not None:
        a = rms_norm(a, block.post_attention_norm, DECODER_NORM_EPSILON, policy, kernels)
    x = policy.cast(x + a)
    f = feed_forward(rms_norm(x, block.pre_ffw_norm, DECODER_NORM_EPSILON, policy, kernels), block, policy, kernels)
    if block.post_ffw_norm is not None:
        f = rms_norm(f, block.post_ffw_norm, DECODER_NORM_EPSILON, policy, kernels)
    return policy.cast(x + f)
