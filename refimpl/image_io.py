"""Reading an image file into an RGB array, with the standard library and NumPy only.

Formats, recognised by their first bytes (never by the file name):

    .npy         uint8 or float pixels, (H, W, 3) or (H, W) grayscale; read with allow_pickle=False
    PPM / PGM    binary "P6" (RGB) and "P5" (gray), maxval 1..65535 (values above 255 are rescaled)
    PNG          8- and 16-bit gray, gray+alpha, RGB, RGBA and 8-bit palette images, not interlaced;
                 decompressed with zlib, chunk CRCs checked, alpha dropped (as PIL's convert("RGB") does)

Grayscale is repeated into three channels. The result is uint8[H, W, 3] for 8-bit data, or float32[H, W, 3] in
[0, 255] for anything else, ready for ``PaliGemmaImageConverter``. Every problem is a ValueError naming the file.
Sizes are checked before anything large is allocated.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from refimpl.files import check_file_size

MAX_IMAGE_SIDE = 16384  # pixels per side; a 16k x 16k RGB image is 768 MB as uint8
MAX_FILE_BYTES = 1 << 30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
# PNG colour type -> samples per pixel (0 gray, 2 RGB, 3 palette index, 4 gray + alpha, 6 RGBA).
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


class ImageReadError(ValueError):
    """An image file that cannot be read."""


def read_image(path: str | Path) -> np.ndarray:
    """uint8[H, W, 3] (8-bit files) or float32[H, W, 3] in [0, 255] from a .npy, PPM/PGM or PNG file."""
    path = Path(path)
    check_file_size(path, "image", MAX_FILE_BYTES, ImageReadError, missing=ImageReadError)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(NPY_MAGIC):
        return _to_rgb(_read_npy(path), path)
    if head[:2] in (b"P5", b"P6"):
        return _to_rgb(_read_netpbm(path.read_bytes(), path), path)
    if head == PNG_SIGNATURE:
        return _to_rgb(_read_png(path.read_bytes(), path), path)
    raise ImageReadError(f"image {path}: unknown format (first bytes {head!r}); expected a .npy array, a binary "
                         "PPM/PGM (P6/P5) or a PNG file")


def _check_side(height: int, width: int, path: Path) -> None:
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise ImageReadError(f"image {path}: {width}x{height} pixels; expected 1..{MAX_IMAGE_SIDE} per side")


def _to_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W, 3): gray repeated, alpha dropped."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ImageReadError(f"image {path}: expected (height, width) or (height, width, 1/3/4 channels), "
                             f"found shape {pixels.shape}")
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


# ---- .npy ----------------------------------------------------------------------------------------------------
def _read_npy(path: Path) -> np.ndarray:
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header only
    except (ValueError, OSError) as error:
        raise ImageReadError(f"image {path}: not a readable .npy array ({error})") from None
    if header.ndim not in (2, 3):
        raise ImageReadError(f"image {path}: expected shape (height, width[, channels]), found {header.shape}")
    _check_side(header.shape[0], header.shape[1], path)
    if header.dtype != np.uint8 and not np.issubdtype(header.dtype, np.floating):
        raise ImageReadError(f"image {path}: expected uint8 or float pixels, found {header.dtype}")
    pixels = np.array(header)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float32)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
            raise ImageReadError(f"image {path}: float pixels must be finite and in [0, 255]")
    return pixels


# ---- PPM / PGM -----------------------------------------------------------------------------------------------
def _read_netpbm(data: bytes, path: Path) -> np.ndarray:
    """Binary PGM (P5) or PPM (P6): magic, width, height, maxval as ASCII fields, one whitespace, raw samples."""
    fields, pos = [], 2
    while len(fields) < 3:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":  # a comment runs to the end of the line
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
            continue
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ImageReadError(f"image {path}: malformed PPM/PGM header (expected width, height and maxval)")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    _check_side(height, width, path)
    if not 1 <= maxval <= 65535:
        raise ImageReadError(f"image {path}: maxval {maxval}; expected 1..65535")
    channels = 3 if data[:2] == b"P6" else 1
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    count = width * height * channels
    body = data[pos + 1:]  # exactly one whitespace byte separates the header from the samples
    if len(body) < count * dtype.itemsize:
        raise ImageReadError(f"image {path}: truncated; expected {count * dtype.itemsize} bytes of samples, "
                             f"found {len(body)}")
    pixels = np.frombuffer(body, dtype=dtype, count=count).reshape(height, width, channels)
    if maxval == 255:
        return pixels.copy()
    return pixels.astype(np.float32) * np.float32(255.0 / maxval)


# ---- PNG -----------------------------------------------------------------------------------------------------
def _png_chunks(data: bytes, path: Path):
    """(type, payload) for each chunk after the signature, CRCs checked, stopping at IEND."""
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise ImageReadError(f"image {path}: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(payload) != length or len(crc) != 4:
            raise ImageReadError(f"image {path}: truncated PNG chunk {kind!r}")
        if zlib.crc32(kind + payload) != struct.unpack(">I", crc)[0]:
            raise ImageReadError(f"image {path}: PNG chunk {kind!r} fails its CRC check (corrupt file)")
        yield kind, payload
        if kind == b"IEND":
            return
        pos += 12 + length


def _read_png(data: bytes, path: Path) -> np.ndarray:
    header, palette, compressed = None, None, []
    for kind, payload in _png_chunks(data, path):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"PLTE":
            palette = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            compressed.append(payload)
    if header is None:
        raise ImageReadError(f"image {path}: PNG without an IHDR chunk")
    width, height, depth, color, _compression, _filter, interlace = header
    _check_side(height, width, path)
    if color not in PNG_CHANNELS or depth not in (8, 16) or (color == 3 and depth != 8):
        raise ImageReadError(f"image {path}: PNG colour type {color} with bit depth {depth} is not supported "
                             "(supported: 8/16-bit gray, gray+alpha, RGB, RGBA; 8-bit palette)")
    if interlace:
        raise ImageReadError(f"image {path}: interlaced (Adam7) PNG is not supported")
    channels, bytes_per_sample = PNG_CHANNELS[color], depth // 8
    row_bytes = width * channels * bytes_per_sample
    raw = _inflate(b"".join(compressed), height * (row_bytes + 1), path)
    rows = _unfilter(np.frombuffer(raw, dtype=np.uint8).reshape(height, row_bytes + 1),
                     channels * bytes_per_sample, path)
    if depth == 16:
        samples = rows.view(">u2").reshape(height, width, channels)
        return samples.astype(np.float32) * np.float32(255.0 / 65535.0)
    pixels = rows.reshape(height, width, channels)
    if color == 3:
        if palette is None or pixels.max() >= len(palette):
            raise ImageReadError(f"image {path}: palette PNG with a missing or too short PLTE chunk")
        return palette[pixels[:, :, 0]]
    return pixels


def _inflate(compressed: bytes, expected: int, path: Path) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        raw = decompressor.decompress(compressed, expected)  # never more than the image needs
    except zlib.error as error:
        raise ImageReadError(f"image {path}: corrupt PNG image data ({error})") from None
    if len(raw) != expected:
        raise ImageReadError(f"image {path}: PNG image data has {len(raw)} bytes; expected {expected}")
    return raw


def _unfilter(filtered: np.ndarray, bpp: int, path: Path) -> np.ndarray:
    """Undo the per-row PNG filters (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth); returns uint8[H, row bytes].

    Each filter predicts a byte from its left neighbour a (bpp bytes back), the byte above b and the upper-left c;
    the stored byte is the difference modulo 256. Sub and Up vectorise; Average and Paeth go pixel by pixel.
    """
    height, width_bytes = filtered.shape[0], filtered.shape[1] - 1
    out = np.zeros((height, width_bytes), dtype=np.uint8)
    previous = np.zeros(width_bytes, dtype=np.uint8)
    for y in range(height):
        kind, line = filtered[y, 0], filtered[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:
            row = (np.cumsum(line.reshape(-1, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).reshape(-1)
        elif kind == 2:
            row = line + previous  # uint8 arithmetic wraps modulo 256
        elif kind in (3, 4):
            row = _unfilter_sequential(line, previous, bpp, paeth=kind == 4)
        else:
            raise ImageReadError(f"image {path}: PNG row {y} has unknown filter type {kind}")
        out[y] = row
        previous = row
    return out


def _unfilter_sequential(line: np.ndarray, above: np.ndarray, bpp: int, *, paeth: bool) -> np.ndarray:
    """Average (floor((a + b) / 2)) or Paeth prediction, one pixel (bpp bytes) at a time."""
    row = np.zeros(len(line), dtype=np.int64)
    line64, above64 = line.astype(np.int64), above.astype(np.int64)
    for start in range(0, len(line), bpp):
        b = above64[start:start + bpp]
        if start == 0:
            a = c = np.zeros(bpp, dtype=np.int64)
        else:
            a, c = row[start - bpp:start], above64[start - bpp:start]
        if paeth:
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        else:
            predictor = (a + b) // 2
        row[start:start + bpp] = (line64[start:start + bpp] + predictor) % 256
    return row.astype(np.uint8)
