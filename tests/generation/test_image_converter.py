"""``PaliGemmaImageConverter`` against keras-hub's converter (jax backend), plus hand-derived crops and weights.

Measured against keras-hub 0.32 / keras 3.15.1 / jax 0.10.2 on CPU with the sizes and seeds below: float input
max |Δ| = 8.3e-7 in model space at 28 and 30 pixel targets and 2.4e-7 at 224 (about 1e-4 and 3e-5 on the [0, 255]
scale: XLA's own vectorisation of the sample positions and its dot kernels, see refimpl/image_converter.py).
uint8 input: identical except for one-step rounding flips, 0 of 9408 values at 28 px, 6 of 10800 at 30 px, 0 of
301056 at 224 px. (A wider sweep of 9 sizes gave 1.5e-6 at most.) The bounds are a few times these numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from _generation_helpers import needs_keras
from refimpl.image_converter import ImageConverterError, PaliGemmaImageConverter, bilinear_weights, crop_box

FLOAT_BOUND = 5e-6  # model space ([-1, 1]); 8.3e-7 measured here, 1.5e-6 in a wider sweep
STEP = 1 / 127.5  # one uint8 step in model space
MAX_FLIP_FRACTION = 2e-3  # measured 5.6e-4 at 30 px
# (height, width) per target: downscale and upscale, both orientations, odd sizes (each shape compiles in jax).
SIZES = {28: [(37, 53), (300, 200), (15, 15), (1, 40)], 30: [(53, 37), (200, 300), (15, 15), (7, 9)],
         224: [(300, 200), (100, 150)]}


def test_crop_box_hand_derived():
    # Square target: keep the central min(H, W) square; the start is int((H - h) / 2), rounding down.
    assert crop_box(37, 53, 28, 28) == (0, 8, 37, 37)
    assert crop_box(300, 200, 30, 30) == (50, 0, 200, 200)
    assert crop_box(7, 10, 28, 28) == (0, 1, 7, 7)  # (10 - 7) / 2 = 1.5 -> 1
    # Non-square target 20 x 40 from 30 x 30: crop height int(30 * 20 / 40) = 15, starting at int(7.5) = 7.
    assert crop_box(30, 30, 20, 40) == (7, 0, 15, 30)


def test_bilinear_weights_hand_derived():
    # Upscale 2 -> 4: samples at (o + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25; triangle weights 1 - |s - i|,
    # normalised per output (the outer samples only reach one input pixel, whose weight becomes 1).
    np.testing.assert_allclose(bilinear_weights(2, 4), [[1, 0.75, 0.25, 0], [0, 0.25, 0.75, 1]], atol=1e-7)
    # Downscale 4 -> 2 without antialias: samples at 0.5 and 2.5, so only the two nearest pixels, half each.
    np.testing.assert_allclose(bilinear_weights(4, 2), [[0.5, 0], [0.5, 0], [0, 0.5], [0, 0.5]], atol=1e-7)
    # Every output's weights sum to 1.
    np.testing.assert_allclose(bilinear_weights(37, 28).sum(axis=0), 1, atol=1e-6)


def test_rescale_and_identity_resize():
    converter = PaliGemmaImageConverter(image_size=(2, 2), scale=1 / 127.5, offset=-1.0)
    image = np.array([[[0, 255, 127.5]] * 2] * 2)
    np.testing.assert_allclose(converter(image), [[[-1, 1, 0]] * 2] * 2, atol=1e-7)
    assert converter(image).dtype == np.float32 and converter(image[None]).shape == (1, 2, 2, 3)


@needs_keras
@pytest.mark.keras
@pytest.mark.parametrize("target", [28, 30, 224])
def test_equal_to_keras_converter(target):
    import keras_hub

    theirs = keras_hub.layers.PaliGemmaImageConverter(image_size=(target, target), scale=1 / 127.5, offset=-1.0)
    ours = PaliGemmaImageConverter(image_size=(target, target), scale=1 / 127.5, offset=-1.0)
    rng = np.random.default_rng(target)
    flips = values = 0
    worst = 0.0
    for height, width in SIZES[target]:
        floats = rng.uniform(0, 255, (2, height, width, 3)).astype(np.float32)
        error = np.max(np.abs(ours(floats) - np.asarray(theirs(floats))))
        assert error <= FLOAT_BOUND, f"float {height}x{width} -> {target}: max |diff| {error:.2e}"
        worst = max(worst, float(error))
        pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        diff = np.abs(ours(pixels) - np.asarray(theirs(pixels)))
        assert diff.max() <= STEP * 1.0001, f"uint8 {height}x{width} -> {target}: max |diff| {diff.max():.2e}"
        flips += int((diff > 1e-6).sum())
        values += diff.size
    print(f"target {target}: float max |diff| {worst:.2e}, uint8 flips {flips} of {values}")
    assert flips <= MAX_FLIP_FRACTION * values, f"{flips} of {values} uint8 values rounded differently"


@needs_keras
@pytest.mark.keras
def test_from_preset_reads_keras_image_converter_json(tmp_path):
    import keras_hub

    keras_hub.layers.PaliGemmaImageConverter(image_size=(30, 30), scale=1 / 127.5, offset=-1.0).save_to_preset(
        str(tmp_path))
    converter = PaliGemmaImageConverter.from_preset(tmp_path)
    assert converter == PaliGemmaImageConverter(image_size=(30, 30), scale=1 / 127.5, offset=-1.0)


def test_legacy_keys_and_bad_configs(tmp_path):
    legacy = PaliGemmaImageConverter.from_config({"height": 8, "width": 8, "scale": 1.0, "mean": [0.5] * 3,
                                                  "variance": [0.25] * 3})
    assert legacy.image_size == (8, 8) and legacy.scale == (2.0,) * 3 and legacy.offset == (-1.0,) * 3
    with pytest.raises(ImageConverterError, match="pad_to_aspect_ratio"):
        PaliGemmaImageConverter.from_config({"image_size": [8, 8], "pad_to_aspect_ratio": True,
                                             "crop_to_aspect_ratio": False})
    with pytest.raises(ImageConverterError, match="interpolation='bicubic'"):
        PaliGemmaImageConverter.from_config({"image_size": [8, 8], "interpolation": "bicubic"})
    (tmp_path / "image_converter.json").write_text(json.dumps({"class_name": "Rescaling", "config": {}}))
    with pytest.raises(ValueError, match="class 'Rescaling'"):
        PaliGemmaImageConverter.from_preset(tmp_path)


def test_bad_images():
    converter = PaliGemmaImageConverter(image_size=(8, 8), scale=1 / 127.5, offset=-1.0)
    with pytest.raises(ImageConverterError, match=r"expected shape \(height, width, channels\)"):
        converter(np.zeros((8, 8)))
    with pytest.raises(ImageConverterError, match="finite"):
        converter(np.full((8, 8, 3), np.nan))
    with pytest.raises(ImageConverterError, match="non-empty"):
        converter(np.zeros((0, 8, 3)))
    with pytest.raises(ImageConverterError, match="integer or float pixel dtype"):
        converter(np.zeros((8, 8, 3), dtype=bool))
    # Differently sized images in a list are converted one by one and stacked.
    assert converter([np.zeros((9, 12, 3), np.uint8), np.zeros((20, 20, 3), np.uint8)]).shape == (2, 8, 8, 3)
