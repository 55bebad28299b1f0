"""The SigLIP image tower and its projector, top to bottom (spec section 2).

images f[B, S, S, 3] in [-1, 1]  ->  patches  ->  pre-LN encoder blocks  ->  LayerNorm  ->  projector f[B, P, D]

Every tensor a keras layer returns is passed through ``policy.cast`` (a no-op except under the bf16 policies, where
it rounds to bf16 as keras' compute dtype would). LayerNorm runs in float32 and rounds its output (keras >= 3.6).
The ViT softmax runs in the compute dtype (under bf16, every step of it is rounded).
"""

from __future__ import annotations

import math

import numpy as np

from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import Policy
from refimpl.kernels import Kernels
from refimpl.params import VitBlockParams, VitParams
from refimpl.taps import NO_TAPS, Recorder

# Fixed by keras-hub for every ViT LayerNorm (not configurable, unlike the decoder's final norm).
VIT_LAYER_NORM_EPSILON = 1e-6
# keras-nlp 0.12.1-0.15 ``Rescaling(scale=1/127.5, offset=-1)``: [0, 255] -> [-1, 1] in one affine op.
RESCALE_SCALE, RESCALE_OFFSET = 1.0 / 127.5, -1.0


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, policy: Policy, kernels: Kernels) -> np.ndarray:
    """Keras Dense with bias: the matmul result and the bias add are each a tensor in the compute dtype."""
    return policy.cast(policy.cast(kernels.matmul(x, kernel)) + bias)


def patchify(images: np.ndarray, patch: int) -> np.ndarray:  # f[B, S, S, 3] -> f[B, P, patch*patch*3]
    """Non-overlapping patches in row-major order, each flattened as (row, col, channel) like an HWIO kernel."""
    batch, size, _, channels = images.shape
    n = size // patch
    patches = images.reshape(batch, n, patch, n, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(batch, n * n, patch * patch * channels)


def embed_patches(images: np.ndarray, params: VitParams, config: PaliGemmaConfig, policy: Policy,
                  kernels: Kernels) -> np.ndarray:
    """The stride-P "valid" convolution as a matmul on patches, plus bias, plus the learned position table."""
    x = dense(patchify(images, config.vit_patch_size), params.patch_kernel, params.patch_bias, policy, kernels)
    return policy.cast(x + params.position_embedding)


def self_attention(h: np.ndarray, block: VitBlockParams, config: PaliGemmaConfig, policy: Policy,
                   kernels: Kernels) -> np.ndarray:
    """Multi-head self-attention over all image tokens; head n is the contiguous feature slice n*hv:(n+1)*hv."""
    batch, tokens, width = h.shape
    heads, head_dim = config.vit_num_heads, config.vit_head_dim
    q, k, v = (dense(h, w, b, policy, kernels).reshape(batch, tokens, heads, head_dim)
               for w, b in ((block.wq, block.bq), (block.wk, block.bk), (block.wv, block.bv)))
    # keras divides the scores by cast(sqrt(hv)) after the matmul (8.5 for hv=72 under bf16).
    divisor = float(policy.scalar(math.sqrt(head_dim)))
    o = kernels.attention(q, k, v, None, score_divisor=divisor, softmax_in_float32=False, rnd=policy.rounding)
    return dense(o.reshape(batch, tokens, width), block.wo, block.bo, policy, kernels)


def encoder_block(x: np.ndarray, block: VitBlockParams, config: PaliGemmaConfig, policy: Policy,
                  kernels: Kernels, rec: Recorder, name: str) -> np.ndarray:
    """Pre-LN transformer block: x + attn(LN1(x)), then + MLP(LN2(.)) with a tanh-GELU."""
    h = policy.cast(kernels.layer_norm(x, block.ln1_gamma, block.ln1_beta, VIT_LAYER_NORM_EPSILON))
    rec(f"{name}/ln1", h)
    a = self_attention(h, block, config, policy, kernels)
    rec(f"{name}/attn_out", a)
    x = policy.cast(x + a)
    rec(f"{name}/attn_residual", x)
    h = policy.cast(kernels.layer_norm(x, block.ln2_gamma, block.ln2_beta, VIT_LAYER_NORM_EPSILON))
    rec(f"{name}/ln2", h)
    m = kernels.gelu_tanh(dense(h, block.mlp1_kernel, block.mlp1_bias, policy, kernels), policy.rounding)
    m = dense(m, block.mlp2_kernel, block.mlp2_bias, policy, kernels)
    rec(f"{name}/mlp_out", m)
    return policy.cast(x + m)


def vit_forward(images: np.ndarray, params: VitParams, config: PaliGemmaConfig, policy: Policy,
                kernels: Kernels, rec: Recorder = NO_TAPS) -> np.ndarray:
    """Image tokens for the decoder.

    Args:
      images: f[B, S, S, 3], already validated; in [0, 255] if ``config.include_rescaling`` else in [-1, 1].
    Returns:
      f[B, P, D], P = (S / patch)^2 image tokens projected to the text width D (never scaled by sqrt(D)).
    """
    x = policy.cast(images)
    if config.include_rescaling:
        x = policy.cast(x * policy.scalar(RESCALE_SCALE) + policy.scalar(RESCALE_OFFSET))
    rec("img/pixels", x)
    x = embed_patches(x, params, config, policy, kernels)
    rec("img/embed", x)
    for j, block in enumerate(params.blocks):
        x = encoder_block(x, block, config, policy, kernels, rec, f"img/block{j:02d}")
        rec(f"img/block{j:02d}/out", x)
    x = policy.cast(kernels.layer_norm(x, params.encoder_ln_gamma, params.encoder_ln_beta, VIT_LAYER_NORM_EPSILON))
    rec("img/encoded", x)
    x = dense(x, params.proj_kernel, params.proj_bias, policy, kernels)
    rec("img/proj", x)
    return x
