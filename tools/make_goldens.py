"""Write the golden cases in ``golden/``: keras-hub presets and outputs, refimpl's float64 taps, error envelopes.

    python -m tools.make_goldens                   # every case: keras-hub writes presets + outputs, then refimpl
    python -m tools.make_goldens --case pg1_basic  # one case
    python -m tools.make_goldens --refimpl-only    # keep the presets and keras outputs; recompute refimpl's part

A case directory (format documented in golden/README.md):
    case.json        schema version, config, preset path, tap list, float32/bf16 envelopes, keras margins, provenance
    preset/          the weights exactly as keras-hub wrote them (plain, sharded, bf16 or legacy .h5)
    inputs.npz       images, token_ids, padding_mask, response_mask
    taps.npz         refimpl in float64 on the stored weights: the ground truth (tap name -> array)
    keras_taps.npz   keras-hub's own outputs for the same inputs, with keras_provenance.json
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
from pathlib import Path

import numpy as np

from conformance.cases import compute_manifest
from refimpl.model import PaliGemmaBackbone

SCHEMA_VERSION = 1
GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"
CASE_SIDE_FILES = ("inputs.npz", "keras_taps.npz", "keras_provenance.json")
REGENERATE = "python -m tools.make_goldens"


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


def write_manifest(golden: Path) -> None:
    names = sorted(p.name for p in golden.iterdir() if (p / "case.json").is_file())
    manifest = compute_manifest(golden, names)
    (golden / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="case name (repeatable); default: all")
    parser.add_argument("--golden", type=Path, default=GOLDEN_DIR)
    parser.add_argument("--refimpl-only", action="store_true",
                        help="keep presets and keras outputs, recompute refimpl's taps and envelopes")
    args = parser.parse_args(argv)
    if args.refimpl_only:
        names = args.case or sorted(p.name for p in args.golden.iterdir() if (p / "case.json").is_file())
    else:
        from tools import keras_oracle
        names = args.case or list(keras_oracle.CASES)
    for name in names:
        case_dir = args.golden / name
        if args.refimpl_only:
            case = json.loads((case_dir / "case.json").read_text())
        else:
            case = write_keras_part(name, case_dir)
        case = write_reference_part(case_dir, case)
        (case_dir / "case.json").write_text(json.dumps(case, indent=1) + "\n")
        size = sum(p.stat().st_size for p in case_dir.rglob("*") if p.is_file())
        print(f"{name}: {len(case['taps'])} taps, {size / 1024:.0f} KiB")
    write_manifest(args.golden)
    total = sum(p.stat().st_size for p in args.golden.rglob("*") if p.is_file())
    print(f"golden/: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
