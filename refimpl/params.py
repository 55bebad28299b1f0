"""Model parameters as frozen dataclasses of arrays, in the layout the math uses.

Only ``refimpl.weights`` builds these (from a Keras file) and ``refimpl.init`` (random, from a seed). Every
re-layout from the Keras variable shapes happens there, once, so the forward pass contains matmuls only:

    Keras variable                         here                         why
    patch conv kernel f[P, P, 3, Dv]       patch_kernel f[P*P*3, Dv]    a patch flattened (row, col, channel)
    query kernel f[N, D, H]                wq f[D, N*H]                 column n*H + h is head n, dim h
    key / value kernel f[K, D, H]          wk, wv f[D, K*H]
    output kernel f[N, H, D]               wo f[N*H, D]
    everything else                        unchanged

Arrays are float32 or float64 (the compute dtype). Under the bf16 policies they hold bf16-representable values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class _Arrays:
    def arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        """(field name, array) for every array field that is set."""
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                yield field.name, value

    def flat(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Every array of the tree by its field path: ``"token_embedding"``, ``"vit.blocks[0].wq"``,
        ``"blocks[1].w_gate"`` (the names ``refimpl.weights`` gives its entries' fields)."""
        out: dict[str, np.ndarray] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                out[prefix + field.name] = value
            elif isinstance(value, _Arrays):
                out.update(value.flat(f"{prefix}{field.name}."))
            elif isinstance(value, (tuple, list)):
                for index, item in enumerate(value):
                    out.update(item.flat(f"{prefix}{field.name}[{index}]."))
        return out

    def astype(self, dtype):
        """A copy of this tree with every array converted to ``dtype`` (float32 weights widened to float64 keep
        their values exactly: only the arithmetic done with them changes)."""
        def convert(value):
            if isinstance(value, (np.ndarray, _Arrays)):
                return value.astype(dtype)
            if isinstance(value, (tuple, list)):
                return tuple(convert(item) for item in value)
            return value

        return replace(self, **{field.name: convert(getattr(self, field.name)) for field in fields(self)})

    @property
    def nbytes(self) -> int:
        """Bytes of every array in the tree (streamed parts, which are not arrays, count nothing)."""
        return sum(a.nbytes for a in self.flat().values())


@dataclass(frozen=True)
class VitBlockParams(_Arrays):
    """One SigLIP encoder block (pre-LN). Dv = vit_hidden_dim, Iv = vit_intermediate_dim."""

    ln1_gamma: np.ndarray  # f[Dv]
    ln1_beta: np.ndarray  # f[Dv]
    wq: np.ndarray  # f[Dv, Dv]
    bq: np.ndarray  # f[Dv]
    wk: np.ndarray  # f[Dv, Dv]
    bk: np.ndarray  # f[Dv]
    wv: np.ndarray  # f[Dv, Dv]
    bv: np.ndarray  # f[Dv]
    wo: np.ndarray  # f[Dv, Dv]
    bo: np.ndarray  # f[Dv]
    ln2_gamma: np.ndarray  # f[Dv]
    ln2_beta: np.ndarray  # f[Dv]
    mlp1_kernel: np.ndarray  # f[Dv, Iv]
    mlp1_bias: np.ndarray  # f[Iv]
    mlp2_kernel: np.ndarray  # f[Iv, Dv]
    mlp2_bias: np.ndarray  # f[Dv]


@dataclass(frozen=True)
class VitParams(_Arrays):
    """The image tower and its projector into the text width D."""

    patch_kernel: np.ndarray  # f[P*P*3, Dv]
    patch_bias: np.ndarray  # f[Dv]
    position_embedding: np.ndarray  # f[N_img, Dv]
    blocks: Sequence[VitBlockParams]
    encoder_ln_gamma: np.ndarray  # f[Dv]
    encoder_ln_beta: np.ndarray  # f[Dv]
    proj_kernel: np.ndarray  # f[Dv, D]  (keras "image_classifier")
    proj_bias: np.ndarray  # f[D]


@dataclass(frozen=True)
class DecoderBlockParams(_Arrays):
    """One Gemma decoder block. RMSNorm scales use the (1 + scale) convention; no biases anywhere."""

    pre_attention_norm: np.ndarray  # f[D]
    wq: np.ndarray  # f[D, N*H]
    wk: np.ndarray  # f[D, K*H]
    wv: np.ndarray  # f[D, K*H]
    wo: np.ndarray  # f[N*H, D]
    pre_ffw_norm: np.ndarray  # f[D]
    w_gate: np.ndarray  # f[D, F]   keras "ffw_gating": the GELU branch
    w_up: np.ndarray  # f[D, F]     keras "ffw_gating_2"
    w_down: np.ndarray  # f[F, D]   keras "ffw_linear"
    post_attention_norm: np.ndarray | None = None  # f[D], PaliGemma 2 only
    post_ffw_norm: np.ndarray | None = None  # f[D], PaliGemma 2 only


@dataclass(frozen=True)
class PaliGemmaParams(_Arrays):
    vit: VitParams
    token_embedding: np.ndarray  # f[V, D]; also the tied LM head
    blocks: Sequence[DecoderBlockParams]
    final_norm: np.ndarray  # f[D]
