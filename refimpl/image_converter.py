"""``PaliGemmaImageConverter``: keras-hub's image preprocessing for PaliGemma, in pure NumPy (spec section 8.3).

keras-hub >= 0.17 turns raw RGB pixels in [0, 255] into model space with

    x = resize(x)                           keras.layers.Resizing(crop_to_aspect_ratio=True, "bilinear", no antialias)
    x = float32(x) * scale + offset         scale = 1/127.5, offset = -1: [0, 255] -> [-1, 1]

How keras' JAX backend resizes (``keras.src.backend.jax.image.resize`` then ``jax.image.resize``):

1. Centre crop to the target aspect ratio, with Python float arithmetic:
   ``crop_h = clip(int(W * th / tw), 1, H)``, ``crop_w = clip(int(H * tw / th), 1, W)``,
   ``top = int((H - crop_h) / 2)``, ``left = int((W - crop_w) / 2)``. Square targets keep the central square.
2. Bilinear resampling, separable, height first then width, and only along axes whose size changes. Output pixel o
   samples the input at ``s = (o + 0.5) / scale - 0.5`` (half-pixel centres, ``scale = out / in``) with the triangle
   kernel ``max(0, 1 - |s - i|)``: at most two taps, normalised to sum 1, and zero for ``s`` outside
   ``[-0.5, in - 0.5]``. No antialiasing: downscaling also uses just the two nearest input pixels.
3. For **integer** input (e.g. uint8), keras' Resizing layer rounds the float result half-to-even and saturates it
   back into the input dtype *before* the scale and offset; float input stays float32.

Everything is float32, as in jax. XLA compiles step 2 with its own choices: it replaces the weight normalisation's
division by a reciprocal multiply and contracts the sample-position multiply-add into an FMA (we copy both), but
which loop iterations it vectorises with FMAs, and the summation kernels of its dots, are its own. So results
differ from keras by a few float32 ulps: measured max |Δ| 1.5e-6 in model space (2e-4 on the [0, 255] scale) for
28 and 30 pixel targets, 4e-7 for 224 (tests/generation/test_image_converter.py). With integer input such an ulp
can flip the rounding of a value that is within an ulp of k + 0.5, moving that pixel by one step (1/127.5 in
model space); this is rare (about 1 value in 1500 at 30 px, none seen at 224 px; the test bounds the rate).

Non-goals: ``pad_to_aspect_ratio``, interpolations other than bilinear, antialiasing, channels-first data, and
converter dtype policies other than float32 (keras computes the affine map in the converter's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refimpl.tokenizer import check_serialized_class, read_json_object

IMAGE_CONVERTER_CONFIG_FILE = "image_converter.json"
ALLOWED_CLASS_NAMES = ("PaliGemmaImageConverter",)
ALLOWED_REGISTERED_NAMES = ("keras_hub>PaliGemmaImageConverter", "keras_nlp>PaliGemmaImageConverter", None)
CONFIG_KEYS = ("image_size", "scale", "offset", "interpolation", "antialias", "crop_to_aspect_ratio",
               "pad_to_aspect_ratio", "bounding_box_format", "data_format", "height", "width", "mean", "variance")
IGNORED_CONFIG_KEYS = ("name", "trainable", "dtype")
# jax zeroes a weight column whose sum is not above this (1000 float32 epsilons), as compute_weight_mat does.
WEIGHT_SUM_FLOOR = np.float32(1000.0 * np.finfo(np.float32).eps)
MAX_IMAGE_PIXELS = 1 << 28  # per image, height * width; guards against absurd inputs before any float copy


class ImageConverterError(ValueError):
    """An image converter config that cannot be reproduced, or an image that cannot be converted."""


# ---- the resize ----------------------------------------------------------------------------------------------
def crop_box(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of keras' centre crop to the target aspect ratio."""
    crop_height = max(min(height, int(float(width * target_height) / target_width)), 1)
    crop_width = max(min(width, int(float(height * target_width) / target_height)), 1)
    top = int(float(height - crop_height) / 2)
    left = int(float(width - crop_width) / 2)
    return top, left, crop_height, crop_width


def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """f32[in_size, out_size]: column o holds the (at most two) input weights of output pixel o.

    jax's ``compute_weight_mat`` with the triangle kernel, no antialias and no translation, in float32 as XLA
    compiles it: ``1 / scale`` is computed in double precision and rounded to float32 (a folded constant).
    """
    f32 = np.float32
    inverse_scale = f32(1.0 / (out_size / in_size))
    centres = np.arange(out_size, dtype=f32) + f32(0.5)
    # XLA on an FMA-capable CPU contracts centres * inverse_scale - 0.5 into one fused multiply-add: the exact
    # product minus 0.5, rounded once. (float64 holds the product of two float32 values exactly.) This matters
    # for large outputs: at 224 pixels a sample position is ~200, where one float32 ulp moves a weight by 1e-5.
    sample = (centres.astype(np.float64) * np.float64(inverse_scale) - 0.5).astype(f32)  # f32[out]
    distance = np.abs(sample[None, :] - np.arange(in_size, dtype=f32)[:, None])  # f32[in, out]
    weights = np.maximum(f32(0), f32(1) - distance)
    total = weights.sum(axis=0, keepdims=True, dtype=f32)
    # XLA's algebraic simplifier turns jax's weights / total into weights * (1 / total); we follow it.
    reciprocal = f32(1) / np.where(total != 0, total, f32(1))
    weights = np.where(np.abs(total) > WEIGHT_SUM_FLOOR, weights * reciprocal, f32(0))
    inside = (sample >= f32(-0.5)) & (sample <= f32(in_size - 0.5))
    return np.where(inside[None, :], weights, f32(0)).astype(f32)


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """f32[B, H, W, C] -> f32[B, height, width, C], half-pixel centres, no antialias (height first)."""
    x = images.astype(np.float32, copy=False)
    if x.shape[1] != height:  # jax resizes only the axes whose size changes
        x = np.einsum("bhwc,ho->bowc", x, bilinear_weights(x.shape[1], height), optimize=True)
    if x.shape[2] != width:
        x = np.einsum("bhwc,wo->bhoc", x, bilinear_weights(x.shape[2], width), optimize=True)
    return x


def _round_to_input_dtype(resized: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """keras Resizing on integer input: round half to even, then saturate into the input dtype."""
    info = np.iinfo(dtype)
    return np.clip(np.round(resized), info.min, info.max).astype(dtype)


# ---- the converter -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaliGemmaImageConverter:
    """Resize (centre crop to the aspect ratio, bilinear) and rescale images, as keras-hub's converter does.

    ``converter(images)`` takes u8/int/float[H, W, C] or [B, H, W, C] (or a list of differently sized [H, W, C]
    images, which are converted one by one and stacked) and returns f32 of the same rank at ``image_size``.
    """

    image_size: tuple[int, int] | None = None  # (height, width), e.g. (224, 224); None: no resize
    scale: float | tuple[float, ...] | None = None  # 1/127.5 for PaliGemma; a tuple is per channel
    offset: float | tuple[float, ...] | None = None  # -1 for PaliGemma
    crop_to_aspect_ratio: bool = True
    interpolation: str = "bilinear"
    antialias: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.image_size is not None:
            size = tuple(self.image_size)
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                problems.append(f"image_size={self.image_size!r} must be None or two positive integers")
            object.__setattr__(self, "image_size", size)
        if self.interpolation != "bilinear":
            problems.append(f"interpolation={self.interpolation!r} is not supported; expected 'bilinear'")
        if self.antialias:
            problems.append("antialias=True is not supported (PaliGemma converters use antialias=False)")
        for name in ("scale", "offset"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(float(v) for v in value))
            elif value is not None and not isinstance(value, (int, float)):
                problems.append(f"{name}={value!r} must be None, a number or a list of per-channel numbers")
        if problems:
            raise ImageConverterError("invalid image converter:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_preset(cls, preset: str | Path) -> "PaliGemmaImageConverter":
        """Read ``image_converter.json`` from a preset directory."""
        path = Path(preset) / IMAGE_CONVERTER_CONFIG_FILE
        document = read_json_object(path, "image converter config")
        config = check_serialized_class(document, str(path), ALLOWED_CLASS_NAMES, ALLOWED_REGISTERED_NAMES)
        return cls.from_config(config, source=str(path))

    @classmethod
    def from_config(cls, config: dict[str, Any], *, source: str = "image converter config"):
        """Build from keras' ``get_config()`` dict, including its legacy height/width and mean/variance keys."""
        unknown = sorted(set(config) - set(CONFIG_KEYS) - set(IGNORED_CONFIG_KEYS))
        if unknown:
            raise ImageConverterError(f"{source}: unknown keys {unknown}")
        problems = _unsupported(config)
        if problems:
            raise ImageConverterError(f"{source}: " + "; ".join(problems))
        image_size, scale, offset = config.get("image_size"), config.get("scale"), config.get("offset")
        if "height" in config and "width" in config:
            image_size = (config["height"], config["width"])
        if "mean" in config and "variance" in config:  # keras: scale / std and -mean / std per channel
            std = [float(v) ** 0.5 for v in config["variance"]]
            scale = [scale / s for s in std]
            offset = [-m / s for m, s in zip(config["mean"], std)]
        try:
            return cls(image_size=None if image_size is None else tuple(image_size), scale=scale, offset=offset,
                       crop_to_aspect_ratio=bool(config.get("crop_to_aspect_ratio", True)),
                       interpolation=config.get("interpolation", "bilinear"),
                       antialias=bool(config.get("antialias", False)))
        except (ImageConverterError, TypeError) as error:
            raise ImageConverterError(f"{source}: {error}") from None

    def get_config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "scale": self.scale, "offset": self.offset,
                "interpolation": self.interpolation, "antialias": self.antialias,
                "crop_to_aspect_ratio": self.crop_to_aspect_ratio, "pad_to_aspect_ratio": False}

    # ---- calling --------------------------------------------------------------------------------------------
    def __call__(self, images) -> np.ndarray:
        if isinstance(images, (list, tuple)):
            arrays = [_as_image_array(image, f"images[{i}]") for i, image in enumerate(images)]
            if not arrays:
                raise ImageConverterError("images: expected at least one image, found an empty list")
            if any(a.ndim != 3 for a in arrays):
                raise ImageConverterError("images: a list must hold (height, width, channels) images, found "
                                          f"shapes {[a.shape for a in arrays]}")
            converted = [self._convert(a[None])[0] for a in arrays]
            shapes = {c.shape for c in converted}
            if len(shapes) > 1:
                raise ImageConverterError(f"images: converted shapes differ ({sorted(shapes)}); set image_size")
            return np.stack(converted)
        array = _as_image_array(images, "images")
        if array.ndim == 3:
            return self._convert(array[None])[0]
        return self._convert(array)

    def _convert(self, images: np.ndarray) -> np.ndarray:  # [B, H, W, C] -> f32[B, h, w, C]
        x = images
        if self.image_size is not None:
            x = self._resize(x)
        x = x.astype(np.float32)
        if self.scale is not None:
            x = x * np.asarray(self.scale, dtype=np.float32)
        if self.offset is not None:
            x = x + np.asarray(self.offset, dtype=np.float32)
        return x

    def _resize(self, images: np.ndarray) -> np.ndarray:
        height, width = self.image_size
        if self.crop_to_aspect_ratio:
            top, left, crop_h, crop_w = crop_box(images.shape[1], images.shape[2], height, width)
            images = images[:, top:top + crop_h, left:left + crop_w]
        resized = resize_bilinear(images, height, width)
        if np.issubdtype(images.dtype, np.integer):
            return _round_to_input_dtype(resized, images.dtype)
        return resized


def _unsupported(config: dict[str, Any]) -> list[str]:
    problems = []
    if config.get("pad_to_aspect_ratio"):
        problems.append("pad_to_aspect_ratio=true is not supported")
    if config.get("data_format") not in (None, "channels_last"):
        problems.append(f"data_format={config['data_format']!r} is not supported; expected channels_last")
    dtype = config.get("dtype")
    name = dtype.get("config", {}).get("name") if isinstance(dtype, dict) else dtype
    if name not in (None, "float32"):
        problems.append(f"dtype policy {name!r} is not supported; only float32 converters are reproduced")
    return problems


def _as_image_array(image, what: str) -> np.ndarray:
    """Check one image or batch: rank 3 or 4, real dtype, finite, of sane size. int64 becomes int32 as in jax."""
    try:
        array = np.asarray(image)
    except Exception as error:
        raise ImageConverterError(f"{what}: cannot be read as an array ({error})") from None
    if array.ndim not in (3, 4):
        raise ImageConverterError(f"{what}: expected shape (height, width, channels) or (batch, height, width, "
                                  f"channels), found {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageConverterError(f"{what}: expected an integer or float pixel dtype, found {array.dtype}")
    height, width = array.shape[-3:-1]
    if height < 1 or width < 1 or array.shape[-1] < 1 or (array.ndim == 4 and array.shape[0] < 1):
        raise ImageConverterError(f"{what}: expected a non-empty image, found shape {array.shape}")
    if height * width > MAX_IMAGE_PIXELS:
        raise ImageConverterError(f"{what}: {height}x{width} pixels; expected at most {MAX_IMAGE_PIXELS}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageConverterError(f"{what}: expected finite pixel values, found NaN or infinity")
    if array.dtype.itemsize == 8 and np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ImageConverterError(f"{what}: integer pixels outside the int32 range")
        array = array.astype(np.int32)
    return array
