"""pytest plugin: check a Python port against the golden cases inside the port's own test run, one test per case.

    # conftest.py of the port (the root conftest; or run pytest with -p conformance.pytest_plugin)
    pytest_plugins = ["conformance.pytest_plugin"]

    @pytest.fixture(scope="session")
    def conformance_backend():
        return MyBackend()     # name, prepare(case), run(inputs, taps) [, run_block]: see conformance.backend

    # test_conformance.py of the port: importing the test collects it, parametrised over every golden case
    from conformance.pytest_plugin import test_golden_case  # noqa: F401

Or write the test yourself with the ``conformance_case`` and ``conformance_options`` fixtures and
``check_conformance(case, backend, options)``, which fails the test with the harness' report of the case.

Options: ``--conformance-golden DIR`` (or ini ``conformance_golden``, relative to the rootdir; default the golden/
directory of this repository), ``--conformance-taps REGEX``, ``--conformance-exclude REGEX``,
``--conformance-teacher-forced``, ``--conformance-include-padding``, ``--conformance-candidate-dtype D``.
A missing golden directory skips, saying so; a case that fails its integrity check fails (never a pass).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance import report
from conformance.backend import BackendUnavailable
from conformance.cases import REGENERATE_COMMAND, Case, CaseError, list_cases, load_case
from conformance.harness import CaseResult, CheckOptions, check_case

DEFAULT_GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("conformance", "PaliGemma conformance (golden cases)")
    group.addoption("--conformance-golden", default=None, metavar="DIR", help="golden directory")
    group.addoption("--conformance-taps", default=None, metavar="REGEX", help="compare only matching taps")
    group.addoption("--conformance-exclude", default=None, metavar="REGEX", help="skip matching taps")
    group.addoption("--conformance-teacher-forced", action="store_true", help="feed golden block inputs")
    group.addoption("--conformance-include-padding", action="store_true", help="compare padded positions too")
    group.addoption("--conformance-candidate-dtype", default=None, help="tolerance row (float32, bfloat16, ...)")
    parser.addini("conformance_golden", "golden directory for conformance tests (relative to rootdir)", default="")


def golden_dir(config) -> Path:
    option = config.getoption("--conformance-golden")
    if option:
        return Path(option)
    ini = config.getini("conformance_golden")
    return Path(config.rootpath, ini) if ini else DEFAULT_GOLDEN


def pytest_generate_tests(metafunc) -> None:
    if "conformance_case_name" not in metafunc.fixturenames:
        return
    root = golden_dir(metafunc.config)
    if not root.is_dir():
        reason = (f"golden directory {root} does not exist: pass --conformance-golden DIR or generate the cases "
                  f"with `{REGENERATE_COMMAND}`")
        metafunc.parametrize("conformance_case_name", [pytest.param(None, marks=pytest.mark.skip(reason=reason))],
                             ids=["no-golden-cases"])
        return
    try:
        names = list_cases(root)
    except CaseError as error:  # a broken manifest fails, it does not skip
        names = [pytest.param(f"!{error}", id="broken-golden-directory")]
    metafunc.parametrize("conformance_case_name", names)


@pytest.fixture
def conformance_case(conformance_case_name, request) -> Case:
    """The golden case of this test, verified against the manifest (a mismatch fails the test)."""
    if conformance_case_name.startswith("!"):
        pytest.fail(conformance_case_name[1:], pytrace=False)
    try:
        return load_case(golden_dir(request.config), conformance_case_name)
    except CaseError as error:
        pytest.fail(f"{type(error).__name__}: {error}", pytrace=False)


@pytest.fixture
def conformance_options(request) -> CheckOptions:
    get = request.config.getoption
    return CheckOptions(include=get("--conformance-taps"), exclude=get("--conformance-exclude"),
                        teacher_forced=get("--conformance-teacher-forced"),
                        include_padding=get("--conformance-include-padding"),
                        candidate_dtype=get("--conformance-candidate-dtype"))


def check_conformance(case: Case, backend, options: CheckOptions | None = None) -> CaseResult:
    """Check ``backend`` on ``case``; fail the current test with the case's report unless it conforms."""
    try:
        result = check_case(case, backend, options or CheckOptions())
    except BackendUnavailable as error:
        pytest.skip(f"backend unavailable: {error}")
    if result.status != "pass":
        pytest.fail(report.summary_line(result) + "\n" + report.case_detail(result), pytrace=False)
    return result


def test_golden_case(conformance_case, conformance_backend, conformance_options) -> None:
    """One golden case through the harness: passes when every compared tap is within tolerance."""
    check_conformance(conformance_case, conformance_backend, conformance_options)
