"""Golden cases on disk: integrity check against ``MANIFEST.json``, then strict loading of one case.

    golden/MANIFEST.json          {"schema_version": 1, "files": {"<case>/<relative file>": "<sha256 hex>", ...}}
    golden/<case>/case.json       name, description, config, preset, weights_variant, taps (forward order),
                                  float32_envelope, bfloat16_envelope (optional), keras,
                                  tolerance_overrides (optional), provenance
    golden/<case>/inputs.npz      images f32[B, S, S, 3], token_ids int32[B, T], padding_mask, response_mask bool[B, T]
    golden/<case>/taps.npz        the float64 reference taps, keys = tap names
    golden/<case>/preset/...      the keras preset the case was made from

A case is any manifest entry ``<case>/case.json``; ``<case>`` may contain slashes (``tiny/pg1_basic``). Every file
of a case is hashed before anything is read: a missing, changed or unlisted file is an ``IntegrityError`` (the CLI
exits 2; a broken case never passes). Files are data: ``np.load(allow_pickle=False)`` only, and array sizes are read
from the ``.npy`` headers and checked before anything is allocated.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from refimpl import taps as tap_defs
from refimpl.config import ConfigError, PaliGemmaConfig
from refimpl.files import read_json_limited, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
REGENERATE_COMMAND = "python -m tools.make_goldens"
MAX_JSON_BYTES = 16 << 20  # case.json and MANIFEST.json are a few KB; a 3B-model manifest is still far below this
MAX_ARRAY_BYTES = 4 << 30  # one tap of a real model: [1, 1280, 2048] float64 is 21 MB; logits [1, T, 257152] more
INPUT_KEYS = ("images", "token_ids", "padding_mask", "response_mask")
WEIGHTS_VARIANTS = ("plain", "sharded", "bf16", "legacy_h5")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CaseError(Exception):
    """A golden case (or candidate file) that cannot be used: the check cannot run (exit code 2)."""


class IntegrityError(CaseError):
    """Files of a case differ from ``MANIFEST.json``: changed, missing, or not listed."""


class SchemaError(CaseError):
    """A ``case.json`` or manifest written with another schema version."""


@dataclass(frozen=True)
class Envelope:
    """The reference's own float32 error on one tap: refimpl float32 against refimpl float64."""

    max_abs: float
    max_rel: float
    rms: float


@dataclass
class Case:
    """One loaded golden case. Arrays are read eagerly (cases are small); ``golden`` holds the float64 taps."""

    name: str
    directory: Path
    description: str
    config: dict  # the keras PaliGemmaBackbone argument dict
    preset: Path  # absolute: a preset directory, or a file such as .../preset/model.h5
    weights_variant: str
    taps: tuple[str, ...]  # forward order
    float32_envelope: dict[str, Envelope]
    bfloat16_envelope: dict[str, Envelope]  # optional in case.json: refimpl's keras-bf16 emulation vs float64
    keras: dict
    tolerance_overrides: dict[str, dict]
    provenance: dict
    inputs: dict[str, np.ndarray] = field(repr=False)
    golden: dict[str, np.ndarray] = field(repr=False)

    @property
    def parsed_config(self) -> PaliGemmaConfig:
        return PaliGemmaConfig.from_keras_config(self.config, source=f"{self.name}/case.json config")

    @property
    def keras_dtype(self) -> str:
        """The keras dtype policy the case's keras outputs were recorded under ("float32" or "bfloat16")."""
        return str(self.keras.get("dtype", "float32"))

    @property
    def image_tokens(self) -> int:
        return self.parsed_config.image_sequence_length

    def keras_taps(self) -> dict[str, np.ndarray]:
        """keras-hub's own outputs (``keras.file``), or {} if the case has none."""
        name = self.keras.get("file")
        if not name or not (self.directory / name).is_file():
            return {}
        return load_npz(self.directory / name, what=f"{self.name}/{name}")


# ---- safe array files ------------------------------------------------------------------------------------------
def _npy_header(stream, what: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        raise CaseError(f"{what}: unsupported .npy format version {version}")
    shape, _, dtype = reader(stream)
    return tuple(shape), np.dtype(dtype)


def load_npz(path: str | Path, *, what: str | None = None, max_bytes: int = MAX_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, after checking each header (no object dtypes, at most ``max_bytes`` each).

    Returns arrays in file order. Raises CaseError naming the file and member.
    """
    path = Path(path)
    what = what or str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise CaseError(f"{what}: member {info.filename!r} is not an .npy array")
                with archive.open(info) as stream:
                    shape, dtype = _npy_header(stream, f"{what}:{info.filename}")
                if dtype.hasobject:
                    raise CaseError(f"{what}: member {info.filename!r} has object dtype {dtype}; expected numbers")
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > max_bytes:
                    raise CaseError(f"{what}: member {info.filename!r} would need {nbytes} bytes "
                                    f"(shape {shape}, {dtype}); the limit is {max_bytes}")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise CaseError(f"{what}: not a readable .npz file ({error})") from None


def read_json(path: Path, what: str) -> Any:
    return read_json_limited(path, what, MAX_JSON_BYTES, CaseError)


# ---- manifest --------------------------------------------------------------------------------------------------
def read_manifest(golden_dir: str | Path) -> dict[str, str]:
    """``files`` of ``<golden_dir>/MANIFEST.json``: relative path -> sha256, after checking the schema."""
    path = Path(golden_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CaseError(f"golden directory {golden_dir}: no {MANIFEST_NAME}; generate the cases with "
                        f"`{REGENERATE_COMMAND}` or pass --golden DIR")
    document = read_json(path, MANIFEST_NAME)
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict):
        raise CaseError(f"{path}: expected an object with 'schema_version' and 'files'")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"{path}: schema_version {document.get('schema_version')!r}, this harness reads "
                          f"{SCHEMA_VERSION}; regenerate the golden cases with `{REGENERATE_COMMAND}`")
    files = document["files"]
    bad = [key for key, value in files.items() if not (isinstance(value, str) and _SHA256.match(value))]
    if bad:
        raise CaseError(f"{path}: entries without a lowercase sha256 hex digest: {bad[:5]}")
    return dict(files)


def compute_manifest(golden_dir: str | Path, case_names: Iterable[str]) -> dict:
    """The manifest document for the given cases as they are on disk now (for generators and tests)."""
    root = Path(golden_dir)
    files = {}
    for name in case_names:
        for path in sorted(p for p in (root / name).rglob("*") if p.is_file()):
            files[path.relative_to(root).as_posix()] = sha256_file(path)
    return {"schema_version": SCHEMA_VERSION, "files": files}


def list_cases(golden_dir: str | Path) -> list[str]:
    """Case names: every ``<case>/case.json`` in the manifest, plus unlisted directories holding a case.json.

    Unlisted cases are returned too, so that loading them fails with an IntegrityError instead of being skipped.
    """
    root = Path(golden_dir)
    listed = {key[: -len("/case.json")] for key in read_manifest(root) if key.endswith("/case.json")}
    on_disk = {p.parent.relative_to(root).as_posix() for p in root.rglob("case.json") if p.parent != root}
    return sorted(listed | on_disk)


def verify_case_files(golden_dir: str | Path, name: str, manifest: Mapping[str, str] | None = None) -> None:
    """Hash every file of case ``name`` against the manifest; raise one IntegrityError listing every problem."""
    root = Path(golden_dir)
    manifest = read_manifest(root) if manifest is None else manifest
    prefix = name.rstrip("/") + "/"
    expected = {key[len(prefix):]: digest for key, digest in manifest.items() if key.startswith(prefix)}
    case_dir = root / name
    if not expected:
        raise IntegrityError(f"case {name!r} is not listed in {root / MANIFEST_NAME}; regenerate it with "
                             f"`{REGENERATE_COMMAND}` (an unlisted case is never checked)")
    if not case_dir.is_dir():
        raise IntegrityError(f"case {name!r}: directory {case_dir} is missing")
    problems = []
    found = {p.relative_to(case_dir).as_posix(): p for p in case_dir.rglob("*") if p.is_file() or p.is_symlink()}
    for relative, digest in sorted(expected.items()):
        path = found.get(relative)
        if path is None:
            problems.append(f"missing file {relative}")
        elif path.is_symlink():
            problems.append(f"{relative} is a symbolic link; case files must be regular files")
        elif sha256_file(path) != digest:
            problems.append(f"{relative}: sha256 {sha256_file(path)[:16]}... differs from the manifest's "
                            f"{digest[:16]}...")
    problems += [f"extra file {relative} (not in {MANIFEST_NAME})" for relative in sorted(set(found) - set(expected))]
    if problems:
        raise IntegrityError(f"case {name!r} in {root} fails its integrity check:\n  - " + "\n  - ".join(problems)
                             + f"\nrestore the files (e.g. from git) or regenerate with `{REGENERATE_COMMAND}`")


# ---- case.json -------------------------------------------------------------------------------------------------
def _require(document: Mapping[str, Any], key: str, kind: type | tuple, what: str) -> Any:
    if key not in document:
        raise CaseError(f"{what}: missing key {key!r}")
    value = document[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CaseError(f"{what}: {key!r} must be a {names}, found {type(value).__name__}")
    return value


def _envelopes(document: Mapping[str, Any], key: str, taps: tuple[str, ...], what: str) -> dict[str, Envelope]:
    raw = _require(document, key, dict, what) if key == "float32_envelope" else document.get(key) or {}
    if not isinstance(raw, dict):
        raise CaseError(f"{what}: {key!r} must be an object {{tap: {{max_abs, max_rel, rms}}}}")
    out = {}
    for tap, entry in raw.items():
        if tap not in taps:
            raise CaseError(f"{what}: {key} names tap {tap!r}, which is not in 'taps'")
        try:
            out[tap] = Envelope(float(entry["max_abs"]), float(entry["max_rel"]), float(entry["rms"]))
        except (KeyError, TypeError, ValueError):
            raise CaseError(f"{what}: {key}[{tap!r}] must be {{'max_abs', 'max_rel', 'rms'}} numbers, "
                            f"found {entry!r}") from None
        if not all(math.isfinite(v) and v >= 0 for v in vars(out[tap]).values()):
            raise CaseError(f"{what}: {key}[{tap!r}] must hold finite non-negative numbers: {entry!r}")
    return out


def _overrides(document: Mapping[str, Any], what: str) -> dict[str, dict]:
    raw = document.get("tolerance_overrides") or {}
    if not isinstance(raw, dict):
        raise CaseError(f"{what}: tolerance_overrides must be an object {{tap regex: {{atol, rtol}}}}")
    for pattern, entry in raw.items():
        try:
            re.compile(pattern)
            atol, rtol = float(entry["atol"]), float(entry["rtol"])
        except (re.error, KeyError, TypeError, ValueError) as error:
            raise CaseError(f"{what}: tolerance_overrides[{pattern!r}] must be a valid regex mapped to "
                            f"{{'atol': x, 'rtol': x}}, found {entry!r} ({error})") from None
        if not (atol >= 0 and rtol >= 0):
            raise CaseError(f"{what}: tolerance_overrides[{pattern!r}]: atol and rtol must be >= 0")
    return dict(raw)


def _check_taps(names: list, what: str) -> tuple[str, ...]:
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise CaseError(f"{what}: 'taps' must be a non-empty list of distinct tap names")
    for name in names:
        try:
            tap_defs.definition(name)
        except KeyError as error:
            raise CaseError(f"{what}: {error.args[0]}") from None
    missing = [t for t in tap_defs.REQUIRED_TAPS if t not in names]
    if missing:
        raise CaseError(f"{what}: 'taps' lacks the required taps {missing}")
    return tuple(names)


def _check_inputs(inputs: dict[str, np.ndarray], config: PaliGemmaConfig, what: str) -> dict[str, np.ndarray]:
    missing = [k for k in INPUT_KEYS if k not in inputs]
    if missing or set(inputs) - set(INPUT_KEYS):
        raise CaseError(f"{what}: expected exactly the arrays {INPUT_KEYS}, found {sorted(inputs)}")
    images, ids = inputs["images"], inputs["token_ids"]
    s = config.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3) or not np.issubdtype(images.dtype, np.floating):
        raise CaseError(f"{what}: images must be float[B, {s}, {s}, 3], found {images.dtype}{list(images.shape)}")
    if ids.ndim != 2 or ids.shape[0] != images.shape[0] or not np.issubdtype(ids.dtype, np.integer):
        raise CaseError(f"{what}: token_ids must be int[B={images.shape[0]}, T], found {ids.dtype}{list(ids.shape)}")
    for key in ("padding_mask", "response_mask"):
        if inputs[key].shape != ids.shape or inputs[key].dtype != bool:
            raise CaseError(f"{what}: {key} must be bool{list(ids.shape)}, found "
                            f"{inputs[key].dtype}{list(inputs[key].shape)}")
    return {k: inputs[k] for k in INPUT_KEYS}


def _check_golden(golden: dict[str, np.ndarray], taps: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    if set(golden) != set(taps):
        only_npz, only_json = sorted(set(golden) - set(taps))[:5], sorted(set(taps) - set(golden))[:5]
        raise CaseError(f"{what}: taps.npz keys differ from case.json 'taps': only in taps.npz {only_npz}, "
                        f"only in case.json {only_json}")
    for name, array in golden.items():
        if array.dtype != bool and array.dtype != np.float64:
            raise CaseError(f"{what}: reference tap {name!r} is {array.dtype}; expected float64 (or bool for masks)")
    return {name: golden[name] for name in taps}


def parse_case_document(document: Any, what: str) -> dict:
    """Check the schema version and the required keys of a case.json document; return it."""
    if not isinstance(document, dict):
        raise CaseError(f"{what}: expected a JSON object")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"{what}: schema_version {document.get('schema_version')!r}, this harness reads "
                          f"{SCHEMA_VERSION}; regenerate the case with `{REGENERATE_COMMAND}`")
    for key, kind in (("name", str), ("config", dict), ("preset", str), ("taps", list)):
        _require(document, key, kind, what)
    variant = document.get("weights_variant", "plain")
    if variant not in WEIGHTS_VARIANTS:
        raise CaseError(f"{what}: weights_variant {variant!r} is not one of {WEIGHTS_VARIANTS}")
    return document


def load_case(golden_dir: str | Path, name: str, *, verify: bool = True) -> Case:
    """Verify (unless ``verify=False``) and load case ``name`` of ``golden_dir``.

    Raises:
      IntegrityError: a file differs from the manifest, is missing, or is not listed.
      SchemaError: case.json has another schema_version (the message names the regenerating command).
      CaseError: anything else malformed, naming the file and the field.
    """
    root = Path(golden_dir)
    if verify:
        verify_case_files(root, name)
    directory = root / name
    what = f"{name}/case.json"
    document = parse_case_document(read_json(directory / "case.json", what), what)
    try:
        config = PaliGemmaConfig.from_keras_config(document["config"], source=f"{what} config")
    except ConfigError as error:
        raise CaseError(str(error)) from None
    taps = _check_taps(document["taps"], what)
    preset = (directory / document["preset"]).resolve()
    if not preset.is_relative_to(directory.resolve()) or not preset.exists():
        raise CaseError(f"{what}: preset {document['preset']!r} must name an existing path inside the case")
    inputs = _check_inputs(load_npz(directory / "inputs.npz", what=f"{name}/inputs.npz"), config, f"{name}/inputs.npz")
    golden = _check_golden(load_npz(directory / "taps.npz", what=f"{name}/taps.npz"), taps, f"{name}/taps.npz")
    return Case(name=name, directory=directory, description=str(document.get("description", "")),
                config=dict(document["config"]), preset=preset,
                weights_variant=document.get("weights_variant", "plain"), taps=taps,
                float32_envelope=_envelopes(document, "float32_envelope", taps, what),
                bfloat16_envelope=_envelopes(document, "bfloat16_envelope", taps, what),
                keras=dict(document.get("keras") or {}),
                tolerance_overrides=_overrides(document, what), provenance=dict(document.get("provenance") or {}),
                inputs=inputs, golden=golden)
