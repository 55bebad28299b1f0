"""Golden cases on disk: integrity check against ``MANIFEST.json``, then strict loading of one case.

    golden/MANIFEST.json          {"schema_version": 1, "files": {"<case>/<relative file>": "<sha256 hex>", ...}}
    golden/<case>/case.json       name, description, config, preset, weights_variant, taps (forward order),
                                  float32_envelope, bfloat16_envelope (optional), keras,
                                  tolerance_overrides (optional), provenance, generation (optional: inputs,
                                  reference, max_length, stop_token_ids, float32_envelope, bfloat16_envelope
                                  (optional), keras {file, ...}; see GenerationRecord)
    golden/<case>/inputs.npz      images f32[B, S, S, 3], token_ids int32[B, T], padding_mask, response_mask bool[B, T]
    golden/<case>/taps.npz        the float64 reference taps, keys = tap names
    golden/<case>/preset/...      the keras preset the case was made from
    golden/<case>/generation_inputs.npz, generation.npz, generation_keras.npz
                                  optional, named by case.json ``generation``: a greedy generation record (below)

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
GENERATION_INPUT_KEYS = ("images", "token_ids", "padding_mask")
GENERATION_KEYS = ("token_ids", "padding_mask", "step_logits", "steps")  # of generation.npz
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
class GenerationRecord:
    """A greedy generation on the case's preset, with keras-hub's ``PaliGemmaCausalLM.generate`` semantics.

    ``inputs``: images f32[B, S, S, 3], token_ids int32[B, M] (each row's prompt, bos included, right-padded with 0
    to the generation length M = ``max_length``) and padding_mask bool[B, M] (True on the prompt).
    ``reference`` (refimpl float64, the ground truth): token_ids int32[B, M] and padding_mask bool[B, M] as
    ``generate`` returns them, step_logits f64[steps, B, V] (step s predicts text position ``steps[s]``) and steps
    int64[steps] = first_index, first_index + 1, ...; ``first_index`` is the shortest prompt length.
    """

    max_length: int
    stop_token_ids: tuple[int, ...] | None
    inputs: dict[str, np.ndarray] = field(repr=False)
    reference: dict[str, np.ndarray] = field(repr=False)
    float32_envelope: Envelope  # refimpl float32 step logits against the float64 ones, over the compared entries
    bfloat16_envelope: Envelope | None
    keras_file: str | None  # keras-hub's own run (token_ids, padding_mask, step_logits f32), or None
    section: dict = field(repr=False)  # the case.json ``generation`` object as written

    @property
    def first_index(self) -> int:
        return int(self.inputs["padding_mask"].sum(axis=-1).min())

    @property
    def steps(self) -> int:
        return int(self.reference["steps"].shape[0])

    def compared_steps(self) -> np.ndarray:
        """bool[steps, B]: the (step, row) logits that count (``compared_step_mask`` of the reference)."""
        return compared_step_mask(self.reference["padding_mask"], self.reference["steps"])


def compared_step_mask(returned_padding_mask: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """bool[steps, B]: step logits that count, those whose predicted position the generation keeps.

    Args:
      returned_padding_mask: bool[B, M], as generate returns it (False after a row's first generated stop id: keras
        goes on computing those rows, but nothing it writes there is kept).
      steps: int[steps], the text position each step predicts.
    """
    return np.asarray(returned_padding_mask, dtype=bool)[:, np.asarray(steps)].T.copy()


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
    generation: GenerationRecord | None = None  # case.json ``generation``, when the case has a generation record

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

    def keras_generation(self) -> dict[str, np.ndarray]:
        """keras-hub's own generation run (token_ids, padding_mask, step_logits f32), or {} if the case has none."""
        name = self.generation.keras_file if self.generation is not None else None
        if not name:
            return {}
        what = f"{self.name}/{name}"
        arrays = load_npz(self.directory / name, what=what)
        return _check_generation_output(arrays, self.generation, what, ("token_ids", "padding_mask", "step_logits"))


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


def _envelope(entry: Any, what: str) -> Envelope:
    """One {max_abs, max_rel, rms} object of finite non-negative numbers; ``what`` names it in errors."""
    try:
        envelope = Envelope(float(entry["max_abs"]), float(entry["max_rel"]), float(entry["rms"]))
    except (KeyError, TypeError, ValueError):
        raise CaseError(f"{what} must be {{'max_abs', 'max_rel', 'rms'}} numbers, found {entry!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in vars(envelope).values()):
        raise CaseError(f"{what} must hold finite non-negative numbers: {entry!r}")
    return envelope


def _envelopes(document: Mapping[str, Any], key: str, taps: tuple[str, ...], what: str) -> dict[str, Envelope]:
    raw = _require(document, key, dict, what) if key == "float32_envelope" else document.get(key) or {}
    if not isinstance(raw, dict):
        raise CaseError(f"{what}: {key!r} must be an object {{tap: {{max_abs, max_rel, rms}}}}")
    out = {}
    for tap, entry in raw.items():
        if tap not in taps:
            raise CaseError(f"{what}: {key} names tap {tap!r}, which is not in 'taps'")
        out[tap] = _envelope(entry, f"{what}: {key}[{tap!r}]")
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


# ---- generation record (optional) -------------------------------------------------------------------------------
def _case_file(directory: Path, relative: Any, what: str) -> Path:
    """A file named by case.json, which must exist inside the case directory."""
    if not isinstance(relative, str) or not relative:
        raise CaseError(f"{what} must be a file name inside the case, found {relative!r}")
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()) or not path.is_file():
        raise CaseError(f"{what}: {relative!r} must name an existing file inside the case")
    return path


def _stop_ids(raw: Any, vocabulary: int, what: str) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not (isinstance(raw, list) and raw and all(isinstance(i, int) and 0 <= i < vocabulary for i in raw)):
        raise CaseError(f"{what}: stop_token_ids must be null or a non-empty list of ids in [0, {vocabulary}), "
                        f"found {raw!r}")
    return tuple(raw)


def _check_generation_inputs(inputs: dict[str, np.ndarray], config: PaliGemmaConfig, max_length: int,
                             what: str) -> dict[str, np.ndarray]:
    if set(inputs) != set(GENERATION_INPUT_KEYS):
        raise CaseError(f"{what}: expected exactly the arrays {GENERATION_INPUT_KEYS}, found {sorted(inputs)}")
    images, ids, mask = inputs["images"], inputs["token_ids"], inputs["padding_mask"]
    s = config.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3) or not np.issubdtype(images.dtype, np.floating):
        raise CaseError(f"{what}: images must be float[B, {s}, {s}, 3], found {images.dtype}{list(images.shape)}")
    shape = (images.shape[0], max_length)
    if ids.shape != shape or not np.issubdtype(ids.dtype, np.integer):
        raise CaseError(f"{what}: token_ids must be int{list(shape)} (max_length {max_length}), found "
                        f"{ids.dtype}{list(ids.shape)}")
    if mask.shape != shape or mask.dtype != bool:
        raise CaseError(f"{what}: padding_mask must be bool{list(shape)}, found {mask.dtype}{list(mask.shape)}")
    lengths = mask.sum(axis=-1)
    prefix = np.arange(max_length)[None, :] < lengths[:, None]
    if not np.array_equal(mask, prefix) or lengths.min() < 1:
        raise CaseError(f"{what}: padding_mask must mark a non-empty prompt at the start of every row (right "
                        f"padding), found row lengths {lengths.tolist()}")
    if ids.min() < 0 or ids.max() >= config.vocabulary_size:
        raise CaseError(f"{what}: token_ids must lie in [0, {config.vocabulary_size})")
    return {k: inputs[k] for k in GENERATION_INPUT_KEYS}


def _check_generation_output(arrays: dict[str, np.ndarray], record: "GenerationRecord", what: str,
                             keys: tuple[str, ...] = GENERATION_KEYS) -> dict[str, np.ndarray]:
    """Check a recorded generation (generation.npz: float64 logits and steps; keras: float32 logits, no steps)."""
    if set(arrays) != set(keys):
        raise CaseError(f"{what}: expected exactly the arrays {keys}, found {sorted(arrays)}")
    shape = record.inputs["token_ids"].shape
    ids, mask, logits = arrays["token_ids"], arrays["padding_mask"], arrays["step_logits"]
    if ids.shape != shape or not np.issubdtype(ids.dtype, np.integer):
        raise CaseError(f"{what}: token_ids must be int{list(shape)}, found {ids.dtype}{list(ids.shape)}")
    if mask.shape != shape or mask.dtype != bool:
        raise CaseError(f"{what}: padding_mask must be bool{list(shape)}, found {mask.dtype}{list(mask.shape)}")
    prompt = record.inputs["padding_mask"]
    if not np.array_equal(ids[prompt], record.inputs["token_ids"][prompt]):
        raise CaseError(f"{what}: token_ids differ from the prompt tokens of the generation inputs")
    expected_float = np.float64 if "steps" in keys else np.float32
    if logits.ndim != 3 or logits.shape[1] != shape[0] or logits.dtype != expected_float:
        raise CaseError(f"{what}: step_logits must be {np.dtype(expected_float).name}[steps, {shape[0]}, V], found "
                        f"{logits.dtype}{list(logits.shape)}")
    if "steps" in keys:
        first, steps = int(prompt.sum(axis=-1).min()), arrays["steps"]
        if not (steps.ndim == 1 and np.issubdtype(steps.dtype, np.integer) and 1 <= len(steps) <= shape[1] - first
                and np.array_equal(steps, np.arange(first, first + len(steps))) and len(steps) == len(logits)):
            raise CaseError(f"{what}: steps must be int[steps] = {first}, {first + 1}, ... (the shortest prompt "
                            f"length on), one per step_logits row, at most {shape[1] - first}; found "
                            f"{steps.dtype}{list(steps.shape)}, step_logits {list(logits.shape)}")
    return {k: arrays[k] for k in keys}


def _load_generation(directory: Path, name: str, document: Mapping[str, Any], config: PaliGemmaConfig,
                     what: str) -> GenerationRecord | None:
    """The ``generation`` section of case.json and the files it names, checked; None if the case has none."""
    section = document.get("generation")
    if section is None:
        return None
    what = f"{what} generation"
    if not isinstance(section, dict):
        raise CaseError(f"{what}: must be an object, found {type(section).__name__}")
    max_length = _require(section, "max_length", int, what)
    if max_length < 2:
        raise CaseError(f"{what}: max_length must be >= 2, found {max_length}")
    stops = _stop_ids(section.get("stop_token_ids"), config.vocabulary_size, what)
    inputs_file = _case_file(directory, section.get("inputs"), f"{what} 'inputs'")
    inputs = _check_generation_inputs(load_npz(inputs_file, what=f"{name}/{section['inputs']}"), config,
                                      max_length, f"{name}/{section['inputs']}")
    reference_file = _case_file(directory, section.get("reference"), f"{what} 'reference'")
    bf16 = section.get("bfloat16_envelope")
    keras_file = (section.get("keras") or {}).get("file") if isinstance(section.get("keras"), dict) else None
    if keras_file is not None:
        _case_file(directory, keras_file, f"{what} keras 'file'")
    record = GenerationRecord(max_length=max_length, stop_token_ids=stops, inputs=inputs, reference={},
                              float32_envelope=_envelope(section.get("float32_envelope"), f"{what} float32_envelope"),
                              bfloat16_envelope=None if bf16 is None else _envelope(bf16, f"{what} bfloat16_envelope"),
                              keras_file=keras_file, section=dict(section))
    reference = load_npz(reference_file, what=f"{name}/{section['reference']}")
    record.reference = _check_generation_output(reference, record, f"{name}/{section['reference']}")
    vocabulary = record.reference["step_logits"].shape[-1]
    if vocabulary != config.vocabulary_size:
        raise CaseError(f"{name}/{section['reference']}: step_logits have {vocabulary} logits per row; the "
                        f"config's vocabulary_size is {config.vocabulary_size}")
    return record


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
                inputs=inputs, golden=golden,
                generation=_load_generation(directory, name, document, config, what))
