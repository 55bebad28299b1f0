"""The PaliGemma backbone configuration: one frozen, validated dataclass.

Field names and defaults are those of keras-hub's ``PaliGemmaBackbone`` constructor (keras-nlp 0.12.1 added
``include_rescaling``; keras-hub 0.18.1 added the PaliGemma 2 fields). The rest of refimpl trusts a config that
passed ``__post_init__``: every problem is collected and raised at once, naming field, value and rule.

Non-goals: ``vit_pooling`` other than ``None`` (keras-hub cannot use it inside the backbone either: "gap"/"zero"
break the concat, "map" fails to build) and classifier activations other than linear.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

# keras-hub replaces a missing (None or 0) ``vit_intermediate_dim`` by this SigLIP-So400m value in ``__init__``.
DEFAULT_VIT_INTERMEDIATE_DIM = 4304

# The keys of keras-hub HEAD's ``PaliGemmaBackbone.get_config()``, in its order (spec section 1.2).
KERAS_CONFIG_KEYS = (
    "vocabulary_size", "image_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
    "intermediate_dim", "head_dim", "vit_patch_size", "vit_num_heads", "vit_hidden_dim", "vit_num_layers",
    "vit_intermediate_dim", "vit_pooling", "vit_classifier_activation", "vit_name", "query_head_dim_normalize",
    "use_post_ffw_norm", "use_post_attention_norm", "final_logit_soft_cap", "attention_logit_soft_cap",
    "sliding_window_size", "use_sliding_window_attention", "layer_norm_epsilon", "dropout",
)
REQUIRED_KEYS = KERAS_CONFIG_KEYS[:12]
# Keys a keras config may carry that do not change the maths; they are kept for get_config round trips.
PASSTHROUGH_KEYS = ("name", "trainable", "dtype")


class ConfigError(ValueError):
    """A configuration that keras-hub would reject or that refimpl cannot reproduce."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PaliGemmaConfig:
    """Architecture of a PaliGemma backbone; example values are those of ``pali_gemma_3b_mix_224``."""

    vocabulary_size: int  # 257152 = 256000 Gemma pieces + 1024 <loc> + 128 <seg>
    image_size: int  # 224 pixels per side; images are square
    num_layers: int  # 18 decoder blocks
    num_query_heads: int  # 8 (N)
    num_key_value_heads: int  # 1 (K); N must be a multiple of K
    hidden_dim: int  # 2048 (D of the text tower)
    intermediate_dim: int  # 32768: TWICE the FFN width F = 16384 (keras-hub halves it)
    head_dim: int  # 256 (H)
    vit_patch_size: int  # 14 pixels
    vit_num_heads: int  # 16
    vit_hidden_dim: int  # 1152 (D of the image tower)
    vit_num_layers: int  # 27 encoder blocks
    vit_intermediate_dim: int | None = None  # 4304; None or 0 means 4304, as in keras-hub
    vit_pooling: str | None = None  # only None is usable inside the backbone
    vit_classifier_activation: str | None = None  # projector activation; None (linear) in every preset
    vit_name: str | None = None  # name of the keras ViT sub-model; no numeric effect
    include_rescaling: bool = True  # keras-nlp 0.12.1-0.15: map [0, 255] images to [-1, 1] inside the backbone
    layer_norm_epsilon: float = 1e-6  # used by the final RMSNorm only (decoder norms are fixed at 1e-6)
    dropout: float = 0.0  # identity at inference
    query_head_dim_normalize: bool = True  # accepted and ignored by keras-hub: q is always scaled by 1/sqrt(H)
    use_post_ffw_norm: bool = False  # PaliGemma 2: RMSNorm on the FFN output before the residual add
    use_post_attention_norm: bool = False  # PaliGemma 2: RMSNorm on the attention output before the add
    attention_logit_soft_cap: float | None = None  # PaliGemma 2: 50.0, c*tanh(logits/c) on attention logits
    final_logit_soft_cap: float | None = None  # PaliGemma 2: 30.0, on LM logits only
    use_sliding_window_attention: bool = False  # PaliGemma 2: even decoder layers see a symmetric band
    sliding_window_size: int = 4096  # W: query t sees key s only if |t - s| <= W - 1

    def __post_init__(self) -> None:
        if not self.vit_intermediate_dim:
            object.__setattr__(self, "vit_intermediate_dim", DEFAULT_VIT_INTERMEDIATE_DIM)
        problems = list(self._problems())
        if problems:
            raise ConfigError("invalid PaliGemma config:\n  - " + "\n  - ".join(problems))

    def _problems(self):
        for name in ("vocabulary_size", "image_size", "num_layers", "num_query_heads", "num_key_value_heads",
                     "hidden_dim", "intermediate_dim", "head_dim", "vit_patch_size", "vit_num_heads",
                     "vit_hidden_dim", "vit_num_layers", "vit_intermediate_dim", "sliding_window_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                yield f"{name}={value!r} must be a positive integer"
        for name in ("include_rescaling", "query_head_dim_normalize", "use_post_ffw_norm",
                     "use_post_attention_norm", "use_sliding_window_attention"):
            if not isinstance(getattr(self, name), bool):
                yield f"{name}={getattr(self, name)!r} must be true or false"
        for name in ("attention_logit_soft_cap", "final_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                yield f"{name}={value!r} must be None or a positive finite number (the cap c in c*tanh(x/c))"
        eps = self.layer_norm_epsilon
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
            yield f"layer_norm_epsilon={eps!r} must be a positive finite number"
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            yield f"dropout={self.dropout!r} must be a number in [0, 1)"
        if self.vit_pooling is not None:
            yield (f"vit_pooling={self.vit_pooling!r} is not supported: keras-hub's backbone only works with "
                   "vit_pooling=None ('gap'/'zero' break the image-text concat, 'map' fails to build)")
        if self.vit_classifier_activation not in (None, "linear"):
            yield (f"vit_classifier_activation={self.vit_classifier_activation!r} is not supported; "
                   "every PaliGemma preset uses None (linear)")
        yield from self._divisibility_problems()

    def _divisibility_problems(self):
        n, k = self.num_query_heads, self.num_key_value_heads
        if _is_int(n) and _is_int(k) and n > 0 and k > 0 and n % k:
            yield (f"num_query_heads={n} must be a multiple of num_key_value_heads={k} "
                   "(each key/value head serves a whole group of query heads)")
        if _is_int(self.intermediate_dim) and self.intermediate_dim % 2:
            yield (f"intermediate_dim={self.intermediate_dim} must be even: keras-hub's FFN width is "
                   "intermediate_dim // 2 for each of the two gating projections")
        if _is_int(self.head_dim) and self.head_dim % 2:
            yield f"head_dim={self.head_dim} must be even (RoPE rotates the two halves of each head)"
        dv, hv = self.vit_hidden_dim, self.vit_num_heads
        if _is_int(dv) and _is_int(hv) and hv > 0 and dv % hv:
            yield f"vit_hidden_dim={dv} must be a multiple of vit_num_heads={hv} (contiguous equal-width heads)"
        s, p = self.image_size, self.vit_patch_size
        if _is_int(s) and _is_int(p) and p > 0 and s % p:
            # keras' "valid" conv would silently drop the border; the position table would then not match.
            yield f"image_size={s} must be a multiple of vit_patch_size={p}"

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def image_sequence_length(self) -> int:
        """Number of image tokens, (image_size / patch)^2: 256 for 224 px with 14 px patches."""
        return (self.image_size // self.vit_patch_size) ** 2

    @property
    def ffw_dim(self) -> int:
        """F, the width of each gating projection: intermediate_dim // 2."""
        return self.intermediate_dim // 2

    @property
    def query_groups(self) -> int:
        """G, query heads per key/value head."""
        return self.num_query_heads // self.num_key_value_heads

    @property
    def vit_head_dim(self) -> int:
        return self.vit_hidden_dim // self.vit_num_heads

    def uses_sliding_window(self, layer: int) -> bool:
        """keras-hub applies the window to even-indexed decoder layers only."""
        return self.use_sliding_window_attention and layer % 2 == 0

    # ---- keras config dicts --------------------------------------------------------------------------------
    @classmethod
    def from_keras_config(cls, config: Mapping[str, Any], *, source: str = "config") -> "PaliGemmaConfig":
        """Build from the inner ``config`` dict of a keras ``PaliGemmaBackbone`` (``get_config()`` output).

        A config without ``include_rescaling`` comes from keras-nlp 0.12.0 or keras-hub >= 0.17, both of which
        expect images already in [-1, 1], so it maps to ``include_rescaling=False``. Unknown keys are an error.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"{source}: expected a JSON object of backbone arguments, found {type(config).__name__}")
        known = set(KERAS_CONFIG_KEYS) | set(PASSTHROUGH_KEYS) | {"include_rescaling"}
        unknown = sorted(set(config) - known)
        missing = [key for key in REQUIRED_KEYS if key not in config]
        problems = [f"missing required key {key!r}" for key in missing]
        problems += [f"unknown key {key!r} (not a PaliGemmaBackbone argument)" for key in unknown]
        if problems:
            raise ConfigError(f"{source}: invalid PaliGemma config:\n  - " + "\n  - ".join(problems))
        kwargs = {key: config[key] for key in config if key not in PASSTHROUGH_KEYS}
        kwargs.setdefault("include_rescaling", False)
        try:
            return cls(**kwargs)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    def to_keras_config(self) -> dict[str, Any]:
        """The backbone-argument part of keras-hub's ``get_config()``.

        ``include_rescaling`` is written only when true: keras-hub has no such key and keras-nlp needs it.
        """
        out = {key: getattr(self, key) for key in KERAS_CONFIG_KEYS}
        if self.include_rescaling:
            out["include_rescaling"] = True
        return out

    def replace(self, **changes: Any) -> "PaliGemmaConfig":
        return dataclasses.replace(self, **changes)


def count_params(config: PaliGemmaConfig) -> int:
    """Exact number of weights keras-hub creates for ``config`` (formula of spec section 15)."""
    c = config
    dv, iv, d, f = c.vit_hidden_dim, c.vit_intermediate_dim, c.hidden_dim, c.ffw_dim
    vit_block = 4 * (dv * dv + dv) + 4 * dv + (dv * iv + iv) + (iv * dv + dv)
    vit = (c.vit_patch_size ** 2 * 3 * dv + dv + c.image_sequence_length * dv + c.vit_num_layers * vit_block
           + 2 * dv + dv * d + d)
    norms = 2 + int(c.use_post_attention_norm) + int(c.use_post_ffw_norm)
    attention = (c.num_query_heads * 2 + c.num_key_value_heads * 2) * d * c.head_dim
    decoder_block = attention + norms * d + 3 * d * f
    return vit + c.vocabulary_size * d + c.num_layers * decoder_block + d
