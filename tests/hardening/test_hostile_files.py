"""Hostile preset files, one damage at a time, on copies of the real keras-hub presets in golden/.

Every damage must end in a ValueError (WeightFileError or ConfigError, both ValueErrors) whose message names the
file, quickly, without allocating what the file declares. The one damage that legitimately loads is a bit flip
inside float data: HDF5 keeps no checksum unless the writer asked for fletcher32 (keras never does), so the file
is a valid file holding other numbers; with fletcher32 the same flip is caught. tools/fuzz_presets.py (and
tests/hardening/test_preset_fuzz.py) throws thousands of random damages of the same kinds at the loader.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from refimpl.config import ConfigError
from refimpl.model import PaliGemmaBackbone
from refimpl.weights import WeightFileError
from tests.memory import traced_peak

pytestmark = pytest.mark.hardening

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "golden"
TOKEN = "layers/reversible_embedding/vars/0"
PRESETS = {"plain": ("pg1_basic", "preset"), "sharded": ("pg1_sharded", "preset"),
           "legacy": ("pg1_legacy_h5", "preset/model.h5"), "bf16": ("pg1_bf16", "preset")}


def copy_preset(tmp_path: Path, kind: str) -> Path:
    """A private copy of a golden preset; returns what from_preset takes (directory, or model.h5)."""
    case, preset = PRESETS[kind]
    source = GOLDEN / case / preset
    if not source.exists():
        pytest.skip(f"golden case {case} missing: generate it with `python -m tools.make_goldens`")
    directory = tmp_path / kind
    shutil.copytree(source if source.is_dir() else source.parent, directory)
    return directory if source.is_dir() else directory / source.name


def weights_file(preset: Path) -> Path:
    if preset.is_file():
        return preset
    return preset / "model.weights.h5" if (preset / "model.weights.h5").exists() else preset / "model_00000.weights.h5"


def load_error(preset: Path, expected=ValueError, dtype=None) -> str:
    """from_preset must raise ``expected`` (a ValueError) naming a file of the preset; returns the message."""
    with pytest.raises(expected) as error:
        PaliGemmaBackbone.from_preset(preset, dtype=dtype)
    message = str(error.value)
    root = preset if preset.is_dir() else preset.parent
    assert str(root) in message, f"the message does not name the file: {message}"
    return message


# ---- bytes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "sharded", "legacy"])
@pytest.mark.parametrize("keep", [0, 8, 96, 512, 0.1, 0.5, 0.9, -1])
def test_truncated_files(tmp_path, kind, keep):
    preset = copy_preset(tmp_path, kind)
    target = weights_file(preset)
    size = target.stat().st_size
    cut = {0: 0, 8: 8, 96: 96, 512: 512, -1: size - 1}.get(keep, int(size * keep))
    with open(target, "r+b") as stream:
        stream.truncate(cut)
    load_error(preset)


@pytest.mark.parametrize("kind", ["plain", "legacy"])
@pytest.mark.parametrize("signature", [b"SNOD", b"TREE", b"HEAP"])
def test_corrupt_group_metadata(tmp_path, kind, signature):
    """Symbol-table nodes, B-trees and local heaps (how keras' h5py files store groups), each made unreadable."""
    preset = copy_preset(tmp_path, kind)
    target = weights_file(preset)
    data = bytearray(target.read_bytes())
    offsets = [m.start() for m in re.finditer(re.escape(signature), bytes(data))]
    assert offsets, f"no {signature!r} in {target.name}"
    for offset in offsets[len(offsets) // 2:]:  # the later half: the superblock and root group stay readable
        data[offset:offset + 4] = b"XXXX"
    target.write_bytes(bytes(data))
    load_error(preset, WeightFileError)


def test_zero_sized_global_heap_object_does_not_hang(tmp_path):
    """HDF5 loops forever parsing a global heap collection (where keras' string attributes live) whose free-space
    object has size 0 (found by tools/fuzz_presets.py). The load runs in a child process with a timeout, so a
    regression fails this test instead of hanging the suite."""
    preset = copy_preset(tmp_path, "plain")
    target = weights_file(preset)
    data = bytearray(target.read_bytes())
    start = data.index(b"GCOL\x01")
    size, position = int.from_bytes(data[start + 8:start + 16], "little"), 16
    while int.from_bytes(data[start + position:start + position + 2], "little") != 0:  # walk to the free space
        object_size = int.from_bytes(data[start + position + 8:start + position + 16], "little")
        position += 16 + (object_size + 7) // 8 * 8
        assert position < size
    data[start + position + 8:start + position + 16] = bytes(8)
    target.write_bytes(bytes(data))
    script = ("import sys\nfrom refimpl.model import PaliGemmaBackbone\n"
              "try:\n    PaliGemmaBackbone.from_preset(sys.argv[1])\n"
              "except ValueError as error:\n    print(type(error).__name__, error)\n")
    run = subprocess.run([sys.executable, "-c", script, str(preset)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("WeightFileError") and "global heap collection" in run.stdout
    assert str(target) in run.stdout


def test_superblock_flip(tmp_path):
    preset = copy_preset(tmp_path, "plain")
    target = weights_file(preset)
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    assert "neither an HDF5 file nor a JSON weight map" in load_error(preset, WeightFileError)


def _data_offset(path: Path, name: str) -> int:
    """Byte offset of a dataset's raw data in the file (its first chunk if chunked)."""
    with h5py.File(path, "r") as handle:
        dataset = handle[name]
        return dataset.id.get_offset() if dataset.chunks is None else dataset.id.get_chunk_info(0).byte_offset


def test_bit_flip_inside_float_data_loads_other_numbers(tmp_path):
    """Documented behaviour: a valid HDF5 file with one different float. Only that element changes."""
    preset = copy_preset(tmp_path, "plain")
    target = weights_file(preset)
    pristine = PaliGemmaBackbone.from_preset(preset).params.token_embedding
    data = bytearray(target.read_bytes())
    data[_data_offset(target, TOKEN) + 4 * 7] ^= 0x01  # lowest mantissa bit of element 7 (little-endian)
    target.write_bytes(bytes(data))
    loaded = PaliGemmaBackbone.from_preset(preset).params.token_embedding
    differ = np.argwhere(loaded != pristine)
    assert differ.tolist() == [[0, 7]] and np.isfinite(loaded).all()
    assert abs(loaded[0, 7] - pristine[0, 7]) <= np.spacing(abs(pristine[0, 7]))


def test_fletcher32_checksums_catch_the_same_flip(tmp_path):
    preset = copy_preset(tmp_path, "plain")
    target = weights_file(preset)
    with h5py.File(target, "r+") as handle:
        values = handle[TOKEN][()]
        del handle[TOKEN]
        handle.create_dataset(TOKEN, data=values, chunks=values.shape, fletcher32=True)
    np.testing.assert_array_equal(PaliGemmaBackbone.from_preset(preset).params.token_embedding, values)
    data = bytearray(target.read_bytes())
    data[_data_offset(target, TOKEN) + 4 * 7] ^= 0x01
    target.write_bytes(bytes(data))
    assert "truncated or corrupt" in load_error(preset, WeightFileError)


# ---- HDF5 structure --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, fragment", [
    (lambda f: f.__delitem__(TOKEN), f"missing entry '{TOKEN}'"),
    (lambda f: f.create_dataset("layers/reversible_embedding/vars/1", data=np.ones(3, "f4")),
     "unexpected entry 'layers/reversible_embedding/vars/1'"),
    (lambda f: f.__setitem__("layers/named_type", np.dtype("f4")), "layers/named_type is a Datatype"),
    (lambda f: f.__setitem__("layers/alias", h5py.SoftLink("/" + TOKEN)), "layers/alias is a SoftLink"),
    (lambda f: (f.__delitem__(TOKEN), f.create_group(TOKEN)), f"missing entry '{TOKEN}'"),
])
def test_missing_extra_and_foreign_objects(tmp_path, change, fragment):
    preset = copy_preset(tmp_path, "plain")
    with h5py.File(weights_file(preset), "r+") as handle:
        change(handle)
    assert fragment in load_error(preset, WeightFileError)


@pytest.mark.parametrize("data, found", [(np.zeros((97, 40), np.complex64), "complex64"),
                                         (np.zeros((97, 40), bool), "bool"),
                                         (np.zeros((97, 40), "<u4").view("V4"), "opaque4"),
                                         (np.zeros((97, 40), np.int8), "int8")])
def test_wrong_dtypes(tmp_path, data, found):
    preset = copy_preset(tmp_path, "plain")
    with h5py.File(weights_file(preset), "r+") as handle:
        del handle[TOKEN]
        handle[TOKEN] = data
    assert f"found {found}" in load_error(preset, WeightFileError)


def _rewrite_config(preset: Path, **changes) -> None:
    document = json.loads((preset / "config.json").read_text())
    document["config"].update(changes)
    (preset / "config.json").write_text(json.dumps(document))


@pytest.mark.parametrize("key", ["num_layers", "vit_num_layers"])
def test_absurd_layer_counts_fail_fast(tmp_path, key):
    preset = copy_preset(tmp_path, "plain")
    _rewrite_config(preset, **{key: 10**9})
    start = time.perf_counter()
    message = load_error(preset, WeightFileError)
    assert time.perf_counter() - start < 5 and "asks for" in message and "1000000000" in message


def test_absurd_declared_shape_matching_the_config_allocates_nothing(tmp_path):
    preset = copy_preset(tmp_path, "plain")
    _rewrite_config(preset, vocabulary_size=2**31)
    with h5py.File(weights_file(preset), "r+") as handle:
        del handle[TOKEN]
        handle.create_dataset(TOKEN, shape=(2**31, 40), dtype="f4", chunks=(1024, 40))  # 320 GiB, none stored
    peak, message = traced_peak(lambda: load_error(preset, WeightFileError))
    assert "never (fully) written" in message and peak < 16 << 20


def test_decompression_bomb_is_refused(tmp_path):
    """42 MB of zeros gzip to a few KB: a small file must not make the reader allocate what it declares."""
    preset = copy_preset(tmp_path, "plain")
    rows = 2**18
    _rewrite_config(preset, vocabulary_size=rows)
    with h5py.File(weights_file(preset), "r+") as handle:
        del handle[TOKEN]
        dataset = handle.create_dataset(TOKEN, shape=(rows, 40), dtype="f4", chunks=(8192, 40), compression="gzip")
        for start in range(0, rows, 8192):
            dataset[start:start + 8192] = 0.0
    assert weights_file(preset).stat().st_size < 2 << 20
    peak, message = traced_peak(lambda: load_error(preset, WeightFileError))
    assert "decompression bomb" in message and peak < 16 << 20


def test_compressed_real_weights_still_load(tmp_path):
    preset = copy_preset(tmp_path, "plain")
    pristine = PaliGemmaBackbone.from_preset(preset).params.token_embedding
    with h5py.File(weights_file(preset), "r+") as handle:
        values = handle[TOKEN][()]
        del handle[TOKEN]
        handle.create_dataset(TOKEN, data=values, chunks=(16, 40), compression="gzip", shuffle=True)
    np.testing.assert_array_equal(PaliGemmaBackbone.from_preset(preset).params.token_embedding, pristine)


# ---- config.json -----------------------------------------------------------------------------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_CONFIGS = {
    "deep nesting": ('{"class_name": "PaliGemmaBackbone", "config": ' + _nested(100_000) + "}", "RecursionError"),
    "huge integer": ('{"class_name": "PaliGemmaBackbone", "config": {"num_layers": ' + "9" * 50_000 + "}}",
                     "not valid JSON"),
    "not UTF-8": (b'{"class_name": "PaliGemmaBackbone\xff"}', "not valid JSON"),
    "top-level list": ("[1, 2]", "expected a serialized keras object"),
    "empty": ("", "not valid JSON"),
    "class outside the allowlist": ('{"class_name": "Lambda", "config": {}}', "class 'Lambda'"),
    "registered elsewhere": ('{"class_name": "PaliGemmaBackbone", "registered_name": "evil>PaliGemmaBackbone", '
                             '"config": {}}', "registered as 'evil>PaliGemmaBackbone'"),
    "config not an object": ('{"class_name": "PaliGemmaBackbone", "registered_name": null, "config": [1]}',
                             "expected a 'config' object"),
    "too large": (" " * (2 << 20) + "{}", "expected at most"),
}


@pytest.mark.parametrize("label", list(HOSTILE_CONFIGS))
def test_hostile_config_json(tmp_path, label):
    text, fragment = HOSTILE_CONFIGS[label]
    preset = copy_preset(tmp_path, "plain")
    (preset / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    assert fragment in load_error(preset, ConfigError)


@pytest.mark.parametrize("changes, fragment", [
    ({"num_layers": "3"}, "num_layers='3' must be a positive integer"),
    ({"hidden_dim": -40}, "hidden_dim=-40"),
    ({"vocabulary_size": True}, "vocabulary_size=True"),
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon=nan"),
    ({"attention_logit_soft_cap": float("inf")}, "attention_logit_soft_cap=inf"),
    ({"rope_max_wavelength": 10000}, "unknown key 'rope_max_wavelength'"),
    ({"vit_pooling": "map"}, "vit_pooling='map' is not supported"),
])
def test_invalid_config_values(tmp_path, changes, fragment):
    preset = copy_preset(tmp_path, "plain")
    _rewrite_config(preset, **changes)
    assert fragment in load_error(preset, ConfigError)


def test_missing_config_key(tmp_path):
    preset = copy_preset(tmp_path, "plain")
    document = json.loads((preset / "config.json").read_text())
    del document["config"]["head_dim"]
    (preset / "config.json").write_text(json.dumps(document))
    assert "missing required key 'head_dim'" in load_error(preset, ConfigError)


# ---- sharded weight map and legacy model_config ----------------------------------------------------------------
@pytest.mark.parametrize("text, fragment", [
    ('{"weight_map": ' + _nested(100_000) + "}", "not valid JSON"),
    ('{"weight_map": {"/layers/reversible_embedding/vars": ["../../etc/passwd"]}}', "plain file names"),
    ('{"weight_map": {"/layers/reversible_embedding/vars": "/etc/hostname"}}', "plain file names"),
    ('{"weight_map": {"/layers/reversible_embedding/vars": ["model_00099.weights.h5"]}}', "is missing"),
    ('{"weight_map": [1]}', "expected a JSON object with a 'weight_map' object"),
], ids=["deep nesting", "traversal", "absolute path", "missing shard", "map not an object"])
def test_hostile_weight_map(tmp_path, text, fragment):
    preset = copy_preset(tmp_path, "sharded")
    (preset / "model.weights.json").write_text(text)
    assert fragment in load_error(preset, WeightFileError)


@pytest.mark.parametrize("value, fragment", [
    ('{"class_name": "PaliGemmaBackbone", "config": ' + _nested(100_000) + "}", "not valid JSON"),
    (np.arange(3), "not valid JSON"),
    ('{"class_name": "Sequential", "config": {}}', "class 'Sequential'"),
], ids=["deep nesting", "numbers", "class outside the allowlist"])
def test_hostile_legacy_model_config(tmp_path, value, fragment):
    preset = copy_preset(tmp_path, "legacy")
    with h5py.File(preset, "r+") as handle:
        handle.attrs["model_config"] = value
    assert fragment in load_error(preset)
