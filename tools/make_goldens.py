"""Write the golden cases in ``golden/``: keras-hub presets and outputs, refimpl's float64 taps, error envelopes.

    python -m tools.make_goldens                   # every case: keras-hub writes presets + outputs, then refimpl
    python -m tools.make_goldens --case pg1_basic  # one case
    python -m tools.make_goldens --refimpl-only    # keep the presets and keras outputs; recompute refimpl's part
    python -m tools.make_goldens --generation-only # (re)record generation for the cases of GENERATION_CASES only,
                                                   # from the stored presets; nothing else is rewritten
    python -m tools.make_goldens --generation-only --refimpl-only   # recompute refimpl's generation part only

A case directory (format documented in golden/README.md):
    case.json        schema version, config, preset path, tap list, float32/bf16 envelopes, keras margins, provenance
    preset/          the weights exactly as keras-hub wrote them (plain, sharded, bf16 or legacy .h5)
    inputs.npz       images, token_ids, padding_mask, response_mask
    taps.npz         refimpl in float64 on the stored weights: the ground truth (tap name -> array)
    keras_taps.npz   keras-hub's own outputs for the same inputs, with keras_provenance.json
    generation_inputs.npz, generation.npz, generation_keras.npz   (cases of GENERATION_CASES) greedy generation on
                     ragged prompts: the inputs, refimpl's float64 record (the ground truth) and keras-hub's own run
``golden/MANIFEST.json`` holds the sha256 of every file; the harness refuses a case whose files do not match.
Goldens come from running implementations (keras-hub, refimpl), never from a second copy of the maths here.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conformance.backend import refimpl_generate
from conformance.cases import compared_step_mask, compute_manifest
from refimpl.model import PaliGemmaBackbone

SCHEMA_VERSION = 1
GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"
CASE_SIDE_FILES = ("inputs.npz", "keras_taps.npz", "keras_provenance.json")
REGENERATE = "python -m tools.make_goldens"
GEN_INPUTS, GEN_REFERENCE, GEN_KERAS = "generation_inputs.npz", "generation.npz", "generation_keras.npz"
# A conforming float32 candidate may be 8 envelopes off (conformance/tolerances.py); the greedy choice must not be
# that close to a tie anywhere, or such a candidate could pick another token: demand this many tolerances of margin.
MIN_MARGIN_IN_TOLERANCES = 4.0


@dataclass(frozen=True)
class GenerationSpec:
    """How a case's generation record is made: prompts are the case's own tokens where padding_mask is True."""

    extra_tokens: int  # max_length = the longest prompt + extra_tokens
    stop: str  # a key of STOP_RULES


STOP_RULES = {
    "none": "no stop ids: every row generates to max_length",
    "second_token": ("stop ids = the ids keras-hub generates (without stop ids) at each row's second generated "
                     "position, so every row stops within two tokens and the loop ends before max_length"),
}
# Each record costs the default `paligemma-ref check` about 0.1 s with NumPy kernels (more with numba's threads on
# a busy machine), so only a few cases carry one.
GENERATION_CASES = {
    "pg1_basic": GenerationSpec(extra_tokens=4, stop="none"),  # PaliGemma 1, prompts of 9 and 7 tokens
    # PaliGemma 2: the window of 5 is active over 9 image + 13 text positions; prompts of 8 and 6 tokens.
    "pg2_window": GenerationSpec(extra_tokens=5, stop="second_token"),
}


def load_inputs(case_dir: Path) -> dict[str, np.ndarray]:
    with np.load(case_dir / "inputs.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def preset_path(case_dir: Path, case: dict) -> Path:
    return case_dir / case["preset"]


def run_reference(case_dir: Path, case: dict, dtype: str, kernels: str = "numpy") -> dict[str, np.ndarray]:
    """All taps of refimpl on the case's stored preset, under policy ``dtype``."""
    model = PaliGemmaBackbone.from_preset(preset_path(case_dir, case), dtype=dtype, kernels=kernels)
    _, taps = model.call_with_taps(load_inputs(case_dir), taps=".*")
    return taps


def error_summary(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """max abs, max abs relative to max |reference|, and rms of the difference, all in float64."""
    diff = np.asarray(candidate, np.float64) - np.asarray(reference, np.float64)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale else 0.0,
            "rms": float(np.sqrt(np.mean(diff * diff))) if diff.size else 0.0}


def envelope(candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {name: error_summary(candidate[name], reference[name]) for name in reference
            if reference[name].dtype != bool}


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=GOLDEN_DIR.parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import numba
    return {"numpy": np.__version__, "numba": numba.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or "unknown"}


def write_keras_part(name: str, case_dir: Path) -> dict:
    """keras-hub builds, perturbs and saves the model, and records its outputs (tools.keras_oracle)."""
    from tools import keras_oracle

    spec = keras_oracle.CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        provenance = keras_oracle.write_named_case(name, Path(tmp) / name)
        source = Path(tmp) / name
        if case_dir.exists():
            shutil.rmtree(case_dir)
        (case_dir / "preset").mkdir(parents=True)
        for item in source.iterdir():
            target = case_dir / item.name if item.name in CASE_SIDE_FILES else case_dir / "preset" / item.name
            shutil.move(str(item), target)
    preset = "preset/model.h5" if spec.variant == "legacy_h5" else "preset"
    return {"schema_version": SCHEMA_VERSION, "name": name, "description": spec.description,
            "config": provenance["config"], "preset": preset, "weights_variant": spec.variant,
            "keras": {"file": "keras_taps.npz", "dtype": spec.dtype, "versions": provenance["versions"],
                      "provenance": "keras_provenance.json"}}


def write_reference_part(case_dir: Path, case: dict) -> dict:
    """refimpl's float64 taps (the ground truth), and the float32 / bf16 envelopes against them."""
    reference = run_reference(case_dir, case, "float64")
    np.savez_compressed(case_dir / "taps.npz", **reference)
    case["taps"] = list(reference)
    case["float32_envelope"] = envelope(run_reference(case_dir, case, "float32"), reference)
    case["bfloat16_envelope"] = envelope(run_reference(case_dir, case, "bfloat16"), reference)
    with np.load(case_dir / "keras_taps.npz", allow_pickle=False) as data:
        keras = {key: data[key] for key in data.files}
    case["keras_vs_reference"] = {name: error_summary(keras[name], reference[name]) for name in keras
                                  if name in reference and reference[name].dtype != bool}
    case["provenance"] = {"producer": f"refimpl (numpy kernels) at git {_git_sha()}", "versions": _versions(),
                          "reference_dtype": "float64", "command": REGENERATE}
    case.setdefault("tolerance_overrides", {})
    return case


# ---- generation records --------------------------------------------------------------------------------------
def load_npz_dict(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def generation_inputs(inputs: dict[str, np.ndarray], extra_tokens: int) -> dict[str, np.ndarray]:
    """Generation inputs from a case's inputs: each row's tokens where padding_mask is True are its prompt (ragged),
    right-padded with 0 to max_length = the longest prompt + ``extra_tokens``.

    Returns images f32[B, S, S, 3], token_ids int32[B, M], padding_mask bool[B, M] (True on the prompt).
    """
    prompt = inputs["padding_mask"]
    batch, length = prompt.shape
    lengths = prompt.sum(axis=-1)
    if not np.array_equal(prompt, np.arange(length)[None, :] < lengths[:, None]):
        raise ValueError(f"padding_mask of the case must be right-padded to be a prompt, found {prompt.tolist()}")
    max_length = int(lengths.max()) + extra_tokens
    kept = min(length, max_length)  # columns past the longest prompt are padding only
    token_ids = np.zeros((batch, max_length), np.int32)
    token_ids[:, :kept] = np.where(prompt, inputs["token_ids"], 0)[:, :kept]
    padding_mask = np.zeros((batch, max_length), bool)
    padding_mask[:, :kept] = prompt[:, :kept]
    return {"images": inputs["images"], "token_ids": token_ids, "padding_mask": padding_mask}


def choose_stop_ids(spec: GenerationSpec, free_run: dict[str, np.ndarray],
                    inputs: dict[str, np.ndarray]) -> list[int] | None:
    """The stop ids of STOP_RULES[spec.stop], read from keras-hub's run without stop ids."""
    if spec.stop == "none":
        return None
    if spec.stop != "second_token" or spec.extra_tokens < 2:
        raise ValueError(f"stop rule {spec.stop!r} with extra_tokens={spec.extra_tokens} is not supported")
    lengths = inputs["padding_mask"].sum(axis=-1)
    return sorted({int(free_run["token_ids"][b, n + 1]) for b, n in enumerate(lengths)})


def _keras_backbone(case_dir: Path, case: dict):
    """keras-hub's backbone from the case's stored preset, under the dtype its keras outputs were recorded in."""
    from tools import keras_oracle

    variant = case.get("weights_variant", "plain")
    preset = preset_path(case_dir, case)
    if variant == "legacy_h5":
        return keras_oracle.reload_backbone(preset.parent, variant)[0]
    return keras_oracle.reload_backbone(preset, variant, dtype=case["keras"].get("dtype", "float32"))[0]


def write_keras_generation(name: str, case_dir: Path, case: dict) -> dict:
    """keras-hub's greedy generate on the case's preset and ragged prompts: writes generation_inputs.npz and
    generation_keras.npz, returns the case.json ``generation`` section (refimpl's part is added later)."""
    from tools import keras_oracle

    spec = GENERATION_CASES[name]
    inputs = generation_inputs(load_inputs(case_dir), spec.extra_tokens)
    backbone = _keras_backbone(case_dir, case)
    free_run = keras_oracle.keras_generate(backbone, inputs, None)
    stops = choose_stop_ids(spec, free_run, inputs)
    out = free_run if stops is None else keras_oracle.keras_generate(backbone, inputs, stops)
    np.savez_compressed(case_dir / GEN_INPUTS, **inputs)
    np.savez_compressed(case_dir / GEN_KERAS, **out)
    return {"inputs": GEN_INPUTS, "reference": GEN_REFERENCE, "max_length": int(inputs["token_ids"].shape[1]),
            "prompt_lengths": [int(n) for n in inputs["padding_mask"].sum(axis=-1)], "stop_token_ids": stops,
            "stop_rule": STOP_RULES[spec.stop],
            "keras": {"file": GEN_KERAS, "dtype": backbone.dtype_policy.name, "versions": keras_oracle._versions(),
                      "producer": "keras-hub PaliGemmaCausalLM(backbone, preprocessor=None).generate, greedy "
                                  "(compiled, as keras runs it); step logits recorded inside its loop by "
                                  "tools.keras_oracle.recording_greedy_sampler (jax.debug.callback)"}}


def run_generation(case_dir: Path, case: dict, dtype: str, kernels: str = "numpy") -> dict[str, np.ndarray]:
    """refimpl's greedy generation (``conformance.backend.refimpl_generate``) of the case's generation record."""
    section = case["generation"]
    model = PaliGemmaBackbone.from_preset(preset_path(case_dir, case), dtype=dtype, kernels=kernels)
    return refimpl_generate(model, load_npz_dict(case_dir / section["inputs"]), section["stop_token_ids"])


def _step_logits_error(candidate: np.ndarray, reference: np.ndarray, keep: np.ndarray) -> dict[str, float]:
    return error_summary(candidate[keep], reference[keep])  # over the compared (step, row)s: f[n, V]


def _greedy_margin(logits: np.ndarray, keep: np.ndarray) -> float:
    """Smallest gap between the largest and second-largest logit over the compared (step, row)s."""
    top = np.sort(logits[keep], axis=-1)
    return float(np.min(top[:, -1] - top[:, -2]))


def _require_same_generation(name: str, what: str, candidate: dict, reference: dict) -> None:
    for key in ("token_ids", "padding_mask"):
        if not np.array_equal(candidate[key], reference[key]):
            raise RuntimeError(f"{name}: {what} {key} differ from refimpl float64's ({candidate[key].tolist()} vs "
                               f"{reference[key].tolist()}); the generation record would not be a fair test: "
                               "change its GENERATION_CASES entry")
    if candidate["step_logits"].shape != reference["step_logits"].shape:
        raise RuntimeError(f"{name}: {what} ran {len(candidate['step_logits'])} steps, float64 "
                           f"{len(reference['step_logits'])}")


def write_generation_reference(name: str, case_dir: Path, case: dict) -> dict:
    """refimpl float64's generation (generation.npz, the ground truth) and its float32 envelope; checks that
    refimpl float32 and keras-hub generated the same ids and that no greedy choice is near a tie."""
    section = case["generation"]
    reference = run_generation(case_dir, case, "float64")
    float32 = run_generation(case_dir, case, "float32")
    keras = load_npz_dict(case_dir / section["keras"]["file"])
    _require_same_generation(name, "refimpl float32", float32, reference)
    _require_same_generation(name, "keras-hub", keras, reference)
    keep = compared_step_mask(reference["padding_mask"], reference["steps"])
    logits = reference["step_logits"]
    section["steps"] = int(len(reference["steps"]))
    section["float32_envelope"] = _step_logits_error(float32["step_logits"], logits, keep)
    section["keras_vs_reference"] = _step_logits_error(keras["step_logits"], logits, keep)
    margin = _greedy_margin(logits, keep)
    section["greedy_margin"] = {"min_top1_top2_gap": margin,
                                "in_float32_tolerances": margin / (8 * section["float32_envelope"]["max_abs"])}
    if section["greedy_margin"]["in_float32_tolerances"] < MIN_MARGIN_IN_TOLERANCES:
        raise RuntimeError(f"{name}: a greedy choice is within {margin:.3g} of a tie, under "
                           f"{MIN_MARGIN_IN_TOLERANCES} float32 tolerances; change its GENERATION_CASES entry")
    np.savez_compressed(case_dir / section["reference"], **reference)
    section["provenance"] = {"producer": f"refimpl (numpy kernels) at git {_git_sha()}", "reference_dtype": "float64",
                             "versions": _versions(), "command": f"{REGENERATE} --generation-only --refimpl-only"}
    case["generation"] = section
    return case


def write_manifest(golden: Path) -> None:
    names = sorted(p.name for p in golden.iterdir() if (p / "case.json").is_file())
    manifest = compute_manifest(golden, names)
    (golden / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _case_names(args) -> list[str]:
    on_disk = sorted(p.name for p in args.golden.iterdir() if (p / "case.json").is_file())
    if args.generation_only:
        names = args.case or [n for n in GENERATION_CASES if n in on_disk]
        unknown = [n for n in names if n not in GENERATION_CASES]
        if unknown:
            raise SystemExit(f"--generation-only: {unknown} have no entry in GENERATION_CASES "
                             f"({', '.join(GENERATION_CASES)})")
        return names
    if args.refimpl_only:
        return args.case or on_disk
    from tools import keras_oracle
    return args.case or list(keras_oracle.CASES)


def make_case(name: str, case_dir: Path, args) -> dict:
    """One case, as the flags say (see the module docstring); returns its case.json document."""
    if args.generation_only:
        case = json.loads((case_dir / "case.json").read_text())
        if not args.refimpl_only:
            case["generation"] = write_keras_generation(name, case_dir, case)
        return write_generation_reference(name, case_dir, case)
    if args.refimpl_only:
        case = json.loads((case_dir / "case.json").read_text())
    else:
        case = write_keras_part(name, case_dir)
        if name in GENERATION_CASES:
            case["generation"] = write_keras_generation(name, case_dir, case)
    case = write_reference_part(case_dir, case)
    if "generation" in case:
        case["generation"] = case.pop("generation")  # keep the section last in case.json
        case = write_generation_reference(name, case_dir, case)
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="case name (repeatable); default: all")
    parser.add_argument("--golden", type=Path, default=GOLDEN_DIR)
    parser.add_argument("--refimpl-only", action="store_true",
                        help="keep presets and keras outputs, recompute refimpl's taps and envelopes")
    parser.add_argument("--generation-only", action="store_true",
                        help="only (re)record the generation of the cases in GENERATION_CASES, from the stored "
                             "presets (keras-hub, then refimpl; with --refimpl-only refimpl only); presets, inputs "
                             "and taps are not rewritten")
    args = parser.parse_args(argv)
    for name in _case_names(args):
        case_dir = args.golden / name
        case = make_case(name, case_dir, args)
        (case_dir / "case.json").write_text(json.dumps(case, indent=1) + "\n")
        size = sum(p.stat().st_size for p in case_dir.rglob("*") if p.is_file())
        generation = f", generation {case['generation']['steps']} steps" if "generation" in case else ""
        print(f"{name}: {len(case['taps'])} taps{generation}, {size / 1024:.0f} KiB")
    write_manifest(args.golden)
    total = sum(p.stat().st_size for p in args.golden.rglob("*") if p.is_file())
    print(f"golden/: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
