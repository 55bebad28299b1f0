"""Keras weight-file reader: turns a saved ``PaliGemmaBackbone`` into ``refimpl.params.PaliGemmaParams``.

Scope: reading only, with h5py; keras is never imported. Four on-disk layouts are recognised from the file's
structure (spec sections 9 and 11), never from its name:

    layout                  what it is                                                   entries keyed by
    keras3 .weights.h5      ``save_weights`` / ``save_to_preset`` (spec 11.1)            object path
    keras3 sharded          ``model.weights.json`` weight_map plus shards (spec 11.2)    object path
    keras 2.13 .weights.h5  as keras3, ``_layer_checkpoint_dependencies`` for ``layers``  object path
    legacy keras-2 .h5      ``model.save("x.h5")``: model_weights, layer_names (11.3)    variable path

An object path is where keras' ``_save_state`` put a variable (``layers/pali_gemma_decoder_block_1/attention/
query_dense/vars/0``); a variable path is ``variable.path`` (``decoder_block_1/attention/query/kernel``). ``SCHEMA``
maps both to a params field, a shape in terms of the config, and a re-layout. It is the documentation and the
strictness check: loading fails, listing every problem at once, on a missing, unused, misshaped, non-float,
never-written or unreadable entry. Nothing is ever filled in silently.

Memory: every check is done on metadata before any array is allocated, and each dataset is read in slabs of at
most ``CHUNK_ELEMENTS`` values straight into its preallocated params array (through a strided view when the
params layout is a transpose of the stored one), so no tensor ever exists twice. bf16 (stored by keras as 2-byte
opaque data) is widened slab by slab; rounding for the bf16 policies happens slab by slab, at one named point.
``stream_params`` goes further for models larger than memory: it keeps the file open and reads each ViT or
decoder block when the forward pass reaches it, and only the gathered rows of the token embedding.

A tf.keras ``save_weights("x.h5")`` file (``layer_names`` on the root group) is read as the legacy layout too.

Non-goals: writing files; quantized or LoRA variables; ``vit_pooling="map"``; keras 3.0.0-3.0.2 files, where the
final norm sat at ``layer_norm/`` (those fail with missing/unexpected-entry errors naming both paths).
"""

from __future__ import annotations

import collections.abc
import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple

import h5py
import numpy as np

from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import Policy, bfloat16_bits_to_float32, round_to_bfloat16
from refimpl.params import DecoderBlockParams, PaliGemmaParams, VitBlockParams, VitParams

LAYOUT_KERAS3 = "keras3 .weights.h5"
LAYOUT_SHARDED = "keras3 sharded .weights.json"
LAYOUT_KERAS213 = "keras 2.13 .weights.h5 (_layer_checkpoint_dependencies)"
LAYOUT_LEGACY = "legacy keras-2 .h5 (model_weights/layer_names)"

# A preset directory holds one of these; keras-hub prefers the single file when both exist.
PRESET_WEIGHT_FILES = ("model.weights.h5", "model.weights.json")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # the stored dtypes a weight may have
CHUNK_ELEMENTS = 1 << 21  # values per slab read (8 MB as float32); module-level so tests can shrink it
MAX_JSON_BYTES = 64 << 20  # a weight map is kilobytes; refuse to parse anything absurd
MAX_ATTR_BYTES = 1 << 20  # keras splits attributes above 64 KB, so 1 MB per attribute is generous
MAX_PROBLEMS_SHOWN = 25
# A compressed dataset may decode to at most this many times its stored bytes, plus 1 MB (keras never compresses;
# trained float weights compress less than 2x): a bound on what a small hostile file can make us allocate.
MAX_EXPANSION = 64
# A config whose schema lists far more entries than the file holds is refused before the schema is expanded
# (a config.json claiming 10^9 layers would otherwise take hours and all memory just to list what is missing).
MAX_EXPECTED_PER_ENTRY, MAX_EXPECTED_SLACK = 4, 1000
# What h5py raises for damaged metadata: HDF5 reports a corrupt object header, B-tree or heap as any of these.
H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)


class WeightFileError(ValueError):
    """A weight file that cannot be turned into params: unreadable, unknown layout, or not matching the config."""


@contextlib.contextmanager
def _corrupt_file_errors(path, layout: str, doing: str) -> Iterator[None]:
    """Re-raise what h5py raises for a damaged file as a WeightFileError naming the file."""
    try:
        yield
    except WeightFileError:
        raise
    except H5_ERRORS as error:
        raise WeightFileError(f"{path} [{layout}]: cannot {doing} ({type(error).__name__}: {error}); the file is "
                              "truncated or corrupt") from None


# ---- Keras' naming quirk ---------------------------------------------------------------------------------------
def keras_name_suffix(index: int) -> str:
    """The suffix keras appends to the index-th object of one class inside one container: "", "_1", "_2", ...

    ``_save_state`` names list items by their class name in snake_case, uniquified per container, and the first
    one gets no suffix: ``pali_gemma_decoder_block``, ``pali_gemma_decoder_block_1``, ... (spec 11.1).
    """
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index={index!r} must be a non-negative integer")
    return "" if index == 0 else f"_{index}"


# ---- re-layouts: how a stored keras array sits inside its params array -----------------------------------------
@dataclass(frozen=True)
class Relayout:
    """A params array shape and a view of that array in the stored (keras) layout, so reading fills it directly."""

    name: str
    params_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # stored shape -> params shape
    stored_view: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (params array, stored shape) -> view


AS_IS = Relayout("as is", lambda s: s, lambda a, s: a)
# f[P, P, 3, Dv] HWIO -> f[P*P*3, Dv]: row (ph*P + pw)*3 + c, a patch flattened in (row, col, channel) order.
CONV_TO_MATRIX = Relayout("HWIO -> (P*P*3, Dv)", lambda s: (math.prod(s[:-1]), s[-1]), lambda a, s: a.reshape(s))
# f[X, D, H] -> f[D, X*H]: column x*H + h is head x, dim h (X = N for queries, K for keys and values).
HEADS_IN = Relayout("(X, D, H) -> (D, X*H)", lambda s: (s[1], s[0] * s[2]),
                    lambda a, s: a.reshape(s[1], s[0], s[2]).transpose(1, 0, 2))
# f[N, H, D] -> f[N*H, D]: row n*H + h is head n, dim h (a pure reshape).
HEADS_OUT = Relayout("(N, H, D) -> (N*H, D)", lambda s: (s[0] * s[1], s[2]), lambda a, s: a.reshape(s))


# ---- the schema --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemaEntry:
    """One keras variable and the params field it becomes.

    In ``object_path`` the placeholders ``{j}`` (ViT block) and ``{i}`` (decoder block) stand for keras' counter
    suffix (``keras_name_suffix``); in ``variable_path`` and ``field`` they stand for the plain index.
    """

    field: str  # params field, e.g. "blocks[{i}].wq"
    object_path: str  # .weights.h5 dataset path
    variable_path: str  # keras variable.path, the dataset name in a legacy .h5 file
    shape: Callable[[PaliGemmaConfig], tuple[int, ...]]  # stored (keras) shape
    relayout: Relayout = AS_IS
    autocast: bool = True  # False where keras reads the variable without casting it to the compute dtype
    present: Callable[[PaliGemmaConfig], bool] = lambda c: True  # False for optional layers the config lacks

    @property
    def scope(self) -> str:
        """"vit_block", "decoder_block" or "model": which index, if any, the entry repeats over."""
        return "vit_block" if "{j}" in self.field else "decoder_block" if "{i}" in self.field else "model"


_VIT = "layers/pali_gemma_vit/layers/pali_gemma_vit_encoder"
_VBLK = _VIT + "/resblocks/pali_gemma_vit_encoder_block{j}"
_DEC = "layers/pali_gemma_decoder_block{i}"


def _dv(c): return (c.vit_hidden_dim,)  # noqa: E704  (shape helpers keep the table one row per variable)
def _dvdv(c): return (c.vit_hidden_dim, c.vit_hidden_dim)  # noqa: E704
def _d(c): return (c.hidden_dim,)  # noqa: E704


def _vit_block_rows() -> list[SchemaEntry]:
    rows = []
    for ours, keras in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
        obj = f"{_VBLK}/attn/{keras}_proj/vars"
        var = f"image_encoder/encoder_block_{{j}}/multi_head_attention/{keras}_proj"
        rows += [SchemaEntry(f"vit.blocks[{{j}}].w{ours}", f"{obj}/0", f"{var}/kernel", _dvdv),
                 SchemaEntry(f"vit.blocks[{{j}}].b{ours}", f"{obj}/1", f"{var}/bias", _dv)]
    for n in (1, 2):  # LayerNorm gamma/beta have autocast=False in keras
        obj, var = f"{_VBLK}/layer_norm_{n}/vars", f"image_encoder/encoder_block_{{j}}/layer_norm_{n}"
        rows += [SchemaEntry(f"vit.blocks[{{j}}].ln{n}_gamma", f"{obj}/0", f"{var}/gamma", _dv, autocast=False),
                 SchemaEntry(f"vit.blocks[{{j}}].ln{n}_beta", f"{obj}/1", f"{var}/beta", _dv, autocast=False)]
    mlp_shapes = {1: (lambda c: (c.vit_hidden_dim, c.vit_intermediate_dim), lambda c: (c.vit_intermediate_dim,)),
                  2: (lambda c: (c.vit_intermediate_dim, c.vit_hidden_dim), _dv)}
    for n, (kernel_shape, bias_shape) in mlp_shapes.items():
        obj, var = f"{_VBLK}/mlp_dense_{n}/vars", f"image_encoder/encoder_block_{{j}}/mlp_dense_{n}"
        rows += [SchemaEntry(f"vit.blocks[{{j}}].mlp{n}_kernel", f"{obj}/0", f"{var}/kernel", kernel_shape),
                 SchemaEntry(f"vit.blocks[{{j}}].mlp{n}_bias", f"{obj}/1", f"{var}/bias", bias_shape)]
    return rows


def _decoder_block_rows() -> list[SchemaEntry]:
    def norm(field, present=lambda c: True):
        return SchemaEntry(f"blocks[{{i}}].{field}", f"{_DEC}/{field}/vars/0", f"decoder_block_{{i}}/{field}/scale",
                           _d, present=present)

    def dense(field, obj, var, shape, relayout=AS_IS):
        return SchemaEntry(f"blocks[{{i}}].{field}", f"{_DEC}/{obj}/vars/0", f"decoder_block_{{i}}/{var}/kernel",
                           shape, relayout)

    return [
        norm("pre_attention_norm"),
        dense("wq", "attention/query_dense", "attention/query",
              lambda c: (c.num_query_heads, c.hidden_dim, c.head_dim), HEADS_IN),
        dense("wk", "attention/key_dense", "attention/key",
              lambda c: (c.num_key_value_heads, c.hidden_dim, c.head_dim), HEADS_IN),
        dense("wv", "attention/value_dense", "attention/value",
              lambda c: (c.num_key_value_heads, c.hidden_dim, c.head_dim), HEADS_IN),
        dense("wo", "attention/output_dense", "attention/attention_output",
              lambda c: (c.num_query_heads, c.head_dim, c.hidden_dim), HEADS_OUT),
        norm("post_attention_norm", lambda c: c.use_post_attention_norm),
        norm("pre_ffw_norm"),
        dense("w_gate", "gating_ffw", "ffw_gating", lambda c: (c.hidden_dim, c.ffw_dim)),
        dense("w_up", "gating_ffw_2", "ffw_gating_2", lambda c: (c.hidden_dim, c.ffw_dim)),
        dense("w_down", "ffw_linear", "ffw_linear", lambda c: (c.ffw_dim, c.hidden_dim)),
        norm("post_ffw_norm", lambda c: c.use_post_ffw_norm),
    ]


SCHEMA: tuple[SchemaEntry, ...] = (
    SchemaEntry("vit.patch_kernel", f"{_VIT}/vision_embeddings/patch_embedding/vars/0",
                "image_encoder/encoder_embeddings/embedding_conv/kernel",
                lambda c: (c.vit_patch_size, c.vit_patch_size, 3, c.vit_hidden_dim), CONV_TO_MATRIX),
    SchemaEntry("vit.patch_bias", f"{_VIT}/vision_embeddings/patch_embedding/vars/1",
                "image_encoder/encoder_embeddings/embedding_conv/bias", _dv),
    SchemaEntry("vit.position_embedding", f"{_VIT}/vision_embeddings/position_embedding/vars/0",
                "image_encoder/encoder_embeddings/position_embedding/embeddings",
                lambda c: (c.image_sequence_length, c.vit_hidden_dim), autocast=False),
    *_vit_block_rows(),
    SchemaEntry("vit.encoder_ln_gamma", f"{_VIT}/encoder_layer_norm/vars/0", "image_encoder/encoder_layer_norm/gamma",
                _dv, autocast=False),
    SchemaEntry("vit.encoder_ln_beta", f"{_VIT}/encoder_layer_norm/vars/1", "image_encoder/encoder_layer_norm/beta",
                _dv, autocast=False),
    SchemaEntry("vit.proj_kernel", "layers/pali_gemma_vit/layers/dense/vars/0", "image_classifier/kernel",
                lambda c: (c.vit_hidden_dim, c.hidden_dim)),
    SchemaEntry("vit.proj_bias", "layers/pali_gemma_vit/layers/dense/vars/1", "image_classifier/bias", _d),
    # ReversibleEmbedding has autocast=False; its table is also the (tied) LM head.
    SchemaEntry("token_embedding", "layers/reversible_embedding/vars/0", "token_embedding/embeddings",
                lambda c: (c.vocabulary_size, c.hidden_dim), autocast=False),
    *_decoder_block_rows(),
    SchemaEntry("final_norm", "layers/rms_normalization/vars/0", "final_normalization/scale", _d),
)


def schema_table() -> str:
    """SCHEMA as text, one row per keras variable: params field, object path, variable path, re-layout, autocast."""
    rows = [("params field", "object path (.weights.h5)", "variable path (legacy .h5)", "re-layout", "autocast")]
    rows += [(r.field, r.object_path, r.variable_path, r.relayout.name, str(r.autocast)) for r in SCHEMA]
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


@dataclass(frozen=True)
class ExpectedEntry:
    """A schema row resolved for one config and block index."""

    key: str  # the entry's name in the file (object path or variable path)
    field: str  # e.g. "blocks[1].wq"
    index: int | None  # block index for per-block rows
    shape: tuple[int, ...]  # stored shape
    schema: SchemaEntry

    @property
    def attribute(self) -> str:
        """The dataclass attribute the array goes to ("wq", "patch_kernel", ...)."""
        return self.field.rsplit(".", 1)[-1]


def expected_entries(config: PaliGemmaConfig, naming: str = "object_path") -> dict[str, ExpectedEntry]:
    """Every entry a weight file for ``config`` must hold, keyed by ``naming`` ("object_path" or "variable_path").

    Needs no file: a shape-only test of a full-size preset can call it directly.
    """
    if naming not in ("object_path", "variable_path"):
        raise ValueError(f"naming={naming!r} must be 'object_path' or 'variable_path'")
    counts = {"model": 1, "vit_block": config.vit_num_layers, "decoder_block": config.num_layers}
    out: dict[str, ExpectedEntry] = {}
    for row in SCHEMA:
        if not row.present(config):
            continue
        for n in range(counts[row.scope]):
            index = None if row.scope == "model" else n
            key = _expand(getattr(row, naming), n, plain=naming == "variable_path")
            out[key] = ExpectedEntry(key, _expand(row.field, n, plain=True), index, row.shape(config), row)
    return out


def expected_entry_count(config: PaliGemmaConfig) -> int:
    """len(expected_entries(config)), computed without listing them."""
    counts = {"model": 1, "vit_block": config.vit_num_layers, "decoder_block": config.num_layers}
    return sum(counts[row.scope] for row in SCHEMA if row.present(config))


def _expand(pattern: str, index: int, *, plain: bool) -> str:
    value = str(index) if plain else keras_name_suffix(index)
    return pattern.replace("{i}", value).replace("{j}", value)


# ---- the dtype rule ----------------------------------------------------------------------------------------------
def rounds_to_bfloat16(entry: SchemaEntry, policy: Policy) -> bool:
    """Whether this weight is rounded to bf16 under ``policy``.

    ``bfloat16`` stores every variable in bf16. ``mixed_bfloat16`` stores float32 and casts a variable to bf16
    when a layer reads it, except for variables with autocast=False (spec section 7). Of those, only the LayerNorm
    gamma/beta are observable in float32 (LayerNorm computes in float32). The position and token tables are
    autocast=False too, but every use rounds them: keras casts a lookup result to bf16 at once, and the LM head
    under mixed_bfloat16 multiplies by the table in bf16 and returns bf16 logits (measured with keras 3.15.1 /
    keras-hub 0.32: bit-identical logits only with a bf16 table), so rounding them here gives the same numbers.
    """
    if not policy.bf16:
        return False
    keeps_float32 = policy.mixed and not entry.autocast and entry.field not in ("vit.position_embedding",
                                                                               "token_embedding")
    return not keeps_float32


# ---- reading one dataset -----------------------------------------------------------------------------------------
class EntryInfo(NamedTuple):
    """What a file declares about one entry, read from metadata only."""

    shape: tuple[int, ...]
    dtype: str  # stored dtype: "float32", "bfloat16", "float16", "int32", "string", ...
    file: Path  # the HDF5 file (shard) holding it
    dataset: str  # its path inside that file


def stored_dtype(dataset: h5py.Dataset) -> str:
    """The dtype a dataset holds: a numpy name, "bfloat16" for keras' 2-byte opaque data, or a descriptive string.

    keras >= 3.0.5 tags bf16 with ``attrs["dtype"] = "bfloat16"``; 3.0.0-3.0.4 and keras' legacy writer wrote the
    same ``|V2`` data untagged, and keras reads any untagged 2-byte opaque dataset as bf16, as we do.
    """
    dt, tag = dataset.dtype, _small_attr(dataset, "dtype")
    if h5py.check_string_dtype(dt) is not None:
        return "string"
    if dt.kind == "V" and dt.fields is None and dt.itemsize == 2 and tag in (None, "bfloat16"):
        return "bfloat16"
    name = "compound" if dt.fields is not None else f"opaque{dt.itemsize}" if dt.kind == "V" else dt.name
    if dt.kind == "O":
        name = "object"
    return name if tag is None or tag == name else f"{name} (tagged dtype={tag!r})"


def _small_attr(obj, name: str) -> str | None:
    """A short string attribute, or None if absent; refuses to read anything large."""
    if name not in obj.attrs:
        return None
    if _attr_bytes(obj, name) > 4096:
        return "<oversized attribute>"
    value = obj.attrs[name]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _attr_bytes(obj, name: str) -> int:
    """Bytes an attribute occupies in the file, known without reading it (HDF5 reports empty ones as an error)."""
    try:
        return h5py.h5a.open(obj.id, name.encode()).get_storage_size()
    except RuntimeError:
        return 0


def _slabs(shape: tuple[int, ...]) -> Iterator[tuple]:
    """Index tuples that cover an array of ``shape`` in slabs of at most CHUNK_ELEMENTS values (or one row)."""
    row = math.prod(shape[1:])
    if row <= CHUNK_ELEMENTS or len(shape) == 1:
        step = max(1, CHUNK_ELEMENTS // max(row, 1))
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])),)
    else:
        for n in range(shape[0]):
            for rest in _slabs(shape[1:]):
                yield (n, *rest)


def _decode(raw: np.ndarray, dtype: str, round_bf16: bool) -> np.ndarray:
    """One slab as stored -> float values, widened from bf16 bits and rounded to bf16 if asked."""
    values = bfloat16_bits_to_float32(raw.view("<u2")) if dtype == "bfloat16" else raw
    # The one point where weights are rounded for the bf16 policies (values are float32 under them).
    return round_to_bfloat16(np.asarray(values, dtype=np.float32)) if round_bf16 else values


def _fill(dataset: h5py.Dataset, dtype: str, view: np.ndarray, round_bf16: bool) -> None:
    """Read ``dataset`` into ``view`` (same shape, any strides), converting as it goes."""
    if dtype != "bfloat16" and not round_bf16 and view.flags.c_contiguous:
        dataset.read_direct(view)  # HDF5 converts float16/32/64 to the destination dtype itself
        return
    for index in _slabs(view.shape):
        view[index] = _decode(dataset[index], dtype, round_bf16)


# ---- weight files --------------------------------------------------------------------------------------------
class WeightFile:
    """An open keras weight file (or shard set): its layout and entries, read lazily.

    ``entries`` maps each entry's key (object path, or variable path for the legacy layout; see ``naming``) to
    its declared shape and stored dtype; no data has been read. Use as a context manager, or call ``close``.
    """

    def __init__(self, path: Path, layout: str, naming: str, handles: dict[Path, h5py.File],
                 entries: dict[str, EntryInfo], layer_names: Mapping[str, str] | None = None):
        self.path, self.layout, self.naming = path, layout, naming
        self.entries = entries
        self._handles = handles
        self._layer_names = dict(layer_names or {})  # object group path -> keras layer name (keras >= 3.10)

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    @property
    def files(self) -> list[Path]:
        """The HDF5 files behind this weight file (several for a sharded one)."""
        return list(self._handles)

    def error(self, message: str) -> WeightFileError:
        return WeightFileError(f"{self.path} [{self.layout}]: {message}")

    def dataset(self, key: str) -> h5py.Dataset:
        info = self.entries[key]
        if info.file not in self._handles:
            raise self.error(f"entry {key!r}: the weight file has been closed (a streaming model after close()?)")
        return self._handles[info.file][info.dataset]

    def is_fully_written(self, key: str) -> bool:
        """False if HDF5 holds less data than the declared shape: reading would return fill values (zeros)."""
        dataset = self.dataset(key)
        if dataset.chunks is None:  # contiguous or compact: all storage is allocated on the first write
            return dataset.id.get_storage_size() >= dataset.size * dataset.dtype.itemsize
        grid = math.prod(math.ceil(n / c) for n, c in zip(dataset.shape, dataset.chunks))
        return dataset.id.get_num_chunks() >= grid

    def recorded_layer_names(self, key: str) -> list[str]:
        """keras layer names (the ``vars`` ``name`` attributes, keras >= 3.10) along the object path of ``key``."""
        parts = key.split("/")[:-2]  # drop "vars/<n>"
        groups = ("/".join(parts[:n]) for n in range(1, len(parts) + 1))
        return [self._layer_names[g] for g in groups if g in self._layer_names]

    def read_into(self, key: str, view: np.ndarray, *, round_bf16: bool = False) -> None:
        """Read the entry ``key`` into ``view`` (its stored shape), slab by slab, decoding bf16 on the way."""
        info = self.entries[key]
        if tuple(view.shape) != info.shape:
            raise ValueError(f"read_into({key!r}): view shape {view.shape} != stored shape {info.shape}")
        dataset = self.dataset(key)  # raises if the file was closed
        try:
            _fill(dataset, info.dtype, view, round_bf16)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
            raise self.error(f"cannot read entry {key!r} from {info.file}:{info.dataset} "
                             f"(shape {info.shape}, {info.dtype}): {error}; the file is truncated or corrupt") from None


def read_stored_variable(preset, config: PaliGemmaConfig, field: str) -> np.ndarray:
    """The Keras variable behind the params field ``field`` (e.g. ``"blocks[1].wq"``), as float32 in its stored
    shape (before any re-layout): what a port's weight converter starts from."""
    with open_weight_file(preset) as weights:
        matches = [e for e in expected_entries(config, weights.naming).values() if e.field == field]
        if not matches:
            raise ValueError(f"field={field!r} names no weight of this config; expected a params field such as "
                             "'blocks[0].wq' or 'vit.patch_kernel'")
        out = np.empty(matches[0].shape, dtype=np.float32)
        weights.read_into(matches[0].key, out)
    return out


def open_weight_file(path) -> WeightFile:
    """Open a preset directory, ``.weights.h5``, sharded ``.weights.json`` or legacy ``.h5`` and list its entries.

    The layout is detected from the content. Raises WeightFileError for anything unreadable or unrecognised.
    """
    path = _resolve(Path(path))
    with open(path, "rb") as stream:
        head = stream.read(8)
    if head == HDF5_SIGNATURE or h5py.is_hdf5(str(path)):
        with _corrupt_file_errors(path, "HDF5", "read the file's structure"):
            return _open_hdf5(path)
    if head.lstrip()[:1] in (b"{", b"["):
        return _open_sharded(path)
    raise WeightFileError(f"{path}: neither an HDF5 file nor a JSON weight map (starts with {head!r})")


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in PRESET_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir())[:20]
        raise WeightFileError(f"{path}: preset directory holds neither of {PRESET_WEIGHT_FILES}; found {found}")
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file or directory")
    return path


def _open_h5(path: Path) -> h5py.File:
    try:
        handle = h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as error:
        raise WeightFileError(f"{path}: cannot open as HDF5 ({error}); the file is truncated, corrupt, or not "
                              "an HDF5 file") from None
    try:
        with _corrupt_file_errors(path, "HDF5", "read the file's structure"):
            _check_global_heaps(path, handle)
    except BaseException:
        handle.close()
        raise
    return handle


# ---- global heaps: HDF5 loops forever on some corrupt ones, so they are checked before any attribute is read ----
GLOBAL_HEAP_SIGNATURE = b"GCOL"
GLOBAL_HEAP_MIN_SIZE = 4096  # H5HG_MINSIZE: a collection is never smaller
MAX_GLOBAL_HEAP_BYTES = 64 << 20  # larger "collections" are not checked (HDF5 then fails on its own)


def _check_global_heaps(path: Path, handle: h5py.File) -> None:
    """Refuse a file whose global heap collections HDF5 could not parse without looping forever.

    Variable-length strings (keras' ``name`` and ``dtype`` attributes, a legacy file's ``model_config``) live in
    global heap collections. HDF5 (up to 2.0 at least) parses a collection object by object and advances by each
    object's recorded size, so a free-space object of size 0 (a zeroed block, found by tools/fuzz_presets.py)
    or a size that wraps around makes it loop forever on the first such attribute read. Collections are found by
    their signature in the bytes that are not raw dataset data, and only header-shaped hits are checked.
    """
    size = path.stat().st_size
    datasets = (obj for _, obj in _walk(path, "HDF5", handle) if isinstance(obj, h5py.Dataset))
    raw = sorted(r for dataset in datasets for r in _raw_ranges(dataset))
    with open(path, "rb") as stream:
        cursor = 0
        for start, end in raw + [(size, size)]:
            if start > cursor:
                stream.seek(cursor)
                block = stream.read(start - cursor)
                for hit in re.finditer(GLOBAL_HEAP_SIGNATURE, block):
                    problem = _global_heap_problem(stream, cursor + hit.start(), size)
                    if problem:
                        raise WeightFileError(f"{path}: global heap collection at byte {cursor + hit.start()} is "
                                              f"corrupt ({problem}); HDF5 cannot read the file's string attributes")
            cursor = max(cursor, end)


def _raw_ranges(dataset: h5py.Dataset) -> list[tuple[int, int]]:
    """(start, end) byte ranges of a dataset's stored data (contiguous, or each chunk); [] if none or unknown."""
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        return [] if offset is None else [(offset, offset + dataset.id.get_storage_size())]
    chunks = dataset.id.get_num_chunks()
    if chunks > 100_000:  # not worth listing: those bytes are then scanned too, and only header-shaped hits count
        return []
    infos = (dataset.id.get_chunk_info(n) for n in range(chunks))
    return [(info.byte_offset, info.byte_offset + info.size) for info in infos if info.byte_offset is not None]


def _global_heap_problem(stream, offset: int, file_size: int) -> str | None:
    """Why the collection at ``offset`` would make HDF5 loop, or None (also for bytes that are no collection)."""
    stream.seek(offset)
    header = stream.read(16)  # signature, version 1, 3 reserved bytes, collection size (8 bytes, little-endian)
    total = int.from_bytes(header[8:16], "little") if len(header) == 16 else 0
    if header[4:8] != b"\x01\x00\x00\x00" or total < GLOBAL_HEAP_MIN_SIZE or total > MAX_GLOBAL_HEAP_BYTES \
            or offset + total > file_size:
        return None  # not a collection header HDF5 would parse
    body = header + stream.read(total - 16)
    position = 16
    while position < total:
        if total - position < 16:  # too small for an object header: HDF5 takes it as trailing free space
            return None
        index = int.from_bytes(body[position:position + 2], "little")
        object_size = int.from_bytes(body[position + 8:position + 16], "little")
        step = object_size if index == 0 else 16 + (object_size + 7) // 8 * 8
        if step <= 0 or position + step > total:
            return f"object {index} at +{position} has size {object_size}"
        position += step
    return None


def _open_hdf5(path: Path) -> WeightFile:
    handle = _open_h5(path)
    try:
        root_keys = set(handle.keys())
        legacy_group = _legacy_group(handle)
        if legacy_group is not None:
            entries = _legacy_entries(path, legacy_group)
            return WeightFile(path, LAYOUT_LEGACY, "variable_path", {path: handle}, entries)
        if "_layer_checkpoint_dependencies" in root_keys:
            layout = LAYOUT_KERAS213
        elif "layers" in root_keys or "vars" in root_keys:
            layout = LAYOUT_KERAS3
        else:
            raise WeightFileError(f"{path}: unknown layout: expected a keras weight file (root group 'layers', "
                                  f"'_layer_checkpoint_dependencies' or 'model_weights'); found root keys "
                                  f"{sorted(root_keys)[:10]}")
        entries, names = {}, {}
        _walk_object_paths(path, layout, handle, entries, names)
        return WeightFile(path, layout, "object_path", {path: handle}, entries, names)
    except BaseException:
        handle.close()
        raise


# ---- object-path layouts (keras3, keras 2.13, sharded) -------------------------------------------------------
def _canonical(in_file_path: str) -> str:
    """Object path with keras 2.13's ``_layer_checkpoint_dependencies`` read as ``layers`` (what keras 3 does)."""
    parts = in_file_path.strip("/").split("/")
    return "/".join("layers" if p == "_layer_checkpoint_dependencies" else p for p in parts)


def _walk_object_paths(path: Path, layout: str, handle: h5py.File, entries: dict, names: dict,
                       allowed: Callable[[str], bool] | None = None) -> None:
    """Record every dataset of ``handle`` under its canonical object path, and every ``vars`` ``name`` attribute."""
    for in_file, obj in _walk(path, layout, handle):
        key = _canonical(in_file)
        if isinstance(obj, h5py.Group):
            if key.endswith("/vars") or key == "vars":
                name = _small_attr(obj, "name")
                if name is not None:
                    names.setdefault(key[: -len("/vars")], name)
            continue
        if allowed is not None and not allowed(key):
            raise WeightFileError(f"{path} [{layout}]: entry {key!r} is in shard {path.name} but the weight map "
                                  "does not list that shard for its group")
        if key in entries:
            raise WeightFileError(f"{path} [{layout}]: entry {key!r} appears twice: in {entries[key].file}:"
                                  f"{entries[key].dataset} and in {path}:/{in_file}")
        entries[key] = EntryInfo(tuple(int(n) for n in obj.shape), stored_dtype(obj), path, "/" + in_file)


def _walk(path: Path, layout: str, group: h5py.Group, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(in-file path, object) for every group and dataset under ``group``; links other than hard links fail."""
    for name in group:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise WeightFileError(f"{path} [{layout}]: {prefix}{name} is a {type(link).__name__}; keras never "
                                  "writes links, and following them could read another file")
        obj = group[name]
        if not isinstance(obj, (h5py.Group, h5py.Dataset)):
            raise WeightFileError(f"{path} [{layout}]: {prefix}{name} is a {type(obj).__name__}; expected only "
                                  "groups and datasets (keras writes nothing else)")
        yield prefix + name, obj
        if isinstance(obj, h5py.Group):
            yield from _walk(path, layout, obj, f"{prefix}{name}/")


def _open_sharded(path: Path) -> WeightFile:
    weight_map = _read_weight_map(path)
    shard_names = sorted({name for names in weight_map.values() for name in names})
    handles, entries, names = {}, {}, {}
    try:
        for shard in shard_names:
            shard_path = path.parent / shard
            if not shard_path.is_file():
                raise WeightFileError(f"{path} [{LAYOUT_SHARDED}]: shard {shard!r} listed in the weight map is "
                                      f"missing ({shard_path})")
            handles[shard_path] = _open_h5(shard_path)

            def listed(key, shard=shard):
                return shard in weight_map.get("/" + key.rsplit("/", 1)[0], ())

            with _corrupt_file_errors(shard_path, LAYOUT_SHARDED, "read the shard's structure"):
                _walk_object_paths(shard_path, LAYOUT_SHARDED, handles[shard_path], entries, names, allowed=listed)
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    return WeightFile(path, LAYOUT_SHARDED, "object_path", handles, entries, names)


def _read_weight_map(path: Path) -> dict[str, tuple[str, ...]]:
    """``weight_map`` of a sharded-weights JSON: "/<object path>/vars" -> shard file names (validated)."""
    def fail(message):
        return WeightFileError(f"{path} [{LAYOUT_SHARDED}]: {message}")

    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise fail(f"weight map is {size} bytes, expected at most {MAX_JSON_BYTES}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: JSON errors, huge integers
        raise fail(f"not valid JSON: {type(error).__name__}: {error}") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        raise fail("expected a JSON object with a 'weight_map' object (keras ShardedH5IOStore)")
    out = {}
    for group, names in weight_map.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise fail(f"weight_map[{group!r}] must be a shard file name or a non-empty list of them, "
                       f"found {names!r}")
        for name in names:
            if Path(name).name != name or name in (".", "..") or "\\" in name:
                raise fail(f"weight_map[{group!r}] names {name!r}; shards must be plain file names next to the map")
        out["/" + _canonical(group)] = tuple(names)
    return out


# ---- legacy keras-2 .h5 (variable paths) -----------------------------------------------------------------------
def _legacy_group(handle: h5py.File) -> h5py.Group | None:
    """The group holding ``layer_names``: ``model_weights`` of a full-model file, or the root of a weights file."""
    for group in (handle.get("model_weights"), handle):
        if isinstance(group, h5py.Group) and ("layer_names" in group.attrs or "layer_names0" in group.attrs):
            return group
    if "model_weights" in handle:
        raise WeightFileError(f"{handle.filename} [{LAYOUT_LEGACY}]: 'model_weights' has no 'layer_names' attribute")
    return None


def _name_list(path: Path, group: h5py.Group, name: str) -> list[str]:
    """A list-of-names attribute, joined from its chunks ``name0``, ``name1``, ... if keras split it."""
    chunks = [name] if name in group.attrs else []
    while f"{name}{len(chunks)}" in group.attrs and name not in group.attrs:
        chunks.append(f"{name}{len(chunks)}")
    out = []
    for chunk in chunks:
        if _attr_bytes(group, chunk) > MAX_ATTR_BYTES:
            raise WeightFileError(f"{path} [{LAYOUT_LEGACY}]: attribute {group.name}@{chunk} is larger than "
                                  f"{MAX_ATTR_BYTES} bytes")
        values = np.asarray(group.attrs[chunk])
        if values.size and values.dtype.kind not in "SUO":
            raise WeightFileError(f"{path} [{LAYOUT_LEGACY}]: attribute {group.name}@{chunk} holds "
                                  f"{values.dtype}, expected names")
        out += [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]
    return out


def _legacy_entries(path: Path, group: h5py.Group) -> dict[str, EntryInfo]:
    """Entries keyed by variable path (``:0`` stripped); datasets no layer lists come out as "(unlisted) ..."."""
    entries, listed = {}, set()
    for layer in _name_list(path, group, "layer_names"):
        layer_group = group.get(layer)
        if not isinstance(layer_group, h5py.Group):
            raise WeightFileError(f"{path} [{LAYOUT_LEGACY}]: layer_names lists {layer!r} but there is no such group")
        for weight in _name_list(path, layer_group, "weight_names"):
            dataset = layer_group.get(weight)
            if not isinstance(dataset, h5py.Dataset):
                raise WeightFileError(f"{path} [{LAYOUT_LEGACY}]: layer {layer!r} lists weight {weight!r} but "
                                      f"{layer_group.name}/{weight} is not a dataset")
            key = re.sub(r":\d+$", "", weight)
            if key in entries:
                raise WeightFileError(f"{path} [{LAYOUT_LEGACY}]: weight {key!r} is listed twice "
                                      f"({entries[key].dataset} and {dataset.name})")
            entries[key] = EntryInfo(tuple(int(n) for n in dataset.shape), stored_dtype(dataset), path, dataset.name)
            listed.add(dataset.name)
    for in_group, obj in _walk(path, LAYOUT_LEGACY, group):
        if isinstance(obj, h5py.Dataset) and obj.name not in listed:
            entries[f"(unlisted) {in_group}"] = EntryInfo(tuple(obj.shape), stored_dtype(obj), path, obj.name)
    return entries


# ---- checking a file against a config ----------------------------------------------------------------------
def check_weight_file(weights: WeightFile, config: PaliGemmaConfig) -> dict[str, ExpectedEntry]:
    """Check every entry's presence, shape, dtype and storage against ``config``; read no data.

    Returns:
        params field ("blocks[1].wq", ...) -> ExpectedEntry, for reading.
    Raises:
        WeightFileError listing every problem: missing, unused, misshaped, non-float or never-written entries.
    """
    count = expected_entry_count(config)
    if count > MAX_EXPECTED_PER_ENTRY * len(weights.entries) + MAX_EXPECTED_SLACK:
        raise weights.error(f"the config asks for {count} weights (num_layers={config.num_layers}, vit_num_layers="
                            f"{config.vit_num_layers}) but the file holds {len(weights.entries)} entries; does the "
                            "config match the file?")
    expected = expected_entries(config, weights.naming)
    problems = [_problem(weights, key, exp) for key, exp in expected.items()]
    problems = [p for p in problems if p]
    for key in sorted(weights.entries.keys() - expected.keys()):
        info = weights.entries[key]
        problems.append(f"unexpected entry {key!r} at {info.file}:{info.dataset}: shape {info.shape}, {info.dtype}; "
                        "no params field uses it")
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN] + [f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more"] * (
            len(problems) > MAX_PROBLEMS_SHOWN)
        raise weights.error(f"{len(problems)} problem(s) loading a PaliGemma backbone (num_layers="
                            f"{config.num_layers}, vit_num_layers={config.vit_num_layers}, use_post_attention_norm="
                            f"{config.use_post_attention_norm}, use_post_ffw_norm={config.use_post_ffw_norm}); does "
                            "the config match the file?\n  - " + "\n  - ".join(shown))
    return {exp.field: exp for exp in expected.values()}


def _problem(weights: WeightFile, key: str, exp: ExpectedEntry) -> str | None:
    """What is wrong with one expected entry, or None."""
    info = weights.entries.get(key)
    where = f"entry {key!r} (params {exp.field})"
    if info is None:
        return f"missing {where}: expected shape {exp.shape}, float; not in the file"
    where += f" at {info.file}:{info.dataset}"
    if info.shape != exp.shape:
        return f"wrong shape for {where}: expected {exp.shape}, found {info.shape}"
    if info.dtype not in FLOAT_DTYPES:
        return f"wrong dtype for {where}: expected one of {FLOAT_DTYPES}, found {info.dtype}"
    storage = _storage_problem(weights, key)
    if storage:
        return f"{where} {storage}"
    recorded = weights.recorded_layer_names(key) if weights.naming == "object_path" else []
    layers = exp.schema.variable_path.replace("{i}", str(exp.index)).replace("{j}", str(exp.index)).split("/")[:-1]
    if len(recorded) >= len(layers) and recorded[-len(layers):] != layers:
        return (f"layer names recorded along {where} are {recorded}; expected them to end with {layers} (the "
                "object path does not hold the layer the schema says it does)")
    return None


def _storage_problem(weights: WeightFile, key: str) -> str | None:
    """Why the stored data of ``key`` cannot be read as declared (unwritten, a decompression bomb, corrupt)."""
    try:
        if not weights.is_fully_written(key):
            return f"declares shape {weights.entries[key].shape} but its data was never (fully) written"
        dataset = weights.dataset(key)
        if dataset.id.get_create_plist().get_nfilters():
            stored, declared = dataset.id.get_storage_size(), dataset.size * dataset.dtype.itemsize
            if declared > MAX_EXPANSION * stored + (1 << 20):
                return (f"holds {stored} bytes of filtered (compressed) data that would expand to {declared} bytes, "
                        f"more than {MAX_EXPANSION}x; refusing a possible decompression bomb")
    except H5_ERRORS as error:
        return f"cannot be inspected ({type(error).__name__}: {error}); the file is corrupt"
    return None


# ---- loading -------------------------------------------------------------------------------------------------
def load_params(path, config: PaliGemmaConfig, policy: Policy, *, mmap: bool = False) -> PaliGemmaParams:
    """Read a keras weight file into params, strictly.

    Args:
        path: a preset directory, a ``.weights.h5``, a sharded ``model.weights.json`` or a legacy ``.h5`` file.
        config: the backbone configuration the file must match exactly.
        policy: arrays come out in ``policy.dtype``; bf16 policies round as ``rounds_to_bfloat16`` says.
        mmap: map entries whose stored bytes already are the params array (see ``_mapped``) read-only into memory
            instead of reading them: loading is then nearly free and only the pages used become resident (the
            token table: the gathered rows). The file must not be modified in place while the params live.
    Returns:
        PaliGemmaParams in the layout of ``refimpl.params``.
    Raises:
        WeightFileError: the file is unreadable or does not match ``config``; the message lists every problem.
    """
    with open_weight_file(path) as weights:
        plan = check_weight_file(weights, config)
        vit = _read_vit(weights, plan, config, policy, mmap)
        token_embedding = _read(weights, plan["token_embedding"], policy, mmap)
        blocks = tuple(_iter_blocks(weights, plan, config, policy, mmap))
        final_norm = _read(weights, plan["final_norm"], policy, mmap)
    return PaliGemmaParams(vit=vit, token_embedding=token_embedding, blocks=blocks, final_norm=final_norm)


def iter_decoder_blocks(weights: WeightFile, config: PaliGemmaConfig, policy: Policy) -> Iterator[DecoderBlockParams]:
    """Decoder blocks one at a time from an open weight file, for streaming; the whole file is checked first."""
    plan = check_weight_file(weights, config)
    yield from _iter_blocks(weights, plan, config, policy)


def _iter_blocks(weights, plan, config, policy, mmap: bool = False) -> Iterator[DecoderBlockParams]:
    for i in range(config.num_layers):
        yield DecoderBlockParams(**_read_group(weights, plan, "decoder_block", i, policy, mmap=mmap))


# ---- streaming: params that stay in the file until the forward pass needs them ---------------------------------
class StreamedBlocks(collections.abc.Sequence):
    """A read-only sequence of per-block params read from the open weight file on every access.

    ``params.blocks[i]`` (or iterating) reads block i, so a forward pass holds at most the block it runs plus the
    one the loop variable still names; nothing is cached.
    """

    def __init__(self, read_block: Callable[[int], object], count: int, what: str):
        self._read_block, self._count, self._what = read_block, count, what

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"{self._what} index must be an integer, found {type(index).__name__}")
        if not -self._count <= index < self._count:
            raise IndexError(f"{self._what} index {index} out of range for {self._count} blocks")
        return self._read_block(int(index) % self._count)

    def __repr__(self) -> str:
        return f"StreamedBlocks({self._count} {self._what}, read from the weight file on access)"


class StreamedTable:
    """The token embedding f[V, D] left in the weight file (``stream_params``): never resident as a whole.

    Indexing with integer ids gathers just those rows (the input embedding); ``row_slabs`` walks the table a
    slab of rows at a time (the tied LM head). Values equal what ``load_params`` puts in those rows: the same
    decode and bf16 rounding, applied to the same stored numbers.
    """

    def __init__(self, weights: WeightFile, exp: ExpectedEntry, policy: Policy):
        self._weights, self._exp, self._policy = weights, exp, policy
        self._round = rounds_to_bfloat16(exp.schema, policy)
        self.shape = exp.shape  # (V, D); the schema row is AS_IS
        self.dtype = policy.dtype
        self.ndim = 2

    def _rows(self, index) -> np.ndarray:  # f[len(index) or slice length, D], rows in the compute dtype
        info = self._weights.entries[self._exp.key]
        dataset = self._weights.dataset(self._exp.key)  # raises if the file was closed
        try:
            raw = dataset[index]
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
            raise self._weights.error(f"cannot read rows of entry {self._exp.key!r} ({info.dtype}, shape "
                                      f"{info.shape}): {error}; the file is truncated or corrupt") from None
        out = np.empty(raw.shape, dtype=self.dtype)
        out[...] = _decode(raw, info.dtype, self._round)
        return out

    def __getitem__(self, token_ids) -> np.ndarray:
        """Rows f[..., D] for integer ids of any shape, read from the file (each distinct row once)."""
        ids = np.asarray(token_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token embedding: ids must be integers, found dtype {ids.dtype}")
        vocabulary = self.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocabulary):
            raise IndexError(f"token embedding: ids must be in [0, {vocabulary}), found [{ids.min()}, {ids.max()}]")
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        rows = self._rows(unique.tolist()) if unique.size else np.empty((0, self.shape[1]), self.dtype)
        return rows[inverse].reshape(ids.shape + (self.shape[1],))

    def row_slabs(self, rows_per_slab: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """(row range, rows f[R, D]) covering the table in order, at most ``CHUNK_ELEMENTS`` values per slab."""
        step = rows_per_slab or max(1, CHUNK_ELEMENTS // self.shape[1])
        for start in range(0, self.shape[0], step):
            rows = slice(start, min(start + step, self.shape[0]))
            yield rows, self._rows(rows)

    def __repr__(self) -> str:
        return f"StreamedTable({self._exp.key!r}, shape {self.shape}, {self.dtype}, read from the weight file)"


def stream_params(weights: WeightFile, config: PaliGemmaConfig, policy: Policy, *, mmap: bool = False
                  ) -> PaliGemmaParams:
    """Params whose big parts stay in the open ``weights`` file until used (``from_preset(..., stream=True)``).

    The whole file is checked against ``config`` first, as by ``load_params``. Resident at once: the ViT's patch,
    position and projector weights and the final norm. ViT and decoder blocks are ``StreamedBlocks`` (read when
    the forward pass reaches them), the token embedding a ``StreamedTable`` (only the rows gathered). Each forward
    pass reads the blocks again, trading file reads for memory: float64 oracle mode of the 3B model fits in a few
    GB instead of 23. ``weights`` must stay open while the params are used. ``mmap`` maps what ``load_params``
    would map instead of reading it, block by block, and maps the token table whole when it can (its pages
    become resident only where used).
    """
    plan = check_weight_file(weights, config)
    vit_blocks = StreamedBlocks(
        lambda j: VitBlockParams(**_read_group(weights, plan, "vit_block", j, policy, mmap=mmap)),
        config.vit_num_layers, "ViT encoder block")
    top = _read_group(weights, plan, "model", None, policy, prefix="vit.", mmap=mmap)
    vit = VitParams(blocks=vit_blocks, **top)
    blocks = StreamedBlocks(
        lambda i: DecoderBlockParams(**_read_group(weights, plan, "decoder_block", i, policy, mmap=mmap)),
        config.num_layers, "decoder block")
    table = _mapped(weights, plan["token_embedding"], policy) if mmap else None
    if table is None:
        table = StreamedTable(weights, plan["token_embedding"], policy)
    return PaliGemmaParams(vit=vit, token_embedding=table, blocks=blocks,
                           final_norm=_read(weights, plan["final_norm"], policy, mmap))


def _read_vit(weights, plan, config, policy, mmap: bool = False) -> VitParams:
    blocks = tuple(VitBlockParams(**_read_group(weights, plan, "vit_block", j, policy, mmap=mmap))
                   for j in range(config.vit_num_layers))
    top = _read_group(weights, plan, "model", None, policy, prefix="vit.", mmap=mmap)
    return VitParams(blocks=blocks, **top)


def _read_group(weights, plan, scope: str, index: int | None, policy, prefix: str = "",
                mmap: bool = False) -> dict[str, np.ndarray]:
    """attribute -> array for every planned entry of one block (or of the ViT's top level)."""
    return {exp.attribute: _read(weights, exp, policy, mmap) for exp in plan.values()
            if exp.schema.scope == scope and exp.index == index and exp.field.startswith(prefix)}


def _read(weights: WeightFile, exp: ExpectedEntry, policy: Policy, mmap: bool = False) -> np.ndarray:
    """Allocate the params array once and fill it through a view in the stored layout (or map it, if asked and
    possible)."""
    mapped = _mapped(weights, exp, policy) if mmap else None
    if mapped is not None:
        return mapped
    out = np.empty(exp.schema.relayout.params_shape(exp.shape), dtype=policy.dtype)
    view = exp.schema.relayout.stored_view(out, exp.shape)
    weights.read_into(exp.key, view, round_bf16=rounds_to_bfloat16(exp.schema, policy))
    return out


def _mapped(weights: WeightFile, exp: ExpectedEntry, policy: Policy) -> np.ndarray | None:
    """A read-only memory map of the entry, or None when its stored bytes are not exactly the params array.

    Mappable: no re-layout, no bf16 rounding, the stored dtype is the compute dtype in native byte order, and
    HDF5 keeps the data in one contiguous, unfiltered run inside the file (keras' writer does, for every variable).
    The map is a plain ndarray view (read-only), so nothing downstream can tell it from a read array.
    """
    if exp.schema.relayout is not AS_IS or rounds_to_bfloat16(exp.schema, policy):
        return None
    info = weights.entries[exp.key]
    dataset = weights.dataset(exp.key)
    plist = dataset.id.get_create_plist()
    if (dataset.dtype != policy.dtype or plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters()
            or plist.get_external_count()):
        return None
    offset = dataset.id.get_offset()
    nbytes = math.prod(info.shape) * policy.dtype.itemsize
    if offset is None or offset + nbytes > info.file.stat().st_size:
        return None  # never written, or a truncated file: let the reader raise its error
    if nbytes == 0:
        return None
    return np.memmap(info.file, dtype=policy.dtype, mode="r", offset=offset, shape=info.shape).view(np.ndarray)


MAX_MODEL_CONFIG_BYTES = 1 << 20  # a PaliGemma backbone's model_config is about 1 KB


def read_legacy_model_config(path) -> dict:
    """The JSON ``model_config`` attribute of a legacy Keras full-model ``.h5`` file, size-checked before reading."""
    path = Path(path)
    with _open_h5(path) as handle:
        if "model_config" not in handle.attrs:
            raise WeightFileError(f"{path}: no 'model_config' attribute; expected a Keras full-model .h5 file "
                                  "(written by model.save('x.h5')); for a weights-only file pass the preset directory")
        size = _attr_bytes(handle, "model_config")
        if size > MAX_MODEL_CONFIG_BYTES:
            raise WeightFileError(f"{path}: 'model_config' is {size} bytes; expected at most {MAX_MODEL_CONFIG_BYTES}")
        with _corrupt_file_errors(path, LAYOUT_LEGACY, "read the 'model_config' attribute"):
            raw = handle.attrs["model_config"]
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # ValueError: JSON errors, integers too long to convert
        raise WeightFileError(f"{path}: 'model_config' is not valid JSON ({type(error).__name__}: {error})") from None
