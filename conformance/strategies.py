"""Hypothesis strategies for PaliGemma backbone inputs and tiny configs, importable by any port's tests.

    from conformance.strategies import configs, valid_batches
    @given(data=st.data())
    def test_my_port(data):
        config = data.draw(configs(num_layers=1))
        inputs = data.draw(valid_batches(config))       # images, token_ids, padding_mask, response_mask

A *valid batch* is what keras-hub's preprocessor produces: each row is a prompt (bos and prompt tokens, visible
both ways), then a response (causal), then padding; any of the three may be empty, and so may the text (T = 0).
``arbitrary_masks`` drops that layout (padding in the middle, responses on padding, ...): the mask rule is defined
for any booleans. ``malformed_inputs`` draws input dicts that are mostly wrong (shapes, dtypes, values, keys) for
fuzzing an input validator.

Sizes are small, odd and mutually distinct where possible, so a swapped axis fails loudly. Array contents come from
a drawn seed (fast to generate; hypothesis still shrinks sizes and layouts). Segments per text position are
``PROMPT``, ``RESPONSE`` and ``PADDING`` (``segments(inputs)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from refimpl.config import PaliGemmaConfig

PROMPT, RESPONSE, PADDING = 0, 1, 2
INPUT_KEYS = ("images", "token_ids", "padding_mask", "response_mask")


# ---- configs -----------------------------------------------------------------------------------------------------
SIZES = ("tiny", "small")


@st.composite
def configs(draw, size: str = "tiny", **fixed: Any) -> PaliGemmaConfig:
    """A valid ``PaliGemmaConfig`` covering PaliGemma 1 and 2 options; keyword arguments fix fields.

    size "tiny": ViT patch 1-3 px, 1-3 patches per side (1, 4 or 9 image tokens), 1-3 heads of width 2-4, 1-2
    blocks; decoder 1-3 kv heads, 1-3 query heads per kv head, even head dim 2-8, width 3-24, FFN width 1-12, 1-3
    blocks, vocabulary 5-40. (A LayerNorm over one feature is degenerate: keras' formula then cancels
    catastrophically in float32, so ViT widths start at 2.)
    size "small": as tiny but with the widths the tolerance table was calibrated on (ViT heads of 4-8, decoder
    width 16-40, FFN 6-20, head dim 4-10, vocabulary 64-100): comparisons against float32 envelopes need enough elements per tap
    for the envelope (a max over the tap) to be a stable measure of the error.
    PaliGemma 2 options (post-norms, soft-caps, sliding window of 1-16) are drawn independently.
    ``include_rescaling`` is False unless fixed (images then lie in [-1, 1]).
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {SIZES}")
    small = size == "small"
    patch, per_side = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    vit_heads, kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    window = draw(st.booleans())
    fields = dict(
        vocabulary_size=draw(st.integers(64, 100) if small else st.integers(5, 40)), image_size=patch * per_side, num_layers=draw(st.integers(1, 3)),
        num_query_heads=kv_heads * group, num_key_value_heads=kv_heads,
        hidden_dim=draw(st.integers(16, 40) if small else st.integers(3, 24)),
        intermediate_dim=2 * draw(st.integers(6, 20) if small else st.integers(1, 12)),
        head_dim=2 * draw(st.integers(2, 5) if small else st.integers(1, 4)),
        vit_patch_size=patch, vit_num_heads=vit_heads,
        vit_hidden_dim=vit_heads * draw(st.integers(4, 8) if small else st.integers(2, 4)),
        vit_num_layers=draw(st.integers(1, 2)),
        vit_intermediate_dim=draw(st.integers(9, 37) if small else st.integers(1, 9)),
        include_rescaling=False, layer_norm_epsilon=draw(st.sampled_from([1e-6, 1e-3])),
        query_head_dim_normalize=draw(st.booleans()),
        use_post_attention_norm=draw(st.booleans()), use_post_ffw_norm=draw(st.booleans()),
        attention_logit_soft_cap=draw(st.sampled_from([None, None, 0.5, 3.0, 50.0])),
        final_logit_soft_cap=draw(st.sampled_from([None, None, 0.5, 5.0, 30.0])),
        use_sliding_window_attention=window, sliding_window_size=draw(st.integers(1, 16)) if window else 4096,
    )
    fields.update(fixed)
    return PaliGemmaConfig(**fields)


# ---- valid batches -------------------------------------------------------------------------------------------------
@st.composite
def row_layouts(draw, text_len: int, min_prompt: int = 0, min_response: int = 0) -> tuple[int, int, int]:
    """(prompt, response, padding) lengths summing to ``text_len``; the minimums are met as far as it allows."""
    low = min(min_prompt, text_len)
    prompt = draw(st.integers(low, text_len - min(min_response, text_len - low)))
    response = draw(st.integers(min(min_response, text_len - prompt), text_len - prompt))
    return prompt, response, text_len - prompt - response


def images_for(config: PaliGemmaConfig, batch: int, rng: np.random.Generator) -> np.ndarray:
    """f32[B, S, S, 3] in the range the config expects: [0, 255] with include_rescaling, else [-1, 1]."""
    shape = (batch, config.image_size, config.image_size, 3)
    low, high = (0.0, 255.0) if config.include_rescaling else (-1.0, 1.0)
    return rng.uniform(low, high, shape).astype(np.float32)


def batch_from_layouts(config: PaliGemmaConfig, layouts: list[tuple[int, int, int]],
                       seed: int) -> dict[str, np.ndarray]:
    """Inputs for rows laid out as (prompt, response, padding): random images and token ids from ``seed``."""
    rng = np.random.default_rng(seed)
    text_len = sum(layouts[0]) if layouts else 0
    segments = np.array([[PROMPT] * p + [RESPONSE] * r + [PADDING] * q for p, r, q in layouts],
                        dtype=np.int8).reshape(len(layouts), text_len)
    return {"images": images_for(config, len(layouts), rng),
            "token_ids": rng.integers(0, config.vocabulary_size, (len(layouts), text_len)).astype(np.int32),
            "padding_mask": segments != PADDING,
            "response_mask": segments == RESPONSE}


@st.composite
def valid_batches(draw, config: PaliGemmaConfig, *, batch_sizes=(1, 3), text_lengths=(0, 8),
                  min_prompt: int = 0, min_response: int = 0) -> dict[str, np.ndarray]:
    """A batch as keras-hub's preprocessor lays it out: per row prompt, then response, then padding.

    Returns images f32[B, S, S, 3], token_ids int32[B, T], padding_mask bool[B, T], response_mask bool[B, T].
    ``min_prompt``/``min_response`` are met when T allows (T >= their sum is not forced).
    """
    batch = draw(st.integers(*batch_sizes))
    text_len = draw(st.integers(*text_lengths))
    layouts = [draw(row_layouts(text_len, min_prompt, min_response)) for _ in range(batch)]
    return batch_from_layouts(config, layouts, draw(st.integers(0, 2**32 - 1)))


@st.composite
def arbitrary_masks(draw, batch: int, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(padding_mask, response_mask) bool[B, T] with no layout rule: holes, responses on padding, all or nothing."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p_present, p_response = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])), draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    return rng.random((batch, text_len)) < p_present, rng.random((batch, text_len)) < p_response


def segments(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """int8[B, T]: PROMPT, RESPONSE or PADDING per text position (padding wins over a response flag)."""
    padding = np.asarray(inputs["padding_mask"], bool)
    response = np.asarray(inputs.get("response_mask", np.zeros_like(padding)), bool)
    return np.where(~padding, PADDING, np.where(response, RESPONSE, PROMPT)).astype(np.int8)


# ---- malformed inputs --------------------------------------------------------------------------------------------
_DTYPES = ["bool", "int8", "uint8", "int16", "int32", "int64", "uint32", "uint64", "float16", "float32", "float64",
           "complex64", "U3", "S2", "object", "datetime64[s]", [("a", "f4")]]


@st.composite
def _array(draw, near_shape: tuple[int, ...], valid_dtype: str, low: float, high: float) -> Any:
    """Some array: usually near the valid shape and dtype, sometimes anything; with odd values mixed in."""
    if draw(st.booleans()):
        shape = tuple(max(0, n + draw(st.sampled_from([0, 0, 0, -1, 1]))) for n in near_shape)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=5)))
    dtype = np.dtype(draw(st.sampled_from([valid_dtype] * 4 + _DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.uniform(low, high, shape)
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, -1, 2, high + 1, 1e30, 2**40]))
    if special is not None and values.size:
        values.flat[rng.integers(values.size)] = special
    with np.errstate(all="ignore"):
        try:
            return values.astype(dtype) if dtype.fields is None else np.zeros(shape, dtype)
        except (ValueError, OverflowError, TypeError):
            return np.zeros(shape, dtype)


@st.composite
def _odd_value(draw) -> Any:
    """A value that is not an array at all."""
    return draw(st.sampled_from([None, 0, 1.5, "images", b"\x00", [], [[1, 2], [3]], [[0.5]], {"a": 1}, object(),
                                 (1, 2, 3), True]))


@st.composite
def malformed_inputs(draw, config: PaliGemmaConfig, *, max_batch: int = 3, max_text: int = 5) -> Any:
    """An input dict (or not a dict) that a validator must reject with a clear error, or accept as valid.

    Starts from a valid batch and breaks some entries: shape, dtype, out-of-range values, NaN/inf, missing or
    extra keys (including non-string keys), non-array values, empty batch, zero-length text.
    """
    if draw(st.integers(0, 30)) == 0:
        return draw(st.sampled_from([None, [], "inputs", 3, np.zeros(3)]))
    batch, text = draw(st.integers(0, max_batch)), draw(st.integers(0, max_text))
    s = config.image_size
    low, high = (0.0, 255.0) if config.include_rescaling else (-1.0, 1.0)
    layouts = [draw(row_layouts(text)) for _ in range(batch)]
    inputs: dict[Any, Any] = batch_from_layouts(config, layouts, draw(st.integers(0, 2**32 - 1)))
    if batch == 0:  # batch_from_layouts cannot know T without a row
        inputs["token_ids"] = np.zeros((0, text), np.int32)
        inputs["padding_mask"] = inputs["response_mask"] = np.zeros((0, text), bool)
    plans = {"images": ((batch, s, s, 3), "float32", low, high),
             "token_ids": ((batch, text), "int32", 0, config.vocabulary_size),
             "padding_mask": ((batch, text), "bool", 0, 2), "response_mask": ((batch, text), "bool", 0, 2)}
    for key in draw(st.lists(st.sampled_from(INPUT_KEYS), unique=True, max_size=4)):
        action = draw(st.sampled_from(["array", "array", "array", "odd", "drop"]))
        if action == "drop":
            inputs.pop(key)
        elif action == "odd":
            inputs[key] = draw(_odd_value())
        else:
            inputs[key] = draw(_array(*plans[key]))
    for extra in draw(st.lists(st.sampled_from(["pixel_values", 1, None, (1, 2), "Images"]), unique=True,
                               max_size=2)):
        inputs[extra] = np.zeros(1)
    return inputs
