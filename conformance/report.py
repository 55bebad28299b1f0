"""Reports of a conformance run: terminal text, JSON, JUnit XML and a self-contained HTML page.

Terminal: one line per case; under each case that is not a pass, the first divergence (with its upstream taps and
the verdict introduced / inherited), its worst elements, and a table of the taps that did not pass, first divergence
first (``verbose`` lists every tap).

JSON (``to_json``), schema_version 1:

    {"schema": "paligemma-ref conformance report", "schema_version": 1,
     "summary": {"cases", "passed", "failed", "errors", "exit_code"},
     "options": {include, exclude, include_padding, teacher_forced, candidate_dtype, tolerance_overrides, xfail,
                 generation},
     "cases": [{
        "case", "backend", "status": "pass"|"fail"|"error", "error": str|null, "notes": [str],
        "candidate_dtype", "teacher_forced", "excluded_positions", "seconds",
        "first_divergence": null | {"tap", "kind", "mode", "budget", "verdict": "introduced"|"inherited"|
                                    "undetermined", "explanation", "upstream": [{"tap", "status", "mode",
                                    "budget", "max_abs", "max_rel"}]},
        "taps": [{"name", "index", "kind", "status": "pass"|"fail"|"missing"|"xfail"|"not_provided",
                  "mode": "run"|"teacher_forced", "format", "excluded_positions", "message", "xfail_reason",
                  "tolerance": null | {"atol", "rtol", "exact", "source"},
                  "metrics": null | {shape_ok, dtype_ok, candidate_shape, reference_shape, candidate_dtype, compared,
                                     excluded_elements, nonfinite, scale, max_abs, max_rel, max_rel_elementwise,
                                     max_ulp, cosine, nmse_db, n_out, frac_out, budget_used, worst_index,
                                     worst: [{index, value, ref, abs_err}], top1_agreement, top5_overlap,
                                     mean_kl}}],
        "free_run_taps": [same as taps: with --teacher-forced, the block taps of the free-running pass],
        "generation": null | {"status": "pass"|"fail"|"not_provided", "max_length", "stop_token_ids",
                              "first_index", "reference_steps", "candidate_steps", "token_ids", "token_message",
                              "token_divergence": null | {"step", "position", "rows", "candidate", "reference",
                                                          "reference_lead"},
                              "padding_mask", "padding_mask_message", "logits_compared_steps", "message",
                              "logits": null | same as a tap (name "gen/step_logits", kind "generation logits")}}]}

"generation" is null when the case has no generation record or --no-generation was given; "token_ids" and
"padding_mask" are "pass", "fail", "xfail" or "not_compared"; "step" counts generation steps from 0 (text position
first_index + step), null for a differing token before the first step.

Non-finite numbers are written as the strings "inf", "-inf" and "nan" (JSON has no literal for them). "budget"
is max |x - ref| / (atol + rtol |ref|): a tap passes when it is at most 1.

JUnit XML (``to_junit``): one testsuite per case, one testcase per tap (classname ``conformance.<case>``), a
failure element for every failing tap, skipped for xfailed and not-provided taps, and an error testcase for a case
that could not be checked; a case with a generation record adds testcases gen/token_ids, gen/padding_mask and
gen/step_logits. HTML (``to_html``): a summary table, then per case an inline SVG of log10(max rel error)
and log10(tolerance / max|ref|) against depth (tap index in forward order), and the tap table; no dependencies.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from conformance.harness import GEN_PADDING_MASK, GEN_TOKEN_IDS, CaseResult, GenerationResult, TapResult, exit_code

REPORT_SCHEMA_VERSION = 1
MAX_DETAIL_ROWS = 25
STATUS_WORD = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}


# ---- numbers ---------------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return format(value, spec)


def jsonable(value: Any) -> Any:
    """Dataclasses, tuples and non-finite floats turned into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return jsonable(value.item())
    return value


# ---- terminal --------------------------------------------------------------------------------------------------
def _worst_tap(result: CaseResult) -> TapResult | None:
    passing = [t for t in result.taps if t.status == "pass" and t.budget is not None]
    return max(passing, key=lambda t: t.budget) if passing else None


def summary_line(result: CaseResult) -> str:
    word = STATUS_WORD.get(result.status, result.status.upper())
    head = f"{word:5s} {result.case}  [{result.backend}]"
    if result.status == "error":
        return f"{head}  {result.error}"
    compared = sum(t.compared for t in result.taps)
    excluded = f"; {result.excluded_positions} padded positions excluded" if result.excluded_positions else ""
    mode = "; teacher-forced blocks" if result.teacher_forced else ""
    generation = f"; {generation_summary(result.generation)}" if result.generation is not None else ""
    if result.divergence is not None:
        d = result.divergence
        return (f"{head}  first divergence {d.tap} ({d.kind}): {fmt(d.budget)}x tolerance, {d.verdict}"
                f"  [{compared} taps compared{excluded}{mode}{generation}]")
    if result.status == "fail" and result.error:
        return f"{head}  {result.error}"
    if result.status == "fail":  # the taps conform, the generation does not
        return f"{head}  {generation_summary(result.generation)}  [{compared} taps compared, all conform]"
    worst = _worst_tap(result)
    at = f", worst {fmt(worst.budget)}x tolerance at {worst.name}" if worst and worst.budget > 0 else (
        ", every tap identical to the reference" if worst else "")
    xfailed = sum(t.status == "xfail" for t in result.taps)
    xfail = f"; {xfailed} xfailed" if xfailed else ""
    return f"{head}  {compared} taps compared{at}{xfail}{excluded}{mode}{generation}  ({result.seconds:.2f} s)"


def generation_summary(g: GenerationResult) -> str:
    """One phrase: how the generation check went."""
    if g.status == "not_provided":
        return f"generation not checked ({g.message})"
    if g.message:
        return f"generation fails: {g.message}"
    if g.token_ids == "fail":
        return f"generation: {g.token_message}"
    if g.padding_mask == "fail":
        return f"generation: {g.padding_mask_message}"
    tap = g.logits
    if tap is not None and tap.status == "fail":
        return f"generation: step logits fail ({tap.message})"
    logits = (f", step logits {fmt(tap.budget)}x tolerance" if tap is not None and tap.metrics is not None
              else f", {tap.message}" if tap is not None and tap.message else "")
    xfailed = [n for n, st in ((GEN_TOKEN_IDS, g.token_ids), (GEN_PADDING_MASK, g.padding_mask),
                               (tap.name if tap else "", tap.status if tap else "")) if st == "xfail"]
    xfail = f" ({', '.join(xfailed)} xfailed)" if xfailed else ""
    return f"generation: {g.reference_steps} steps, token ids and padding mask equal{logits}{xfail}"


def generation_lines(g: GenerationResult) -> list[str]:
    """The detail lines of a generation check (terminal and HTML)."""
    stops = "none" if g.stop_token_ids is None else str(g.stop_token_ids)
    lines = [f"  generation: {g.status}, max_length {g.max_length}, stop ids {stops}, {g.reference_steps} reference "
             f"steps from text position {g.first_index}"]
    if g.status == "not_provided" or g.message:
        return lines + [f"    {g.message}"]
    lines.append(f"    token ids: {g.token_ids}" + (f" - {g.token_message}" if g.token_message else ""))
    lines.append(f"    padding mask: {g.padding_mask}" + (f" - {g.padding_mask_message}" if g.padding_mask_message
                                                          else ""))
    tap = g.logits
    if tap is None:
        return lines
    if tap.metrics is None or not (tap.metrics.shape_ok and tap.metrics.dtype_ok):
        return lines + [f"    step logits: {tap.status} - {tap.message}"]
    m = tap.metrics
    lines.append(f"    step logits: {tap.status}, {g.logits_compared_steps} steps compared, max|err| {fmt(m.max_abs)}, "
                 f"{fmt(m.budget_used)}x tolerance, top-1 agreement {fmt(m.top1_agreement, '.3f')}"
                 + (f" - {tap.message}" if tap.message else ""))
    if tap.tolerance is not None:
        lines.append(f"      tolerance: {tap.tolerance.source}")
    if tap.status != "pass":
        lines += [f"      at [step, row, token] {list(w['index'])}: candidate {w['value']:.7g}, reference "
                  f"{w['ref']:.7g}" for w in m.worst]
    return lines


TABLE_COLUMNS = ("status", "tap", "kind", "max|err|", "max rel", "x tol", "ulp", "cosine", "nmse dB", "out %")


def tap_row(t: TapResult) -> list[str]:
    m = t.metrics
    if m is None or not (m.shape_ok and m.dtype_ok):
        return [t.status, t.name, t.kind, "-", "-", fmt(t.budget), "-", "-", "-", t.message or "-"]
    return [t.status + ("*" if t.mode == "teacher_forced" else ""), t.name, t.kind, fmt(m.max_abs), fmt(m.max_rel),
            fmt(m.budget_used), fmt(m.max_ulp, ".0f") if m.max_ulp is not None else "-", fmt(m.cosine, ".6f"),
            fmt(m.nmse_db, ".1f"), fmt(None if m.frac_out is None else 100 * m.frac_out, ".2f")]


def format_table(rows: list[list[str]], header: Sequence[str] = TABLE_COLUMNS, indent: str = "    ") -> str:
    widths = [max(len(str(r[i])) for r in [list(header)] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [list(header)] + rows]
    return "\n".join(indent + line for line in lines)


def _divergence_lines(result: CaseResult) -> list[str]:
    d = result.divergence
    first = result.tap(d.tap)
    tol = first.tolerance
    lines = [f"  first divergence: {d.tap} [{d.kind}, {d.mode}]  {first.message}"]
    if tol is not None:
        lines.append(f"    tolerance: {tol.source}")
    lines.append(f"    {d.explanation}")
    for u in d.upstream:
        lines.append(f"    upstream {u['tap']}: {u['status']}, max|err| {fmt(u['max_abs'])}, max rel "
                     f"{fmt(u['max_rel'])}, {fmt(u['budget'])}x tolerance")
    m = first.metrics
    for w in (m.worst if m is not None else []):
        lines.append(f"    at {list(w['index'])}: candidate {w['value']:.7g}, reference {w['ref']:.7g} "
                     f"(|err| {w['abs_err']:.3g})")
    if m is not None and m.top1_agreement is not None:
        lines.append(f"    logits: top-1 agreement {m.top1_agreement:.3f}, top-5 overlap {m.top5_overlap:.3f}, "
                     f"mean KL {m.mean_kl:.3g} nats")
    return lines


def case_detail(result: CaseResult, verbose: bool = False) -> str:
    """The lines under a case: divergence first, then the taps that did not pass (all taps if ``verbose``)."""
    lines = [f"  note: {note}" for note in result.notes]
    if result.divergence is not None:
        lines += _divergence_lines(result)
    shown = result.taps if verbose else [t for t in result.taps if t.status not in ("pass", "not_provided")]
    if result.divergence is not None:
        shown = [result.tap(result.divergence.tap)] + [t for t in shown if t.name != result.divergence.tap]
    if shown:
        rows = [tap_row(t) for t in shown[:MAX_DETAIL_ROWS if not verbose else None]]
        lines.append(format_table(rows))
        if len(shown) > len(rows):
            lines.append(f"    ... and {len(shown) - len(rows)} more taps not passing (see the JSON report)")
        if any(t.mode == "teacher_forced" for t in shown):
            lines.append("    * teacher-forced: the block ran on the golden block input")
    not_provided = [t.name for t in result.taps if t.status == "not_provided"]
    if not_provided:
        lines.append(f"  {len(not_provided)} taps not provided by the backend (e.g. {', '.join(not_provided[:3])})")
    xfailed = [t for t in result.taps if t.status == "xfail"]
    lines += [f"  xfail {t.name}: {t.xfail_reason}" for t in xfailed]
    if result.generation is not None and (verbose or result.generation.status == "fail"):
        lines += generation_lines(result.generation)
    return "\n".join(lines)


def format_terminal(results: Sequence[CaseResult], verbose: bool = False) -> str:
    lines = []
    for result in results:
        lines.append(summary_line(result))
        if result.status != "pass" or verbose or result.notes or any(t.status == "xfail" for t in result.taps):
            detail = case_detail(result, verbose)
            if detail:
                lines.append(detail)
    counts = {status: sum(r.status == status for r in results) for status in ("pass", "fail", "error")}
    lines.append(f"{len(results)} cases: {counts['pass']} conform, {counts['fail']} diverge, "
                 f"{counts['error']} could not be checked")
    return "\n".join(lines)


# ---- JSON ------------------------------------------------------------------------------------------------------
def tap_json(t: TapResult) -> dict:
    return {"name": t.name, "index": t.index, "kind": t.kind, "status": t.status, "mode": t.mode, "format": t.fmt,
            "excluded_positions": t.excluded_positions, "message": t.message, "xfail_reason": t.xfail_reason,
            "tolerance": None if t.tolerance is None else t.tolerance.to_dict(),
            "metrics": None if t.metrics is None else jsonable(t.metrics)}


def case_json(r: CaseResult) -> dict:
    return jsonable({"case": r.case, "backend": r.backend, "status": r.status, "error": r.error, "notes": r.notes,
                     "candidate_dtype": r.candidate_dtype, "teacher_forced": r.teacher_forced,
                     "excluded_positions": r.excluded_positions, "seconds": r.seconds,
                     "first_divergence": r.divergence, "taps": [tap_json(t) for t in r.taps],
                     "free_run_taps": [tap_json(t) for t in r.free_run_taps],
                     "generation": None if r.generation is None else generation_json(r.generation)})


def generation_json(g: GenerationResult) -> dict:
    document = {f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.name != "logits"}
    document["logits"] = None if g.logits is None else tap_json(g.logits)
    return jsonable(document)


def to_json(results: Sequence[CaseResult], options: Any = None) -> dict:
    """The JSON report document (see the module docstring for its schema)."""
    return {"schema": "paligemma-ref conformance report", "schema_version": REPORT_SCHEMA_VERSION,
            "summary": {"cases": len(results), "passed": sum(r.status == "pass" for r in results),
                        "failed": sum(r.status == "fail" for r in results),
                        "errors": sum(r.status == "error" for r in results), "exit_code": exit_code(results)},
            "options": jsonable(options) if options is not None else None,
            "cases": [case_json(r) for r in results]}


def dumps_json(results: Sequence[CaseResult], options: Any = None) -> str:
    return json.dumps(to_json(results, options), indent=1, allow_nan=False)


# ---- JUnit XML -------------------------------------------------------------------------------------------------
def _tap_details(t: TapResult) -> str:
    m = t.metrics
    parts = [t.message]
    if t.tolerance is not None:
        parts.append(f"tolerance: {t.tolerance.source}")
    if m is not None:
        parts += [f"at {list(w['index'])}: candidate {w['value']:.7g}, reference {w['ref']:.7g}" for w in m.worst]
    return "\n".join(p for p in parts if p)


def _junit_generation(suite: ET.Element, r: CaseResult, counts: dict[str, int]) -> None:
    """Testcases gen/token_ids, gen/padding_mask and gen/step_logits of a case's generation check."""
    g = r.generation
    tap = g.logits
    parts = [(GEN_TOKEN_IDS, g.token_ids, g.token_message or g.message),
             (GEN_PADDING_MASK, g.padding_mask, g.padding_mask_message or g.message),
             ("gen/step_logits", tap.status if tap else "not_compared", (tap.message if tap else "") or g.message)]
    for name, status, message in parts:
        if g.status == "not_provided":
            status = "not_provided"
        elif g.message:  # the candidate's arrays could not be compared at all
            status = "fail"
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{r.case}", name=name, time="0")
        counts["tests"] += 1
        if status == "fail":
            details = _tap_details(tap) if name == "gen/step_logits" and tap is not None else message
            ET.SubElement(case, "failure", message=message or "fail", type="generation").text = details
            counts["failures"] += 1
        elif status != "pass":
            ET.SubElement(case, "skipped", message=f"{status}: {message}" if message else status)
            counts["skipped"] += 1


def to_junit(results: Sequence[CaseResult]) -> str:
    """JUnit XML: a testsuite per case, a testcase per tap."""
    root = ET.Element("testsuites", name="paligemma-ref conformance")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for r in results:
        suite = ET.SubElement(root, "testsuite", name=r.case, time=f"{r.seconds:.3f}")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if r.status == "error" or (r.status == "fail" and not r.taps):
            case = ET.SubElement(suite, "testcase", classname=f"conformance.{r.case}", name="(case)")
            tag = "error" if r.status == "error" else "failure"
            ET.SubElement(case, tag, message=r.error or r.status).text = "\n".join(r.notes)
            counts["tests"] += 1
            counts["errors" if tag == "error" else "failures"] += 1
        for t in r.taps:
            case = ET.SubElement(suite, "testcase", classname=f"conformance.{r.case}", name=t.name, time="0")
            counts["tests"] += 1
            if t.status in ("fail", "missing"):
                first = r.divergence is not None and r.divergence.tap == t.name
                message = ("FIRST DIVERGENCE: " if first else "") + (t.message or t.status)
                ET.SubElement(case, "failure", message=message, type=t.status).text = _tap_details(t)
                counts["failures"] += 1
            elif t.status in ("xfail", "not_provided"):
                reason = f"xfail: {t.xfail_reason}" if t.status == "xfail" else "not provided by the backend"
                ET.SubElement(case, "skipped", message=reason)
                counts["skipped"] += 1
        if r.generation is not None:
            _junit_generation(suite, r, counts)
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
    for key, value in totals.items():
        root.set(key, str(value))
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


# ---- HTML ------------------------------------------------------------------------------------------------------
PLOT_W, PLOT_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 900, 280, 60, 20, 20, 40
LOG_FLOOR = -17.0  # log10 of a relative error of zero is drawn here


def _log_rel(value: float | None, scale: float | None) -> float | None:
    if value is None or scale is None:
        return None
    if scale <= 0 or not math.isfinite(value):
        return None if not math.isfinite(value) else LOG_FLOOR
    rel = value / scale
    return max(math.log10(rel), LOG_FLOOR) if rel > 0 else LOG_FLOOR


def _plot_points(result: CaseResult) -> list[tuple[TapResult, float | None, float | None]]:
    points = []
    for t in result.taps:
        m = t.metrics
        if not t.compared or m is None or m.scale is None or t.kind == "mask":
            continue
        points.append((t, _log_rel(m.max_abs, m.scale), _log_rel(t.tolerance.atol, m.scale) if t.tolerance else None))
    return points


@dataclass(frozen=True)
class _Axes:
    """Maps (tap index, log10 value) to SVG pixels."""

    low: int
    high: int
    last: int

    def x(self, index: int) -> float:
        return MARGIN_L + (PLOT_W - MARGIN_L - MARGIN_R) * index / self.last

    def y(self, value: float) -> float:
        return MARGIN_T + (PLOT_H - MARGIN_T - MARGIN_B) * (self.high - value) / (self.high - self.low)


def _svg_frame(axes: _Axes) -> list[str]:
    """Plot area, decade gridlines (labelled, the bottom one "0" if it is the zero floor), titles, legend."""
    inner_w, inner_h = PLOT_W - MARGIN_L - MARGIN_R, PLOT_H - MARGIN_T - MARGIN_B
    parts = [f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{inner_w}" height="{inner_h}" fill="#fafafa" stroke="#999"/>']
    step = 1 if axes.high - axes.low <= 10 else 2
    for decade in range(axes.low, axes.high + 1, step):
        label = "0" if decade <= LOG_FLOOR else f"1e{decade}"
        parts.append(f'<line x1="{MARGIN_L}" x2="{PLOT_W - MARGIN_R}" y1="{axes.y(decade):.1f}" '
                     f'y2="{axes.y(decade):.1f}" stroke="#e0e0e0"/>')
        parts.append(f'<text x="{MARGIN_L - 6}" y="{axes.y(decade) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{label}</text>')
    parts.append(f'<text x="{MARGIN_L + inner_w / 2}" y="{PLOT_H - 8}" font-size="12" text-anchor="middle">'
                 'tap index (forward order)</text>')
    parts.append(f'<text x="14" y="{MARGIN_T + inner_h / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {MARGIN_T + inner_h / 2})">max |err| / max |ref|</text>')
    legend_x = PLOT_W - MARGIN_R - 250
    parts.append(f'<line x1="{legend_x}" x2="{legend_x + 20}" y1="{PLOT_H - 12}" y2="{PLOT_H - 12}" '
                 'stroke="#1f5fbf" stroke-width="1.5"/>')
    parts.append(f'<text x="{legend_x + 24}" y="{PLOT_H - 8}" font-size="11">error</text>')
    parts.append(f'<line x1="{legend_x + 70}" x2="{legend_x + 90}" y1="{PLOT_H - 12}" y2="{PLOT_H - 12}" '
                 'stroke="#888" stroke-dasharray="4 3" stroke-width="1.5"/>')
    parts.append(f'<text x="{legend_x + 94}" y="{PLOT_H - 8}" font-size="11">tolerance (red: over it)</text>')
    return parts


def _svg_towers(axes: _Axes, taps: Sequence[TapResult]) -> list[str]:
    """A dashed vertical line and a label where the image tower and the text tower start."""
    parts = []
    for prefix, label in (("img/", "image tower"), ("llm/", "text tower")):
        first = next((t.index for t in taps if t.name.startswith(prefix)), None)
        if first is not None:
            parts.append(f'<line x1="{axes.x(first):.1f}" x2="{axes.x(first):.1f}" y1="{MARGIN_T}" '
                         f'y2="{PLOT_H - MARGIN_B}" stroke="#bbb" stroke-dasharray="2 4"/>')
            parts.append(f'<text x="{axes.x(first) + 4:.1f}" y="{MARGIN_T + 12}" font-size="11" '
                         f'fill="#666">{label}</text>')
    return parts


def _svg_series(axes: _Axes, points, result: CaseResult) -> list[str]:
    parts = []
    for series, colour, dash in ((2, "#888", ' stroke-dasharray="4 3"'), (1, "#1f5fbf", "")):
        coords = " ".join(f"{axes.x(p[0].index):.1f},{axes.y(p[series]):.1f}" for p in points
                          if p[series] is not None)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{coords}"/>')
    for t, error, _ in points:
        if error is None:
            continue
        first = result.divergence is not None and result.divergence.tap == t.name
        colour = "#d62728" if t.status in ("fail", "xfail") else "#1f5fbf"
        parts.append(f'<circle cx="{axes.x(t.index):.1f}" cy="{axes.y(error):.1f}" r="{5 if first else 3}" '
                     f'fill="{colour}"><title>{html.escape(t.name)}: {t.status}, max rel '
                     f'{fmt(10 ** error if error > LOG_FLOOR else 0.0)}, {fmt(t.budget)}x tolerance</title></circle>')
    return parts


def svg_plot(result: CaseResult) -> str:
    """Inline SVG: log10 max rel error (blue, red where failing) and tolerance (grey) against tap index."""
    points = _plot_points(result)
    if not points:
        return "<p>(no float taps compared)</p>"
    values = [v for _, error, tol in points for v in (error, tol) if v is not None] or [0.0]
    low = math.floor(min(values))
    axes = _Axes(low, max(math.ceil(max(values) + 1e-9), low + 1), max(t.index for t, _, _ in points) or 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{PLOT_H}" role="img" '
             f'aria-label="error against depth for {html.escape(result.case)}">']
    parts += _svg_frame(axes) + _svg_towers(axes, result.taps) + _svg_series(axes, points, result)
    parts.append("</svg>")
    return "\n".join(parts)


def _html_table(rows: list[list[str]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr class='{}'>{}</tr>".format(html.escape(r[0].rstrip("*")),
                                                   "".join(f"<td>{html.escape(str(c))}</td>" for c in r))
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(results: Sequence[CaseResult], title: str = "PaliGemma conformance report") -> str:
    """A standalone HTML page: summary, then per case the divergence, an SVG error-vs-depth plot and all taps."""
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:12px} "
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left} tr.fail td,tr.missing td{background:#fdd} "
             "tr.xfail td{background:#ffe} .pass{color:#161} .fail,.error{color:#b11} pre{background:#f4f4f4;"
             "padding:8px}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    summary = [[STATUS_WORD.get(r.status, r.status), r.case, r.backend,
                r.divergence.tap if r.divergence else (r.error or (generation_summary(r.generation)
                                                                   if r.generation and r.status == "fail" else "-")),
                r.divergence.verdict if r.divergence else "-"] for r in results]
    parts.append(_html_table(summary, ("status", "case", "backend", "first divergence / error", "verdict")))
    for r in results:
        parts.append(f"<h2 class='{r.status}'>{html.escape(STATUS_WORD.get(r.status, r.status))} "
                     f"{html.escape(r.case)}</h2><p>{html.escape(summary_line(r))}</p>")
        if r.status != "pass":
            detail = case_detail(r)
            if detail:
                parts.append(f"<pre>{html.escape(detail)}</pre>")
        elif r.generation is not None:
            parts.append(f"<pre>{html.escape(chr(10).join(generation_lines(r.generation)))}</pre>")
        if r.taps:
            parts.append(svg_plot(r))
            parts.append(_html_table([tap_row(t) for t in r.taps], TABLE_COLUMNS))
    parts.append("</body></html>")
    return "\n".join(parts)
