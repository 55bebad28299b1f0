"""Random weights from a seed, with keras-hub's initializer families (spec section 9.1).

Like a fresh keras model, norms start as identities (LayerNorm gamma 1, beta 0; RMSNorm scale 0) and biases as 0.
Use ``perturb=True`` for test models: then every weight is random, so a wrong (1 + scale) or a dropped bias shows.
"""

from __future__ import annotations

import math

import numpy as np

from refimpl.config import PaliGemmaConfig
from refimpl.params import DecoderBlockParams, PaliGemmaParams, VitBlockParams, VitParams


class _Init:
    def __init__(self, seed: int, dtype, perturb: bool):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.perturb = perturb

    def glorot(self, fan_in: int, fan_out: int, shape) -> np.ndarray:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return self.rng.uniform(-limit, limit, size=shape).astype(self.dtype)

    def const(self, value: float, size: int) -> np.ndarray:
        out = np.full(size, value, dtype=self.dtype)
        if self.perturb:
            out += self.rng.normal(0.0, 0.2, size=size).astype(self.dtype)
        return out


def _vit_block(c: PaliGemmaConfig, init: _Init) -> VitBlockParams:
    dv, iv = c.vit_hidden_dim, c.vit_intermediate_dim
    return VitBlockParams(
        ln1_gamma=init.const(1.0, dv), ln1_beta=init.const(0.0, dv),
        wq=init.glorot(dv, dv, (dv, dv)), bq=init.const(0.0, dv),
        wk=init.glorot(dv, dv, (dv, dv)), bk=init.const(0.0, dv),
        wv=init.glorot(dv, dv, (dv, dv)), bv=init.const(0.0, dv),
        wo=init.glorot(dv, dv, (dv, dv)), bo=init.const(0.0, dv),
        ln2_gamma=init.const(1.0, dv), ln2_beta=init.const(0.0, dv),
        mlp1_kernel=init.glorot(dv, iv, (dv, iv)), mlp1_bias=init.const(0.0, iv),
        mlp2_kernel=init.glorot(iv, dv, (iv, dv)), mlp2_bias=init.const(0.0, dv))


def _decoder_block(c: PaliGemmaConfig, init: _Init) -> DecoderBlockParams:
    d, n, k, h, f = c.hidden_dim, c.num_query_heads, c.num_key_value_heads, c.head_dim, c.ffw_dim
    # keras' EinsumDense fans for an (N, D, H) kernel: fan_in = N*D, fan_out = N*H (leading axes are receptive field).
    return DecoderBlockParams(
        pre_attention_norm=init.const(0.0, d),
        wq=init.glorot(n * d, n * h, (d, n * h)), wk=init.glorot(k * d, k * h, (d, k * h)),
        wv=init.glorot(k * d, k * h, (d, k * h)), wo=init.glorot(n * h, n * d, (n * h, d)),
        pre_ffw_norm=init.const(0.0, d),
        w_gate=init.glorot(d, f, (d, f)), w_up=init.glorot(d, f, (d, f)), w_down=init.glorot(f, d, (f, d)),
        post_attention_norm=init.const(0.0, d) if c.use_post_attention_norm else None,
        post_ffw_norm=init.const(0.0, d) if c.use_post_ffw_norm else None)


def random_params(config: PaliGemmaConfig, *, seed: int = 0, dtype=np.float32,
                  perturb: bool = False) -> PaliGemmaParams:
    """Weights drawn with keras' initializer families; deterministic in ``seed``."""
    c, init = config, _Init(seed, dtype, perturb)
    dv, p = c.vit_hidden_dim, c.vit_patch_size
    vit = VitParams(
        patch_kernel=init.glorot(p * p * 3, p * p * dv, (p * p * 3, dv)),
        patch_bias=init.const(0.0, dv),
        position_embedding=init.rng.uniform(-0.05, 0.05, (c.image_sequence_length, dv)).astype(dtype),
        blocks=tuple(_vit_block(c, init) for _ in range(c.vit_num_layers)),
        encoder_ln_gamma=init.const(1.0, dv), encoder_ln_beta=init.const(0.0, dv),
        proj_kernel=init.glorot(dv, c.hidden_dim, (dv, c.hidden_dim)), proj_bias=init.const(0.0, c.hidden_dim))
    # VarianceScaling(1, "fan_in", untruncated normal) with keras' fan_in of a (V, D) table = V.
    embedding = init.rng.normal(0.0, 1.0 / math.sqrt(c.vocabulary_size),
                                (c.vocabulary_size, c.hidden_dim)).astype(dtype)
    if perturb:
        embedding *= math.sqrt(c.vocabulary_size)
    blocks = tuple(_decoder_block(c, init) for _ in range(c.num_layers))
    return PaliGemmaParams(vit=vit, token_embedding=embedding, blocks=blocks, final_norm=init.const(0.0, c.hidden_dim))
