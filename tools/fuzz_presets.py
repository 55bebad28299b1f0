"""Fuzz refimpl's preset loading (config reader + weight reader) with mutations of the real presets in golden/.

    python -m tools.fuzz_presets --mutations 5000 [--seed 0] [--workers 2] [--json report.json]

Each mutation copies one golden preset (keras-hub wrote them: plain, sharded, bf16, legacy .h5), damages it in
one way, and loads it with ``PaliGemmaBackbone.from_preset`` (float32, or bfloat16 to exercise the rounding
reader) in a worker process with an address-space limit, watching its peak memory, under a wall-clock timeout:

    bytes   flip bits anywhere / in HDF5 metadata / inside raw float data, truncate, zero or garble a block,
            append garbage, delete a shard
    hdf5    delete, add, reshape, retype, or unwrite a dataset; absurd declared shapes; NaN/inf data; attributes
            (bf16 tags, layer names, legacy layer_names/weight_names); groups for datasets; soft/external links;
            renamed groups; compressed or chunked copies of the same values
    json    config.json (or the legacy model_config attribute) and the sharded weight map: malformed text,
            wrong types, absurd or missing values, unknown keys, classes outside the allowlist, deep nesting,
            huge numbers, non-UTF-8, path traversal in shard names

What "handled" means, per outcome:

    rejected           an allowed error (ValueError and its subclasses WeightFileError, ConfigError) whose message
                       names the preset's files                                                      handled
    loaded_same        loads to exactly the pristine arrays (the mutation touched unused bytes or
                       metadata, or re-encoded the same values)                                       handled
    loaded_config      loads the pristine arrays under a different but valid config (e.g. another
                       epsilon or window): the file says so, and nothing checks numbers it does not hold  handled
    loaded_changed     loads finite arrays of the pristine shapes with other values: a bit flip
                       inside float data is a valid file with other weights (HDF5 stores no checksums
                       unless written with fletcher32; keras never does)                              handled
    flagged_nonfinite  as loaded_changed but some weight is inf or NaN (a flip in an exponent, or
                       NaN written on purpose); flagged, as keras would load it too                   handled
    unclear_error      an allowed error type whose message does not name the preset's files          FAILURE
    crash              any other exception                                                            FAILURE
    hang               no answer within --timeout seconds                                             FAILURE
    memory             MemoryError, or a load that raised the worker's peak RSS by more than
                       --max-alloc-mb (the presets are under 1 MB: loading one needs a few MB)       FAILURE
    wrong_shapes       loaded arrays whose shapes differ from the pristine ones                        FAILURE

Exit code 0 if every mutation was handled, 1 otherwise; the report lists every failure with the mutation that
reproduces it (``--case C --kind K --mutation-seed S``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
HANDLED = ("rejected", "loaded_same", "loaded_config", "loaded_changed", "flagged_nonfinite")
FAILURES = ("unclear_error", "crash", "hang", "memory", "wrong_shapes")


# ---- mutations -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    case: str  # golden case name
    kind: str  # a key of MUTATIONS
    seed: int  # seeds every random choice of the mutation


@dataclass
class Outcome:
    mutation: Mutation
    status: str
    detail: str = ""  # what the mutation did, then the error or the load summary
    seconds: float = 0.0


@dataclass
class Preset:
    """A copied preset: its directory, the path to load, and its files by role."""

    root: Path  # the copied preset directory
    load_path: Path  # what from_preset gets (the directory, or model.h5 for the legacy case)
    h5_files: list[Path]  # weight files (shards, model.weights.h5 or model.h5)
    json_files: list[Path]  # config.json (unless legacy) and model.weights.json
    legacy: bool


def _pick_dataset(handle, rng: random.Random):
    import h5py

    names = []
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return rng.choice(sorted(names)) if names else None


def _pick_group(handle, rng: random.Random) -> str:
    import h5py

    names = ["/"]
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Group) else None)
    return rng.choice(sorted(names))


def _flip_bits(path: Path, rng: random.Random, regions: list[tuple[int, int]] | None = None) -> str:
    data = bytearray(path.read_bytes())
    flips = []
    for _ in range(rng.randint(1, 8)):
        if regions:
            start, end = rng.choice(regions)
            offset = rng.randrange(start, min(end, len(data)))
        else:
            offset = rng.randrange(len(data))
        bit = rng.randrange(8)
        data[offset] ^= 1 << bit
        flips.append(f"{offset}:{bit}")
    path.write_bytes(bytes(data))
    return f"{path.name}: flipped bits {', '.join(flips)}"


def _data_regions(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of contiguous raw dataset data in an HDF5 file."""
    import h5py

    regions = []
    with h5py.File(path, "r") as handle:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks is None and obj.id.get_offset() is not None:
                size = obj.id.get_storage_size()
                if size:
                    regions.append((obj.id.get_offset(), obj.id.get_offset() + size))
        handle.visititems(visit)
    return sorted(regions)


def _meta_regions(path: Path) -> list[tuple[int, int]]:
    """Byte ranges that are not raw dataset data: superblock, object headers, B-trees, heaps, attributes."""
    regions, cursor = [], 0
    for start, end in _data_regions(path) + [(path.stat().st_size, path.stat().st_size)]:
        if start > cursor:
            regions.append((cursor, start))
        cursor = max(cursor, end)
    return regions


def m_flip_any(p: Preset, rng: random.Random) -> str:
    return _flip_bits(rng.choice(p.h5_files + p.json_files), rng)


def m_flip_meta(p: Preset, rng: random.Random) -> str:
    path = rng.choice(p.h5_files)
    return _flip_bits(path, rng, _meta_regions(path))


def m_flip_data(p: Preset, rng: random.Random) -> str:
    path = rng.choice(p.h5_files)
    return _flip_bits(path, rng, _data_regions(path) or None)


def m_truncate(p: Preset, rng: random.Random) -> str:
    path = rng.choice(p.h5_files + p.json_files)
    size = path.stat().st_size
    keep = rng.choice([0, 1, 7, 8, 96, 512, 2048, size // 2, size - 1, size - 512, rng.randrange(size)])
    keep = max(0, min(size - 1, keep))
    with open(path, "r+b") as stream:
        stream.truncate(keep)
    return f"{path.name}: truncated to {keep} of {size} bytes"


def m_overwrite_block(p: Preset, rng: random.Random) -> str:
    path = rng.choice(p.h5_files)
    data = bytearray(path.read_bytes())
    length = rng.choice([1, 8, 64, 512, 4096])
    start = rng.randrange(max(1, len(data) - length))
    fill = bytes(length) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(length))
    data[start:start + length] = fill[: len(data) - start]
    path.write_bytes(bytes(data))
    return f"{path.name}: overwrote {length} bytes at {start} with {'zeros' if not any(fill) else 'garbage'}"


def m_append(p: Preset, rng: random.Random) -> str:
    path = rng.choice(p.h5_files + p.json_files)
    with open(path, "ab") as stream:
        stream.write(bytes(rng.randrange(256) for _ in range(rng.choice([1, 100, 5000]))))
    return f"{path.name}: appended garbage"


def m_delete_file(p: Preset, rng: random.Random) -> str:
    """Delete a weight file inside the preset (a shard, or model.weights.h5); never the path being loaded."""
    candidates = [path for path in p.h5_files if path != p.load_path]
    if not candidates:
        return m_truncate(p, rng)
    path = rng.choice(candidates)
    path.unlink()
    return f"deleted {path.name}"


def _h5(p: Preset, rng: random.Random):
    import h5py

    path = rng.choice(p.h5_files)
    return path, h5py.File(path, "r+")


def m_h5_delete(p: Preset, rng: random.Random) -> str:
    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        if name is None:
            return "no dataset to delete"
        del handle[name]
    return f"{path.name}: deleted dataset {name}"


def m_h5_add(p: Preset, rng: random.Random) -> str:
    import numpy as np

    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        parent = name.rsplit("/", 1)[0] if name and rng.random() < 0.7 else _pick_group(handle, rng)
        new = f"{parent.rstrip('/')}/{rng.choice(['9', '2', 'extra', 'vars/0', '1'])}".lstrip("/")
        if new in handle:
            new += "_x"
        handle.create_dataset(new, data=np.ones(rng.choice([(3,), (2, 2), ()]), np.float32))
    return f"{path.name}: added dataset {new}"


def _replace(handle, name: str, **create) -> None:
    attrs = dict(handle[name].attrs)
    del handle[name]
    dataset = handle.create_dataset(name, **create)
    for key, value in attrs.items():
        dataset.attrs[key] = value


def m_h5_reshape(p: Preset, rng: random.Random) -> str:
    import numpy as np

    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        if name is None:
            return "no dataset"
        shape, dtype = handle[name].shape, handle[name].dtype
        choice = rng.choice(["grow", "shrink", "extra_axis", "drop_axis", "scalar", "empty"])
        if choice == "grow" and shape:
            shape = tuple(n + (i == 0) for i, n in enumerate(shape))
        elif choice == "shrink" and shape and shape[-1] > 1:
            shape = shape[:-1] + (shape[-1] - 1,)
        elif choice == "extra_axis":
            shape = (1,) + tuple(shape)
        elif choice == "drop_axis" and len(shape) > 1:
            shape = (math.prod(shape),)
        elif choice == "scalar":
            shape = ()
        else:
            shape = (0,) + tuple(shape[1:])
        _replace(handle, name, data=np.zeros(shape, dtype))
    return f"{path.name}: {name} reshaped to {shape} ({choice})"


def m_h5_absurd_shape(p: Preset, rng: random.Random) -> str:
    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        if name is None:
            return "no dataset"
        shape = rng.choice([(2**40, 2**20), (2**31, 40), (2**62,), (97, 2**30)])
        _replace(handle, name, shape=shape, dtype=handle[name].dtype if handle[name].dtype.kind == "f" else "f4",
                 chunks=tuple(1 for _ in shape[:-1]) + (min(shape[-1], 1024),))
    return f"{path.name}: {name} declared {shape}, never written"


def m_h5_retype(p: Preset, rng: random.Random) -> str:
    import numpy as np

    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        if name is None:
            return "no dataset"
        old = handle[name][()]
        shape = np.shape(old)
        kind = rng.choice(["int8", "int32", "uint16", "float16", "float64", "bool", "complex64", "string",
                           "compound", "V2", "V2-tagged", "V4", "V2-float16-tag", "bf16-tag-on-float32"])
        if kind == "string":
            data = np.full(shape, b"ab")
        elif kind == "compound":
            data = np.zeros(shape, [("a", "f4"), ("b", "f4")])
        elif kind in ("V2", "V2-tagged", "V2-float16-tag"):
            data = np.zeros(shape, "<u2").view("V2")
        elif kind == "V4":
            data = np.zeros(shape, "<u4").view("V4")
        elif kind == "bf16-tag-on-float32":
            data = np.asarray(old, np.float32)
        else:
            with np.errstate(all="ignore"):
                data = np.asarray(old).astype(kind) if np.asarray(old).dtype.kind in "fiub" else np.zeros(shape, kind)
        attrs = {k: v for k, v in handle[name].attrs.items() if k != "dtype"}
        del handle[name]
        dataset = handle.create_dataset(name, data=data)
        dataset.attrs.update(attrs)
        if kind in ("V2-tagged", "bf16-tag-on-float32"):
            dataset.attrs["dtype"] = "bfloat16"
        elif kind == "V2-float16-tag":
            dataset.attrs["dtype"] = "float16"
    return f"{path.name}: {name} rewritten as {kind}"


def m_h5_values(p: Preset, rng: random.Random) -> str:
    import numpy as np

    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        if name is None or handle[name].dtype.kind != "f" or not handle[name].size:
            return f"{path.name}: {name} left alone (not float data)"
        data = handle[name][()]
        value = rng.choice([np.nan, np.inf, -np.inf, 1e38, 0.0])
        np.asarray(data).flat[rng.randrange(np.size(data))] = value
        handle[name][...] = data
    return f"{path.name}: wrote {value} into {name}"


def m_h5_storage(p: Preset, rng: random.Random) -> str:
    """Same values, other storage: chunked, compressed, with fletcher32, or declared but unwritten/partly written."""
    import numpy as np

    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        if name is None or not handle[name].shape:
            return "no non-scalar dataset"
        data, dataset = handle[name][()], handle[name]
        kind = rng.choice(["chunked", "gzip", "lzf", "fletcher32", "unwritten", "partial", "fillvalue"])
        chunks = tuple(max(1, n // 2) for n in dataset.shape)
        if kind == "chunked":
            _replace(handle, name, data=data, chunks=chunks)
        elif kind in ("gzip", "lzf"):
            _replace(handle, name, data=data, chunks=chunks, compression=kind)
        elif kind == "fletcher32":
            _replace(handle, name, data=data, chunks=chunks, fletcher32=True)
        elif kind == "unwritten":
            _replace(handle, name, shape=dataset.shape, dtype=dataset.dtype)
        elif kind == "fillvalue":
            _replace(handle, name, shape=dataset.shape, dtype=dataset.dtype, fillvalue=np.zeros((), dataset.dtype)
                     if dataset.dtype.kind == "f" else None)
        else:
            _replace(handle, name, shape=dataset.shape, dtype=dataset.dtype, chunks=chunks)
            handle[name][(slice(0, chunks[0]),)] = data[: chunks[0]]
    return f"{path.name}: {name} stored {kind}"


def m_h5_attr(p: Preset, rng: random.Random) -> str:
    import numpy as np

    path, handle = _h5(p, rng)
    with handle:
        if p.legacy and rng.random() < 0.6:
            return _legacy_attr(handle, rng, path)
        target = rng.choice([_pick_dataset(handle, rng) or "/", _pick_group(handle, rng)])
        key = rng.choice(["dtype", "name", "name", "other"])
        value = rng.choice(["bfloat16", "float8_e4m3fn", "", "x" * 100_000, 7, np.arange(3), b"\xff\xfe",
                            "decoder_block_9", "query", np.array([], "S1")])
        handle[target].attrs[key] = value
    return f"{path.name}: attribute {target}@{key} = {str(value)[:40]!r}"


def _legacy_attr(handle, rng: random.Random, path: Path) -> str:
    import numpy as np

    group = handle["model_weights"] if "model_weights" in handle else handle
    if rng.random() < 0.5 or "layer_names" not in group.attrs:
        layer = rng.choice([k for k in group.keys()] or ["/"])
        target, key = group[layer], "weight_names"
    else:
        target, key = group, "layer_names"
    names = list(np.asarray(target.attrs.get(key, np.array([], "S1"))).reshape(-1))
    how = rng.choice(["drop", "duplicate", "rename", "numbers", "empty", "huge"])
    if how == "drop" and names:
        names.pop(rng.randrange(len(names)))
    elif how == "duplicate" and names:
        names.append(rng.choice(names))
    elif how == "rename" and names:
        names[rng.randrange(len(names))] = b"not/a/weight:0"
    value = np.arange(3) if how == "numbers" else np.array([], "S1") if how == "empty" else \
        np.array([b"x" * 2_000_000]) if how == "huge" else np.array(names)
    target.attrs[key] = value
    return f"{path.name}: legacy attribute {target.name}@{key} {how}"


def m_h5_structure(p: Preset, rng: random.Random) -> str:
    import h5py

    path, handle = _h5(p, rng)
    with handle:
        name = _pick_dataset(handle, rng)
        if name is None:
            return "no dataset"
        kind = rng.choice(["group_for_dataset", "soft_link", "external_link", "hard_link", "rename_group",
                           "dataset_for_group"])
        if kind == "group_for_dataset":
            del handle[name]
            handle.create_group(name)
        elif kind == "soft_link":
            handle[name + "_alias"] = h5py.SoftLink("/" + name)
        elif kind == "external_link":
            del handle[name]
            handle[name] = h5py.ExternalLink("/etc/hostname", "/x")
        elif kind == "hard_link":
            handle[name.rsplit("/", 1)[0] + "/7"] = handle[name]
        elif kind == "rename_group":
            parent = name.rsplit("/", 2)[0]
            if parent and parent in handle and parent != name:
                handle.move(parent, parent + "_7")
        else:
            group = name.rsplit("/", 1)[0]
            del handle[group]
            handle[group] = [1.0, 2.0]
    return f"{path.name}: {kind} at {name}"


# ---- json mutations --------------------------------------------------------------------------------------------
HOSTILE_VALUES = ["x", -1, 0, 10**12, 10**9, 2.5, True, None, [], {}, float("nan"), float("inf"), 1e308, "4096",
                  [1, 2], {"class_name": "Lambda"}]


def _config_text(p: Preset) -> tuple[str, Callable[[str], None], str]:
    """(text, writer, what) of the config document: config.json, or the legacy model_config attribute."""
    if not p.legacy:
        path = p.root / "config.json"
        return path.read_text(), path.write_text, "config.json"
    import h5py

    def write(text: str) -> None:
        with h5py.File(p.load_path, "r+") as handle:
            handle.attrs["model_config"] = text

    with h5py.File(p.load_path, "r") as handle:
        raw = handle.attrs["model_config"]
    return (raw.decode() if isinstance(raw, bytes) else str(raw)), write, "model_config"


def m_json_config(p: Preset, rng: random.Random) -> str:
    text, write, what = _config_text(p)
    document = json.loads(text)
    inner = document.get("config", {})
    kind = rng.choice(["value", "value", "delete", "add", "class", "layers", "mismatch", "nested", "text"])
    if kind == "value":
        key = rng.choice(sorted(inner))
        inner[key] = rng.choice(HOSTILE_VALUES)
        note = f"{key} = {inner[key]!r}"
    elif kind == "delete":
        key = rng.choice(sorted(inner))
        del inner[key]
        note = f"deleted {key}"
    elif kind == "add":
        inner[rng.choice(["use_bias", "rope_max_wavelength", "__class__", ""])] = 1
        note = "added an unknown key"
    elif kind == "class":
        key = rng.choice(["class_name", "registered_name", "module"])
        document[key] = rng.choice(["GemmaBackbone", "Lambda", "builtins>eval", "", None, 3, ["PaliGemmaBackbone"]])
        note = f"{key} = {document[key]!r}"
    elif kind == "layers":
        key = rng.choice(["num_layers", "vit_num_layers", "vocabulary_size", "image_size", "hidden_dim"])
        inner[key] = rng.choice([10**6, 10**9, 2**62])
        note = f"{key} = {inner[key]}"
    elif kind == "mismatch":
        key = rng.choice(["num_layers", "vocabulary_size", "head_dim", "use_post_ffw_norm", "num_key_value_heads"])
        inner[key] = (not inner[key]) if isinstance(inner.get(key), bool) else inner.get(key, 1) + 2
        note = f"{key} = {inner[key]}"
    elif kind == "nested":
        write('{"class_name": "PaliGemmaBackbone", "config": ' + "[" * 100_000 + "]" * 100_000 + "}")
        return f"{what}: 100000-deep nesting"
    else:
        write(rng.choice(["", "null", "[]", '"PaliGemmaBackbone"', "{", text[: len(text) // 2], "1" * 5000,
                          '{"config": ' + "9" * 50_000 + "}", "\ufeff" + text, text.replace('"', "'"),
                          "NaN"]))
        return f"{what}: replaced by malformed text"
    document["config"] = inner
    write(json.dumps(document))
    return f"{what}: {kind}: {note}"


def m_json_bytes(p: Preset, rng: random.Random) -> str:
    if p.legacy:
        return m_json_config(p, rng)
    path = rng.choice(p.json_files)
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice([0x00, 0xFF, 0x22, 0x7B, 0x5D, 0xC3, 0x30 + rng.randrange(10)])
    path.write_bytes(bytes(data))
    return f"{path.name}: replaced bytes"


def m_json_weight_map(p: Preset, rng: random.Random) -> str:
    path = p.root / "model.weights.json"
    if not path.is_file():
        return m_json_config(p, rng)
    document = json.loads(path.read_text())
    weight_map = document["weight_map"]
    key = rng.choice(sorted(weight_map))
    kind = rng.choice(["traversal", "missing", "empty", "type", "drop_group", "map_type", "absolute"])
    if kind == "traversal":
        weight_map[key] = ["../../../etc/passwd"]
    elif kind == "absolute":
        weight_map[key] = "/etc/hostname"
    elif kind == "missing":
        weight_map[key] = ["model_00099.weights.h5"]
    elif kind == "empty":
        weight_map[key] = []
    elif kind == "type":
        weight_map[key] = rng.choice([3, None, {"a": 1}, [1]])
    elif kind == "drop_group":
        del weight_map[key]
    else:
        document["weight_map"] = rng.choice([[], "x", None])
    path.write_text(json.dumps(document))
    return f"model.weights.json: {kind} for {key}"


MUTATIONS: dict[str, Callable[[Preset, random.Random], str]] = {
    "flip_any": m_flip_any, "flip_meta": m_flip_meta, "flip_data": m_flip_data, "truncate": m_truncate,
    "overwrite_block": m_overwrite_block, "append": m_append, "delete_file": m_delete_file,
    "h5_delete": m_h5_delete, "h5_add": m_h5_add, "h5_reshape": m_h5_reshape, "h5_absurd_shape": m_h5_absurd_shape,
    "h5_retype": m_h5_retype, "h5_values": m_h5_values, "h5_storage": m_h5_storage, "h5_attr": m_h5_attr,
    "h5_structure": m_h5_structure, "json_config": m_json_config, "json_bytes": m_json_bytes,
    "json_weight_map": m_json_weight_map,
}
# Relative frequencies: byte damage and hdf5 edits dominate; deleting a whole shard is rarely informative.
WEIGHTS = {"flip_any": 4, "flip_meta": 6, "flip_data": 3, "truncate": 4, "overwrite_block": 3, "append": 1,
           "delete_file": 1, "h5_delete": 3, "h5_add": 2, "h5_reshape": 3, "h5_absurd_shape": 2, "h5_retype": 3,
           "h5_values": 1, "h5_storage": 3, "h5_attr": 3, "h5_structure": 3, "json_config": 6, "json_bytes": 2,
           "json_weight_map": 2}


def golden_cases(golden: Path) -> dict[str, str]:
    """case name -> the preset path of case.json (relative to the case), for every case with a preset."""
    out = {}
    for case_json in sorted(golden.glob("*/case.json")):
        preset = json.loads(case_json.read_text()).get("preset")
        if preset and (case_json.parent / preset).exists():
            out[case_json.parent.name] = preset
    return out


def draw_mutations(count: int, seed: int, cases: list[str]) -> list[Mutation]:
    rng = random.Random(seed)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    return [Mutation(rng.choice(cases), rng.choices(kinds, weights)[0], rng.randrange(2**31)) for _ in range(count)]


# ---- one mutation, in the worker -------------------------------------------------------------------------------
def copy_preset(golden: Path, case: str, preset: str, into: Path) -> Preset:
    source = golden / case / preset
    source_dir = source if source.is_dir() else source.parent
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(source_dir, into)
    load_path = into if source.is_dir() else into / source.name
    h5_files = sorted(p for p in into.iterdir() if p.suffix == ".h5")
    json_files = sorted(p for p in into.iterdir() if p.name in ("config.json", "model.weights.json"))
    legacy = load_path.suffix == ".h5"
    if legacy:
        json_files = []  # the legacy loader reads the config from the .h5 file's model_config attribute
    return Preset(into, load_path, h5_files, json_files, legacy)


def classify_load(model, pristine, preset: Preset) -> tuple[str, str]:
    import numpy as np

    arrays, reference = model.params.flat(), pristine.params.flat()
    if arrays.keys() != reference.keys() or any(arrays[k].shape != reference[k].shape for k in arrays):
        return "wrong_shapes", f"fields {sorted(set(arrays) ^ set(reference))[:4]} or shapes differ"
    nonfinite = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if nonfinite:
        return "flagged_nonfinite", f"non-finite weights in {nonfinite[:4]}"
    changed = [k for k in arrays if not np.array_equal(arrays[k], reference[k])]
    if changed:
        return "loaded_changed", f"values differ in {changed[:4]}"
    if model.config != pristine.config:
        differ = [k for k in model.config.__dataclass_fields__
                  if getattr(model.config, k) != getattr(pristine.config, k)]
        return "loaded_config", f"same arrays, config differs in {differ}"
    return "loaded_same", ""


def run_mutation(mutation: Mutation, golden: Path, preset: str, scratch: Path, pristine: dict,
                 max_alloc: int) -> Outcome:
    """Apply one mutation to a fresh copy and load it; classify what happened (never raises)."""
    import resource

    from refimpl.model import PaliGemmaBackbone

    start = time.perf_counter()
    copied = copy_preset(golden, mutation.case, preset, scratch / "preset")
    rng = random.Random(mutation.seed)
    try:
        description = MUTATIONS[mutation.kind](copied, rng)
    except Exception as error:  # a mutation that h5py refuses to write is not a finding: record and move on
        return Outcome(mutation, "loaded_same", f"mutation not applicable: {type(error).__name__}: {error}"[:300])
    dtype = rng.choice(["float32", "float32", "bfloat16"])
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # kB -> bytes (Linux)
    try:
        model = PaliGemmaBackbone.from_preset(copied.load_path, dtype=dtype)
    except MemoryError as error:
        return Outcome(mutation, "memory", f"{description}; MemoryError {error}", time.perf_counter() - start)
    except ValueError as error:
        named = str(copied.root) in str(error)
        return Outcome(mutation, "rejected" if named else "unclear_error",
                       f"{description} [{dtype}]; {type(error).__name__}: {str(error)[:400]}",
                       time.perf_counter() - start)
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-1]
        return Outcome(mutation, "crash", f"{description} [{dtype}]; {type(error).__name__}: {str(error)[:300]} "
                                          f"at {where.filename}:{where.lineno}", time.perf_counter() - start)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - peak_before
    if grown > max_alloc:  # the high-water mark only rises: a load that needed this much shows here
        return Outcome(mutation, "memory", f"{description}; loading raised peak memory by {grown} bytes",
                       time.perf_counter() - start)
    status, summary = classify_load(model, pristine[(mutation.case, dtype)], copied)
    return Outcome(mutation, status, f"{description} [{dtype}]; {summary}", time.perf_counter() - start)


def _worker(connection, golden: str, presets: dict, max_alloc: int, address_space: int) -> None:
    """Worker process: load the pristine presets once, then answer mutations until told to stop."""
    import resource

    from refimpl.model import PaliGemmaBackbone

    if address_space:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    golden_dir = Path(golden)
    pristine = {(case, dtype): PaliGemmaBackbone.from_preset(golden_dir / case / preset, dtype=dtype)
                for case, preset in presets.items() for dtype in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory(prefix="fuzz-presets-") as scratch:
        connection.send("ready")
        while True:
            message = connection.recv()
            if message is None:
                return
            mutation = Mutation(**message)
            outcome = run_mutation(mutation, golden_dir, presets[mutation.case], Path(scratch), pristine, max_alloc)
            connection.send({"mutation": asdict(outcome.mutation), "status": outcome.status,
                             "detail": outcome.detail, "seconds": outcome.seconds})


# ---- the campaign ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    tried: int = 0
    counts: Counter = field(default_factory=Counter)
    by_kind: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def handled(self) -> int:
        return sum(self.counts[s] for s in HANDLED)

    def add(self, outcome: Outcome) -> None:
        self.tried += 1
        self.counts[outcome.status] += 1
        self.by_kind.setdefault(outcome.mutation.kind, Counter())[outcome.status] += 1
        if outcome.status in FAILURES:
            self.failures.append(outcome)

    def to_dict(self) -> dict:
        return {"tried": self.tried, "handled": self.handled, "failed": len(self.failures),
                "counts": dict(self.counts), "by_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
                "seconds": round(self.seconds, 1),
                "failures": [{**asdict(f.mutation), "status": f.status, "detail": f.detail} for f in self.failures]}

    def summary(self) -> str:
        lines = [f"{self.tried} mutations tried, {self.handled} handled, {len(self.failures)} failed "
                 f"({self.seconds:.0f} s)", "  " + ", ".join(f"{s} {self.counts[s]}" for s in HANDLED + FAILURES
                                                             if self.counts[s])]
        for f in self.failures[:20]:
            lines.append(f"  FAIL {f.status}: --case {f.mutation.case} --kind {f.mutation.kind} --mutation-seed "
                         f"{f.mutation.seed}: {f.detail[:300]}")
        return "\n".join(lines)


class _Pool:
    """Worker processes that this campaign started (and only those are ever stopped)."""

    def __init__(self, size: int, golden: Path, presets: dict, max_alloc: int, address_space: int):
        self.args = (str(golden), presets, max_alloc, address_space)
        self.context = mp.get_context("spawn")
        self.workers = [self._start() for _ in range(size)]

    def _start(self):
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(child, *self.args), daemon=True)
        process.start()
        if not parent.poll(120) or parent.recv() != "ready":
            raise RuntimeError("a fuzz worker did not start within 120 s")
        return {"process": process, "connection": parent, "job": None, "since": 0.0}

    def replace(self, worker) -> None:
        worker["process"].kill()  # this worker's own pid: it hung on a mutation
        worker["process"].join(5)
        self.workers[self.workers.index(worker)] = self._start()

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker["connection"].send(None)
            except (OSError, BrokenPipeError):
                pass
            worker["process"].join(5)
            if worker["process"].is_alive():
                worker["process"].kill()


def run_campaign(mutations: list[Mutation], *, golden: Path = GOLDEN, workers: int = 2, timeout: float = 30.0,
                 max_alloc_mb: int = 64, address_space_mb: int = 4096,
                 progress: Callable[[Report], None] | None = None) -> Report:
    """Run every mutation; returns the report. Workers are restarted after a hang (the hang is reported)."""
    presets = golden_cases(golden)
    report, start = Report(), time.perf_counter()
    pool = _Pool(max(1, workers), golden, {c: presets[c] for c in {m.case for m in mutations}},
                 max_alloc_mb << 20, address_space_mb << 20)
    pending = list(reversed(mutations))
    try:
        while pending or any(w["job"] for w in pool.workers):
            for worker in pool.workers:
                if worker["job"] is None and pending:
                    worker["job"], worker["since"] = pending.pop(), time.perf_counter()
                    worker["connection"].send(asdict(worker["job"]))
            busy = [w for w in pool.workers if w["job"]]
            ready = wait([w["connection"] for w in busy], timeout=1.0)
            for worker in busy:
                if worker["connection"] in ready:
                    try:
                        answer = worker["connection"].recv()
                        outcome = Outcome(Mutation(**answer["mutation"]), answer["status"], answer["detail"],
                                          answer["seconds"])
                    except (EOFError, OSError):  # the worker died (a segfault in native code, say)
                        outcome = Outcome(worker["job"], "crash", "the worker process died")
                        pool.replace(worker)
                    worker["job"] = None
                    report.add(outcome)
                elif time.perf_counter() - worker["since"] > timeout:
                    report.add(Outcome(worker["job"], "hang", f"no answer within {timeout} s", timeout))
                    worker["job"] = None
                    pool.replace(worker)
            if progress:
                progress(report)
    finally:
        pool.close()
    report.seconds = time.perf_counter() - start
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz_presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=1000, help="how many mutations (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutation list")
    parser.add_argument("--golden", type=Path, default=GOLDEN, help="golden directory with the presets")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a load counts as a hang")
    parser.add_argument("--max-alloc-mb", type=int, default=64, help="allocation per load counted as a failure")
    parser.add_argument("--case", help="only this golden case")
    parser.add_argument("--kind", choices=sorted(MUTATIONS), help="only this mutation kind")
    parser.add_argument("--mutation-seed", type=int, help="replay one mutation (with --case and --kind)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    args = parser.parse_args(argv)
    cases = sorted(golden_cases(args.golden))
    if not cases:
        print(f"error: no golden cases with presets under {args.golden}", file=sys.stderr)
        return 2
    if args.mutation_seed is not None:
        if not (args.case and args.kind):
            parser.error("--mutation-seed needs --case and --kind")
        mutations = [Mutation(args.case, args.kind, args.mutation_seed)]
    else:
        mutations = draw_mutations(args.mutations, args.seed, [args.case] if args.case else cases)
        if args.kind:
            mutations = [Mutation(m.case, args.kind, m.seed) for m in mutations]
    last = [0.0]

    def progress(report: Report) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            print(f"  {report.tried}/{len(mutations)} tried, {len(report.failures)} failed", file=sys.stderr)

    report = run_campaign(mutations, golden=args.golden, workers=args.workers, timeout=args.timeout,
                          max_alloc_mb=args.max_alloc_mb, progress=progress)
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
