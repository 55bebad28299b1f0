"""Validation of the backbone's input dict: every problem is a ValueError that names the input.

Accepted: ``images`` f[B, S, S, 3] (any real float or integer dtype, finite), ``token_ids`` int[B, T] in
[0, vocabulary_size), ``padding_mask`` and ``response_mask`` bool or 0/1 integers of shape [B, T]. A missing
``response_mask`` means all zeros (keras-hub itself requires the key; its docstring example omits it). T may be 0
(images only); B may not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refimpl.config import PaliGemmaConfig

INPUT_KEYS = ("images", "token_ids", "padding_mask", "response_mask")
# Slack on the image range check: bilinear resizing stays in range, float rounding may step out by an ulp or so.
IMAGE_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class BackboneInputs:
    images: np.ndarray  # f[B, S, S, 3] as given (cast later by the policy)
    token_ids: np.ndarray  # int64[B, T]
    padding_mask: np.ndarray  # bool[B, T]
    response_mask: np.ndarray  # bool[B, T]


def _array(inputs: Mapping[str, Any], key: str) -> np.ndarray:
    value = inputs[key]
    try:
        return np.asarray(value)
    except Exception as error:  # ragged lists and the like
        raise ValueError(f"input {key!r}: cannot be read as an array ({error})") from None


def _mask(inputs: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    mask = _array(inputs, key)
    if mask.shape != shape:
        raise ValueError(f"input {key!r}: expected shape {shape} (the shape of token_ids), found {mask.shape}")
    if mask.dtype == bool:
        return mask
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"input {key!r}: expected bool or integer 0/1 values, found dtype {mask.dtype}")
    bad = ~np.isin(mask, (0, 1))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"input {key!r}: expected only 0 and 1, found {mask[index]} at index {index}")
    return mask.astype(bool)


def _images(inputs: Mapping[str, Any], config: PaliGemmaConfig, check_range: bool) -> np.ndarray:
    images = _array(inputs, "images")
    s = config.image_size
    if images.dtype == bool or not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise ValueError(f"input 'images': expected a real float or integer dtype, found {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"input 'images': expected shape (batch, {s}, {s}, 3) (square RGB, channels last, "
                         f"image_size={s}), found {images.shape}")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(images))[0])
        raise ValueError(f"input 'images': expected finite pixel values, found {images[index]} at index {index}")
    if check_range and images.size:
        low, high = (0.0, 255.0) if config.include_rescaling else (-1.0, 1.0)
        found_low, found_high = float(images.min()), float(images.max())
        if found_low < low - IMAGE_RANGE_SLACK * (high - low) or found_high > high + IMAGE_RANGE_SLACK * (high - low):
            hint = ("this config rescales inside the backbone (include_rescaling=true), so pass raw [0, 255] pixels"
                    if config.include_rescaling else
                    "this config expects model-space pixels, e.g. x / 127.5 - 1 for [0, 255] input")
            raise ValueError(f"input 'images': expected values in [{low:g}, {high:g}], found [{found_low:g}, "
                             f"{found_high:g}]; {hint} (check_image_range=False disables this check)")
    return images


def validate_inputs(inputs: Mapping[str, Any], config: PaliGemmaConfig, *,
                    check_image_range: bool = True) -> BackboneInputs:
    """Check ``inputs`` against ``config``; return them as arrays of canonical dtypes."""
    if not isinstance(inputs, Mapping):
        raise ValueError(f"inputs: expected a dict with keys {INPUT_KEYS}, found {type(inputs).__name__}")
    missing = [k for k in INPUT_KEYS[:3] if k not in inputs]
    unknown = sorted(set(inputs) - set(INPUT_KEYS), key=repr)  # keys need not be strings, nor comparable
    if missing or unknown:
        raise ValueError(f"inputs: expected keys {INPUT_KEYS} (response_mask optional); "
                         f"missing {missing}, unknown {unknown}")
    token_ids = _array(inputs, "token_ids")
    if token_ids.ndim != 2:
        raise ValueError(f"input 'token_ids': expected shape (batch, text_length), found {token_ids.shape}")
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(f"input 'token_ids': expected an integer dtype, found {token_ids.dtype}")
    if token_ids.shape[0] == 0:
        raise ValueError("input 'token_ids': the batch is empty (batch size 0)")
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= config.vocabulary_size):
        bad = (token_ids < 0) | (token_ids >= config.vocabulary_size)
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"input 'token_ids': expected ids in [0, {config.vocabulary_size}) "
                         f"(vocabulary_size), found {token_ids[index]} at index {index}")
    images = _images(inputs, config, check_image_range)
    if images.shape[0] != token_ids.shape[0]:
        raise ValueError(f"inputs: batch sizes differ: images has {images.shape[0]}, token_ids has "
                         f"{token_ids.shape[0]}")
    padding = _mask(inputs, "padding_mask", token_ids.shape)
    response = (_mask(inputs, "response_mask", token_ids.shape) if inputs.get("response_mask") is not None
                else np.zeros(token_ids.shape, dtype=bool))
    return BackboneInputs(images, token_ids.astype(np.int64), padding, response)
