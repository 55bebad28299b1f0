"""Image files for the generate command: .npy, binary PPM/PGM and PNG (zlib only), and their errors."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from _generation_helpers import write_png
from refimpl.image_io import ImageReadError, read_image


def rgb(height=5, width=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def test_hand_written_png_2x1(tmp_path):
    # A 2x1 RGB PNG written byte by byte: one row, filter 1 (Sub) -> stored [10,20,30] then differences [5,5,5].
    row = bytes([1, 10, 20, 30, 5, 5, 5])
    ihdr = struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0)

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b"")
    (tmp_path / "hand.png").write_bytes(data)
    np.testing.assert_array_equal(read_image(tmp_path / "hand.png"), [[[10, 20, 30], [15, 25, 35]]])


@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4)])
def test_png_filters_round_trip(tmp_path, filters):
    pixels = rgb(6, 9, seed=len(filters))
    out = read_image(write_png(tmp_path / "a.png", pixels, filters=filters))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)


def test_png_color_types_and_depths(tmp_path):
    pixels = rgb()
    rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 77, np.uint8)], axis=2)
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "rgba.png", rgba, filters=(4, 3))), pixels)
    gray = pixels[:, :, 0]
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "g.png", gray, filters=(1, 2))),
                                  np.repeat(gray[:, :, None], 3, axis=2))
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255]], np.uint8)
    index = np.random.default_rng(1).integers(0, 3, (4, 6)).astype(np.uint8)
    out = read_image(write_png(tmp_path / "p.png", index, color_type=3, palette=palette))
    np.testing.assert_array_equal(out, palette[index])
    deep = np.random.default_rng(2).integers(0, 65536, (3, 4, 3)).astype(np.uint16)
    out = read_image(write_png(tmp_path / "d.png", deep, filters=(4,), bit_depth=16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, deep * (255 / 65535), rtol=1e-6)


def test_ppm_pgm_and_npy(tmp_path):
    pixels = rgb()
    (tmp_path / "a.ppm").write_bytes(b"P6\n# a comment\n7 5\n255\n" + pixels.tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "a.ppm"), pixels)
    gray = pixels[:, :, 1]
    (tmp_path / "a.pgm").write_bytes(b"P5 7 5 255\n" + gray.tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "a.pgm")[:, :, 2], gray)
    wide = (pixels.astype(np.uint16) * 4).astype(">u2")  # PPM samples above 255 are big-endian
    (tmp_path / "w.ppm").write_bytes(b"P6 7 5 1020\n" + wide.tobytes())
    np.testing.assert_allclose(read_image(tmp_path / "w.ppm"), pixels, rtol=1e-6)
    np.save(tmp_path / "a.npy", pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), pixels)
    np.save(tmp_path / "f.npy", pixels.astype(np.float64))
    assert read_image(tmp_path / "f.npy").dtype == np.float32


def test_bad_files(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not supported")
    with pytest.raises(ImageReadError, match="unknown format"):
        read_image(tmp_path / "x.jpg")
    good = write_png(tmp_path / "good.png", rgb()).read_bytes()
    corrupt = bytearray(good)
    corrupt[40] ^= 0xFF  # inside the IDAT payload
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    with pytest.raises(ImageReadError, match="CRC"):
        read_image(tmp_path / "corrupt.png")
    (tmp_path / "short.png").write_bytes(good[:-20])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "short.png")
    (tmp_path / "short.ppm").write_bytes(b"P6 7 5 255\n" + rgb().tobytes()[:50])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "short.ppm")
    (tmp_path / "huge.ppm").write_bytes(b"P6 100000 100000 255\n")
    with pytest.raises(ImageReadError, match="pixels; expected 1..16384"):
        read_image(tmp_path / "huge.ppm")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ImageReadError, match="not a readable .npy"):
        read_image(tmp_path / "obj.npy")
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(ImageReadError, match=r"expected shape \(height, width"):
        read_image(tmp_path / "v.npy")
