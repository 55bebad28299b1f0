"""tools/bench_models.py: the bookkeeping (pure functions), and one end-to-end run on the tiny workload (bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import bench_models
from tools.bench_models import BASELINE, REFERENCE, absent_reason, child_env, format_table, summary

REPO = Path(__file__).resolve().parents[2]


def _run(peer, steady, load=1.0, first=2.0, rss=2 << 30, error=None):
    row = {"peer": peer, "load_s": load, "first_call_s": first, "steady_median_s": steady, "steady_min_s": steady,
           "peak_rss_bytes": rss, "agreement": {"max_rel_diff": 1e-6}, "steady_mode": "call"}
    if error:
        row["error"] = error
    return row


def test_summary_takes_each_peers_best_round_and_ratios_against_numba():
    rounds = [{BASELINE: _run(BASELINE, 4.0), "keras-jax": _run("keras-jax", 1.5, load=40.0, rss=8 << 30)},
              {BASELINE: _run(BASELINE, 3.0, load=2.0, rss=3 << 30), "keras-jax": _run("keras-jax", 2.0, error="x")}]
    table = summary(rounds, [BASELINE, "keras-jax", "transformers"], {"transformers": "not installed: torch"},
                    weight_bytes=2 << 30)
    numba = table[BASELINE]
    assert numba["steady_median_s"] == 3.0 and numba["load_s"] == 1.0  # best steady round; fastest load seen
    assert numba["peak_rss_bytes"] == 3 << 30 and numba["rss_over_weights"] == 1.5  # largest RSS seen
    assert table["keras-jax"]["rounds"] == 1  # the failed round is left out
    assert table["keras-jax"]["ratios_vs_" + BASELINE]["steady"] == pytest.approx(0.5)
    assert table["keras-jax"]["ratios_vs_" + BASELINE]["preset_to_first_output"] == pytest.approx(42.0 / 3.0)
    assert table["transformers"] == {"absent": "not installed: torch"}
    text = format_table(table, 2 << 30)
    assert "transformers" in text and "absent: not installed: torch" in text and "0.50x" in text


def test_a_peer_that_failed_every_round_is_reported_as_failed():
    rounds = [{BASELINE: _run(BASELINE, 1.0), "keras-torch": {"peer": "keras-torch", "error": "boom"}}]
    table = summary(rounds, [BASELINE, "keras-torch"], {}, weight_bytes=1)
    assert table["keras-torch"] == {"failed": "boom"}
    assert "FAILED: boom" in format_table(table, 1)


def test_absent_peers_name_what_is_missing(monkeypatch):
    monkeypatch.setattr(bench_models, "_has", lambda *modules: modules[0] != "torch")
    assert absent_reason("transformers").startswith("not installed: torch")
    assert "pip install torch==2.13.0" in absent_reason("keras-torch")
    assert absent_reason("refimpl-numpy") is None


def test_children_run_without_the_openblas_overrides(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "1")
    env = child_env("keras-torch")
    assert "OPENBLAS_CORETYPE" not in env and "OPENBLAS_L2_SIZE" not in env
    assert env["KERAS_BACKEND"] == "torch" and str(REPO) in env["PYTHONPATH"].split(":")


@pytest.mark.bench
def test_end_to_end_on_the_tiny_workload(tmp_path):
    """Every refimpl peer in its own process on a tiny preset: outputs agree, the table and JSON are written."""
    pytest.importorskip("numba", reason="numba not installed")
    peers = "refimpl-numba,refimpl-numba-mmap,refimpl-numba-stream,refimpl-numba-f64-stream"
    done = subprocess.run([sys.executable, "-m", "tools.bench_models", "--workload", "tiny", "--peers", peers,
                           "--rounds", "1", "--repeats", "2", "--dir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "tiny-bench.json").read_text())
    assert list(report["summary"]) == [REFERENCE] + peers.split(",")
    for peer, row in report["summary"].items():
        assert row["agreement"]["agrees"], peer
        assert row["peak_rss_bytes"] > 0 and len(row["modes"]["call"]["steady_s"]) == 2, peer
    assert "matrix work" in done.stdout and "first-call overhead refimpl-numba" in done.stdout


def test_every_workload_has_default_peers():
    from tools.make_big_preset import WORKLOADS

    assert set(bench_models.DEFAULT_PEERS) == set(WORKLOADS)
    assert all(set(peers) <= set(bench_models.PEERS) for peers in bench_models.DEFAULT_PEERS.values())
