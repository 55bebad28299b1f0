"""Regenerating the refimpl part of the golden cases reproduces the committed taps and envelopes.

The committed float64 taps come from ``tools.make_goldens``; here the same code recomputes them from the committed
presets. float64 results can differ in the last bits between BLAS builds and thread counts, so the comparison is
within 1e-12 of each tap's scale (float64 rounding of these tiny models is about 1e-15). The envelopes are float32
errors, which move by up to a few float32 ulps of the tap with the summation order; they are compared within a
factor of 4 (they are used as tolerance scales, where such a factor is what matters).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tools import make_goldens

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
CASES = sorted(p.parent.name for p in GOLDEN.glob("*/case.json"))


@pytest.mark.parametrize("name", CASES)
def test_regenerated_reference_taps_match_the_committed_ones(name):
    case_dir = GOLDEN / name
    case = json.loads((case_dir / "case.json").read_text())
    with np.load(case_dir / "taps.npz", allow_pickle=False) as data:
        committed = {key: data[key] for key in data.files}
    regenerated = make_goldens.run_reference(case_dir, case, "float64")
    assert list(regenerated) == case["taps"] == list(committed)
    for tap, value in regenerated.items():
        reference = committed[tap]
        assert value.shape == reference.shape and value.dtype == reference.dtype, tap
        if value.dtype == bool:
            np.testing.assert_array_equal(value, reference, err_msg=tap)
            continue
        scale = np.max(np.abs(reference))
        assert np.max(np.abs(value - reference)) <= 1e-12 * scale, tap


@pytest.mark.parametrize("name", CASES[:2])
def test_regenerated_float32_envelope_matches(name):
    case_dir = GOLDEN / name
    case = json.loads((case_dir / "case.json").read_text())
    reference = make_goldens.run_reference(case_dir, case, "float64")
    envelope = make_goldens.envelope(make_goldens.run_reference(case_dir, case, "float32"), reference)
    for tap, committed in case["float32_envelope"].items():
        new, old = envelope[tap]["max_abs"], committed["max_abs"]
        assert old / 4 <= new <= old * 4 or max(new, old) == 0, (tap, new, old)
