"""The shipped backends: registry, unavailability, and (slow) real keras-hub presets through refimpl and keras-hub."""

import importlib.util

import numpy as np
from pathlib import Path

import pytest

from conformance import backend as backend_lib
from conformance.backend import BackendUnavailable, KerasHubBackend, RefimplBackend, make_backend
from conformance.cli import main

pytestmark = pytest.mark.conformance
KERAS_HUB_MISSING = importlib.util.find_spec("keras_hub") is None


def test_registry_names():
    assert {"refimpl", "refimpl-numpy", "refimpl-numba", "keras-hub", "dump"} <= set(backend_lib.BACKENDS)
    assert make_backend("refimpl-numpy").name == "refimpl[numpy kernels, float32]"
    assert make_backend("refimpl-float64").capabilities.dtype == "float64"
    assert make_backend("refimpl-bfloat16").capabilities.dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown"):
        make_backend("no-such-backend")
    with pytest.raises(ValueError, match="cannot import"):
        make_backend("no_such_module:factory")


def test_recorded_keras_outputs(tmp_path, tiny_case):
    from _conformance_cases import build_case, run_taps, stored_params
    # Stand-in for keras-hub's recorded outputs: refimpl float32 taps on the same weights, minus img/pixels.
    taps = run_taps(tiny_case.parsed_config, stored_params(tiny_case.parsed_config, 0), "float32",
                    dict(tiny_case.inputs))
    taps.pop("img/pixels")
    build_case(tmp_path, "with_keras", keras_taps=taps)
    assert main(["--golden", str(tmp_path), "--backend", "keras-recorded"]) == 0
    taps["llm/layer01/attn_out"] = taps["llm/layer01/attn_out"] * np.float32(1.001)
    build_case(tmp_path, "bad_keras", keras_taps=taps)
    assert main(["--golden", str(tmp_path), "--backend", "keras-recorded", "--case", "bad_keras"]) == 1
    build_case(tmp_path, "no_keras")
    assert main(["--golden", str(tmp_path), "--backend", "keras-recorded", "--case", "no_keras"]) == 2


def test_auto_kernels_fall_back_to_numpy_without_numba(monkeypatch):
    monkeypatch.setattr(backend_lib, "numba_importable", lambda: False)
    assert RefimplBackend("auto").kernels == "numpy"
    with pytest.raises(BackendUnavailable, match="numba"):
        RefimplBackend("numba")


def test_keras_hub_unavailable_is_reported(monkeypatch, golden_root, capsys):
    from tools import keras_oracle
    monkeypatch.setattr(keras_oracle, "keras_hub_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="keras-hub is not installed"):
        KerasHubBackend()
    assert main(["--golden", str(golden_root), "--backend", "keras-hub"]) == 2
    assert "backend unavailable: keras-hub is not installed" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.skipif(KERAS_HUB_MISSING, reason="keras-hub not installed (tools/dev-setup.sh installs it)")
def test_keras_written_preset_through_refimpl_and_keras_hub(tmp_path, capsys):
    # A real case as tools/make_goldens.py writes it (about 45 s), then the preset reader path and keras-hub.
    from tools import make_goldens
    assert make_goldens.main(["--case", "pg1_basic", "--golden", str(tmp_path)]) == 0
    assert main(["--golden", str(tmp_path), "--backend", "refimpl-numpy", "--teacher-forced"]) == 0
    assert main(["--golden", str(tmp_path), "--backend", "keras-hub", "--teacher-forced"]) == 0
    assert "PASS  pg1_basic" in capsys.readouterr().out


@pytest.mark.keras
@pytest.mark.skipif(KERAS_HUB_MISSING, reason="keras-hub not installed (tools/dev-setup.sh installs it)")
def test_keras_hub_passes_golden_cases_through_the_harness(capsys):
    """keras-hub itself, live, through the harness on committed cases (each costs about 30 s of keras loading):
    the PaliGemma-2 window case, the bf16-stored case (run in bfloat16, as recorded) and the legacy .h5 case."""
    cases = ["pg2_window", "pg1_bf16", "pg1_legacy_h5"]
    shipped = Path(__file__).resolve().parents[2] / "golden"
    assert main(["--golden", str(shipped), "--backend", "keras-hub", *sum((["--case", c] for c in cases), [])]) == 0
    out = capsys.readouterr().out
    assert "PASS  pg1_bf16  [keras-hub[jax, bfloat16]]" in out and "3 conform" in out
