"""A bounded fuzzing campaign on the real golden presets (tools/fuzz_presets.py): every mutation handled.

The ci profile runs 200 mutations from a fixed seed in two worker processes (about 20-30 s); the long profile
(HYPOTHESIS_PROFILE=long) runs 2000 from a random seed, printed so a failure can be replayed. "Handled" is defined
in tools/fuzz_presets.py: a clear error naming the file, or a load of finite arrays of the pristine shapes (bit
flips inside float data legitimately load other numbers; non-finite loads are flagged, not failed).
"""

from __future__ import annotations

import os
import random

import pytest

from tools.fuzz_presets import GOLDEN, HANDLED, draw_mutations, golden_cases, run_campaign

pytestmark = [pytest.mark.hardening, pytest.mark.property]


def test_every_mutation_of_the_golden_presets_is_handled():
    cases = sorted(golden_cases(GOLDEN))
    if not cases:
        pytest.skip(f"no golden presets under {GOLDEN}: generate them with `python -m tools.make_goldens`")
    long = os.environ.get("HYPOTHESIS_PROFILE") == "long"
    count, seed = (2000, random.randrange(2**31)) if long else (200, 20261204)
    report = run_campaign(draw_mutations(count, seed, cases), workers=2, timeout=60)
    print(f"fuzz seed {seed}: {report.summary()}")
    assert report.tried == count
    assert not report.failures, f"seed {seed}:\n{report.summary()}"
    assert report.handled == count
    # The campaign exercises every outcome class it claims to handle (a regression in the mutators shows here).
    for status in ("rejected", "loaded_same", "loaded_changed"):
        assert report.counts[status] > 0, (status, dict(report.counts))
    assert set(report.counts) <= set(HANDLED)
