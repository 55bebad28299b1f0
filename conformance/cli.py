"""``paligemma-ref check`` / ``python -m conformance check``: check a backend against the golden cases.

    paligemma-ref check                                   # refimpl (numba kernels if importable) vs every case
    paligemma-ref check --candidate dumps/ --json report.json --junit junit.xml --html report.html
    paligemma-ref check --backend keras-hub --case pg1_basic --teacher-forced
    paligemma-ref check --backend my_port.conformance:MyBackend
    paligemma-ref check --no-generation                   # skip the generation records (cases that have one)

Exit codes: 0 every case conforms, 1 a case diverges, 2 usage error, broken or missing case (integrity, schema),
or a backend that cannot run or crashed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from conformance import report
from conformance.backend import BACKENDS, BackendUnavailable, make_backend, numba_importable
from conformance.cases import REGENERATE_COMMAND, CaseError, list_cases
from conformance.harness import CheckOptions, check_cases, exit_code
from conformance.tolerances import CANDIDATE_DTYPES

DEFAULT_GOLDEN = Path(__file__).resolve().parent.parent / "golden"
USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paligemma-ref check",
                                     description="Check a backend against the PaliGemma golden cases, tap by tap.",
                                     epilog="Exit codes: 0 conforms, 1 diverges, 2 usage or integrity error.")
    parser.add_argument("--backend", help=f"backend name ({', '.join(sorted(BACKENDS))}) or module:factory; "
                                          "default refimpl")
    parser.add_argument("--candidate", type=Path, metavar="DUMP",
                        help="an .npz/.h5 file of named taps (one case) or a directory of <case>.npz/.h5 files")
    parser.add_argument("--candidate-dtype", choices=CANDIDATE_DTYPES,
                        help="tolerance row to use (default: the backend's dtype, else each array's dtype)")
    parser.add_argument("--case", action="extend", nargs="+", metavar="NAME", help="check only these cases")
    parser.add_argument("--taps", metavar="REGEX", help="compare only taps matching REGEX (re.search)")
    parser.add_argument("--exclude", metavar="REGEX", help="do not compare taps matching REGEX")
    parser.add_argument("--xfail", nargs=2, action="append", default=[], metavar=("REGEX", "REASON"),
                        help="taps matching REGEX may fail; they are reported as xfail with REASON")
    parser.add_argument("--tolerance", nargs=3, action="append", default=[], metavar=("REGEX", "ATOL", "RTOL"),
                        help="absolute tolerance for taps matching REGEX (overrides the table and case.json)")
    parser.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN, metavar="DIR",
                        help=f"golden directory (default {DEFAULT_GOLDEN})")
    parser.add_argument("--teacher-forced", action="store_true",
                        help="run each block on the golden block input (backends with run_block)")
    parser.add_argument("--include-padding", action="store_true",
                        help="also compare positions at padded text tokens (excluded by default)")
    parser.add_argument("--no-generation", action="store_true",
                        help="do not check the cases' generation records (greedy ids, returned padding mask, "
                             "step logits) even if the backend implements generate()")
    parser.add_argument("--json", type=Path, metavar="F", help="write the JSON report to F")
    parser.add_argument("--junit", type=Path, metavar="F", help="write JUnit XML to F")
    parser.add_argument("--html", type=Path, metavar="F", help="write the HTML report to F")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every tap of every case")
    parser.add_argument("--list-cases", action="store_true", help="print the case names and exit")
    return parser


def _options(args) -> CheckOptions:
    for pattern in [args.taps, args.exclude] + [x[0] for x in args.xfail] + [t[0] for t in args.tolerance]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"regex {pattern!r} is invalid: {error}") from None
    overrides = []
    for pattern, atol, rtol in args.tolerance:
        try:
            overrides.append((pattern, float(atol), float(rtol)))
        except ValueError:
            raise ValueError(f"--tolerance {pattern} {atol} {rtol}: ATOL and RTOL must be numbers") from None
    return CheckOptions(include=args.taps, exclude=args.exclude, include_padding=args.include_padding,
                        teacher_forced=args.teacher_forced, candidate_dtype=args.candidate_dtype,
                        tolerance_overrides=tuple(overrides), xfail=tuple((p, r) for p, r in args.xfail),
                        generation=not args.no_generation)


def _backend(args, case_count: int):
    if args.candidate is not None:
        if args.backend not in (None, "dump"):
            raise ValueError(f"--candidate reads a dump; it cannot be combined with --backend {args.backend}")
        if args.candidate.is_file() and case_count != 1:
            raise ValueError(f"--candidate {args.candidate} is one file, so it holds one case, but {case_count} "
                             "cases are selected; pass --case NAME or a directory of <case>.npz / <case>.h5 files")
        return make_backend("dump", path=args.candidate, dtype=args.candidate_dtype)
    name = args.backend or "refimpl"
    if name == "dump":
        raise ValueError("--backend dump needs --candidate DUMP")
    return make_backend(name)


def _select_cases(args) -> list[str]:
    known = list_cases(args.golden)
    if not known:
        raise CaseError(f"no golden cases in {args.golden}; generate them with `{REGENERATE_COMMAND}`")
    if not args.case:
        return known
    unknown = [name for name in args.case if name not in known]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; cases in {args.golden}: {', '.join(known)}")
    return list(dict.fromkeys(args.case))


def _write_reports(args, results, options) -> None:
    if args.json:
        args.json.write_text(report.dumps_json(results, options) + "\n", encoding="utf-8")
    if args.junit:
        args.junit.write_text(report.to_junit(results) + "\n", encoding="utf-8")
    if args.html:
        args.html.write_text(report.to_html(results), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit code (0 conforms, 1 diverges, 2 usage or integrity error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors and 0 after --help
        return int(exit_.code or 0)
    try:
        if args.list_cases:
            print("\n".join(list_cases(args.golden)))
            return 0
        options = _options(args)
        names = _select_cases(args)
        backend = _backend(args, len(names))
    except BackendUnavailable as error:
        print(f"paligemma-ref check: backend unavailable: {error}", file=sys.stderr)
        return USAGE_ERROR
    except (ValueError, CaseError, FileNotFoundError) as error:
        print(f"paligemma-ref check: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    kernels_note = ""
    if getattr(backend, "kernels", None) is not None and (args.backend or "refimpl") == "refimpl":
        kernels_note = " (numba is importable)" if numba_importable() else " (numba not importable: NumPy kernels)"
    print(f"backend: {backend.name}{kernels_note}; golden: {args.golden}; {len(names)} cases")
    try:
        results = check_cases(args.golden, names, backend, options)
    except BackendUnavailable as error:
        print(f"paligemma-ref check: backend unavailable: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(report.format_terminal(results, verbose=args.verbose))
    _write_reports(args, results, options)
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
