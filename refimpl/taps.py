"""Named intermediate tensors ("taps"): the one list of names and their definitions.

A tap is a tensor the conformance harness can compare between backends. Names are hierarchical with zero-padded
block numbers; they are recorded in forward order, which is how the harness finds the first divergence.
``golden/README.md`` mirrors these definitions. Shapes use L = image tokens + T text tokens.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

# name pattern -> definition. {j} is a ViT block, {i} a decoder block, both two digits (00, 01, ...).
TAP_DEFINITIONS: dict[str, str] = {
    "img/pixels": "f[B, S, S, 3] the images as the ViT sees them, in [-1, 1] (after the in-backbone rescaling of "
                  "keras-nlp configs with include_rescaling=true; unchanged otherwise)",
    "img/embed": "f[B, P, Dv] patch embedding (conv as a matmul, plus bias) plus the learned position embedding",
    "img/block{j}/ln1": "f[B, P, Dv] first LayerNorm of ViT block j",
    "img/block{j}/attn_out": "f[B, P, Dv] ViT self-attention output after out_proj (with bias), before the residual",
    "img/block{j}/attn_residual": "f[B, P, Dv] block input plus attn_out",
    "img/block{j}/ln2": "f[B, P, Dv] second LayerNorm of ViT block j",
    "img/block{j}/mlp_out": "f[B, P, Dv] MLP output: dense, tanh-GELU, dense (with biases), before the residual",
    "img/block{j}/out": "f[B, P, Dv] output of ViT block j (attn_residual plus mlp_out)",
    "img/encoded": "f[B, P, Dv] encoder LayerNorm output",
    "img/proj": "f[B, P, D] projector (keras 'image_classifier') output; image tokens are never scaled by sqrt(D)",
    "llm/embed_text": "f[B, T, D] token embeddings times sqrt(D), sqrt(D) computed in float32 and cast to the "
                      "compute dtype (45.25 for D=2048 under bf16)",
    "llm/input": "f[B, L, D] decoder input: img/proj then llm/embed_text along the sequence axis",
    "llm/mask": "bool[B, L, L] prefix-LM attention mask (query axis 1, key axis 2) before any sliding window",
    "llm/layer{i}/pre_attn_norm": "f[B, L, D] RMSNorm before attention",
    "llm/layer{i}/attn_out": "f[B, L, D] attention output after the output projection, before any post-norm",
    "llm/layer{i}/post_attn_norm": "f[B, L, D] RMSNorm of attn_out (PaliGemma 2 only)",
    "llm/layer{i}/attn_residual": "f[B, L, D] block input plus the (post-normed) attention output",
    "llm/layer{i}/pre_ffw_norm": "f[B, L, D] RMSNorm before the feed-forward network",
    "llm/layer{i}/ffw_out": "f[B, L, D] (gelu_tanh(h Wgate) * h Wup) Wdown, before any post-norm",
    "llm/layer{i}/post_ffw_norm": "f[B, L, D] RMSNorm of ffw_out (PaliGemma 2 only)",
    "llm/layer{i}/out": "f[B, L, D] output of decoder block i",
    "llm/final_norm": "f[B, L, D] final RMSNorm: the backbone output",
    "llm/logits": "f[B, T, V] LM head on text positions: final_norm @ embeddings^T, then the final soft-cap if any",
}

# Taps every backend must provide for a conformance check.
REQUIRED_TAPS = ("llm/final_norm",)


def tap_name(pattern: str, *, j: int | None = None, i: int | None = None) -> str:
    return pattern.replace("{j}", f"{j:02d}" if j is not None else "{j}").replace(
        "{i}", f"{i:02d}" if i is not None else "{i}")


def definition(name: str) -> str:
    """The definition of a concrete tap name such as ``llm/layer03/out``."""
    pattern = re.sub(r"block\d+", "block{j}", re.sub(r"layer\d+", "layer{i}", name))
    try:
        return TAP_DEFINITIONS[pattern]
    except KeyError:
        raise KeyError(f"unknown tap {name!r}; known patterns: {', '.join(TAP_DEFINITIONS)}") from None


class Recorder:
    """Collects taps whose names match ``select`` (a regex, or None for all) in forward order."""

    def __init__(self, select: str | None = None):
        self._pattern = None if select is None else re.compile(select)
        self.taps: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return self._pattern is None or bool(self._pattern.search(name))

    def __call__(self, name: str, value: np.ndarray | Callable[[], np.ndarray]) -> None:
        if self.wants(name):
            self.taps[name] = np.array(value() if callable(value) else value, copy=True)


class _NoRecorder(Recorder):
    def wants(self, name: str) -> bool:
        return False

    def __call__(self, name, value) -> None:
        pass


NO_TAPS = _NoRecorder()
