"""The pytest plugin, as a port would use it: a conftest defining ``conformance_backend``, one test per case."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.conformance

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

CONFTEST = """
import pytest
from _conformance_cases import refimpl_backend, scale_decoder_weight

pytest_plugins = ["conformance.pytest_plugin"]


@pytest.fixture(scope="session")
def conformance_backend():
    return refimpl_backend({edit})
"""
TEST_MODULE = "from conformance.pytest_plugin import test_golden_case  # noqa: F401\n"


def _run_port_tests(tmp_path: Path, golden: Path, edit: str = "None", *extra: str):
    port = tmp_path / "port"
    port.mkdir()
    (port / "conftest.py").write_text(textwrap.dedent(CONFTEST.format(edit=edit)))
    (port / "test_port_conformance.py").write_text(TEST_MODULE)
    (port / "pytest.ini").write_text("[pytest]\n")
    # Plugin autoloading off: hypothesis' plugin alone costs two seconds per run.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(port),
               f"--conformance-golden={golden}", *extra]
    return subprocess.run(command, cwd=port, env=env, capture_output=True, text=True, timeout=120)


def test_one_passing_test_per_case(tmp_path, golden_root):
    run = _run_port_tests(tmp_path, golden_root)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    assert "test_golden_case[pg2]" in run.stdout and "test_golden_case[tiny]" in run.stdout


def test_failing_and_tampered_cases_fail(tmp_path, golden_copy):
    (golden_copy / "tiny" / "stray.bin").write_bytes(b"x")
    run = _run_port_tests(tmp_path, golden_copy, 'scale_decoder_weight(1, "w_down", 1.02)')
    assert run.returncode == 1
    assert "1 failed, 1 error" in run.stdout  # the integrity check fails in the case fixture: an error
    assert "first divergence: llm/layer01/ffw_out" in run.stdout and "IntegrityError" in run.stdout


def test_teacher_forced_option(tmp_path, golden_root):
    run = _run_port_tests(tmp_path, golden_root, 'scale_decoder_weight(1, "w_down", 1.02)',
                          "--conformance-teacher-forced", "--conformance-taps", "llm/layer02")
    assert "2 passed" in run.stdout, run.stdout  # block 2 is fed its golden input: its own error only


def test_missing_golden_directory_skips_with_a_reason(tmp_path):
    run = _run_port_tests(tmp_path, tmp_path / "nowhere")
    assert "1 skipped" in run.stdout and "does not exist" in run.stdout
