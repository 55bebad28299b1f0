"""Run a backend on a golden case and compare its taps with the reference in forward order.

    result = check_case(load_case("golden", "pg1_basic"), RefimplBackend(), CheckOptions())
    result.status            # "pass", "fail" or "error"
    result.divergence        # the first tap over tolerance, with its upstream taps' errors beside it

Per tap, in the order of case.json ``taps``: presence (a missing required tap fails; other missing taps are "not
provided"), shape, dtype (floating, or bool for masks), then values against the tolerance of
``conformance.tolerances``. Taps matching an xfail regex that fail are reported as "xfail" and do not fail the case.

First divergence. The headline is the first failing tap in forward order. Beside it stand its upstream taps: the
nearest compared taps it is computed from (``llm/layer02/attn_out`` from ``llm/layer02/pre_attn_norm`` and
``llm/mask``; an ``out`` from the block's ``attn_residual`` and its MLP output; when a backend does not provide a
tap, the walk goes further up). With budget b = max |d| / (atol + rtol |ref|) (b > 1 fails):

    introduced    b(tap) > INTRODUCED_FACTOR * max b(upstream): the error grew here more than propagation explains,
                  or the tap depends on no other tap (pixels, text embedding, mask), or the block input was golden
    inherited     an upstream tap was already over its tolerance (xfailed), or the error only grew by at most
                  INTRODUCED_FACTOR from what upstream carried in (accumulated drift)
    undetermined  no upstream tap was compared (the backend did not provide them)

Teacher-forced mode (``CheckOptions(teacher_forced=True)``, backends with ``run_block``): every ViT block and
decoder block is also run on the GOLDEN block input, and those block taps replace the free-running ones, so each
block's own (introduced) error is measured apart from what earlier blocks passed on. The free run's block taps are
kept in ``CaseResult.free_run_taps``; they are the upstream of free-run taps after the blocks (img/encoded, ...).

Padded positions: keras-hub, big_vision and HF disagree on queries at padding positions, and the reference leaves
them undefined, so for ``llm/`` taps whose axis 1 has length L (image + text) or T (text, logits) only positions
with padding_mask True (and all image positions) are compared, unless ``include_padding``; masks lose the padded
query rows only. Every result says how many positions were excluded.

Generation. A case may hold a generation record (case.json ``generation``): greedy generation with keras-hub's
``PaliGemmaCausalLM.generate`` semantics on ragged prompts, from refimpl in float64. When the backend implements
``generate`` (``conformance.backend``), ``check_generation`` runs it on the record's inputs and compares:

    gen/token_ids       exactly, at every position the reference's returned padding_mask keeps (after a row's stop
                        token keras goes on writing tokens nobody keeps); the first differing position is reported
                        as its generation step (position - shortest prompt length) with the rows that differ there
    gen/padding_mask    the returned mask, exactly
    gen/step_logits     f[steps, B, V], if returned: for the steps up to and including the first token divergence
                        (later steps are fed other tokens) and the (step, row)s whose predicted position the
                        reference keeps, within the "generation logits" tolerance (derived from the record's own
                        float32 envelope like every tap's), and with the same argmax everywhere (top-1 agreement 1)

Any of them failing fails the case (exit code 1); ``--xfail`` regexes apply to these three names too. A backend
without ``generate`` (or returning None) gets "not provided", which does not fail. ``CheckOptions(generation=False)``
(``--no-generation``) skips the check.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from conformance import metrics as metrics_lib
from conformance import tolerances
from conformance.backend import BLOCK_KINDS, BackendUnavailable, block_prefix, capabilities_of
from conformance.cases import Case, CaseError, GenerationRecord, list_cases, load_case
from conformance.metrics import TapMetrics
from conformance.tolerances import Tolerance
from refimpl.taps import REQUIRED_TAPS

INTRODUCED_FACTOR = 4.0  # budget growth from upstream to tap above which the error counts as introduced there
TAP_STATUSES = ("pass", "fail", "missing", "xfail", "not_provided")
FAILING = ("fail", "missing")


@dataclass(frozen=True)
class CheckOptions:
    """How to check. Regexes use ``re.search`` on tap names."""

    include: str | None = None  # compare only taps matching this
    exclude: str | None = None  # and not matching this
    include_padding: bool = False
    teacher_forced: bool = False
    candidate_dtype: str | None = None  # tolerance row; default: the backend's, else each array's dtype
    tolerance_overrides: tuple[tuple[str, float, float], ...] = ()  # (regex, atol, rtol), over case.json's
    xfail: tuple[tuple[str, str], ...] = ()  # (regex, reason); also matched against gen/token_ids, gen/padding_mask,
    # gen/step_logits
    generation: bool = True  # check the case's generation record with the backend's generate(), if both exist


@dataclass
class TapResult:
    name: str
    index: int  # position in the case's forward order
    kind: str
    status: str  # one of TAP_STATUSES
    mode: str = "run"  # "run" or "teacher_forced"
    fmt: str | None = None  # the tolerance row used
    tolerance: Tolerance | None = None
    metrics: TapMetrics | None = None
    excluded_positions: int = 0
    message: str = ""
    xfail_reason: str | None = None

    @property
    def budget(self) -> float | None:
        """max |d| / (atol + rtol |ref|); None when nothing was compared."""
        if self.metrics is None or not (self.metrics.shape_ok and self.metrics.dtype_ok):
            return None if self.metrics is None else float("inf")
        return self.metrics.budget_used

    @property
    def compared(self) -> bool:
        return self.status in ("pass", "fail", "xfail") and self.metrics is not None


@dataclass
class Divergence:
    """The first tap over tolerance and what feeds it."""

    tap: str
    kind: str
    mode: str
    budget: float
    verdict: str  # "introduced", "inherited" or "undetermined"
    explanation: str
    upstream: list[dict] = field(default_factory=list)  # [{"tap", "status", "budget", "max_abs", "max_rel"}]


@dataclass
class CaseResult:
    case: str
    backend: str
    status: str  # "pass", "fail" or "error"
    taps: list[TapResult] = field(default_factory=list)
    divergence: Divergence | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    candidate_dtype: str | None = None
    excluded_positions: int = 0
    teacher_forced: bool = False
    seconds: float = 0.0
    free_run_taps: list[TapResult] = field(default_factory=list)  # teacher-forced mode: the free run's block taps
    generation: "GenerationResult | None" = None  # None: the case has no generation record, or --no-generation

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def tap(self, name: str) -> TapResult:
        for result in self.taps:
            if result.name == name:
                return result
        raise KeyError(f"tap {name!r} is not in the result of case {self.case!r}")


# ---- dataflow between taps -------------------------------------------------------------------------------------
def _block_input(kind: str, index: int) -> str:
    if kind == "vit":
        return "img/embed" if index == 0 else f"img/block{index - 1:02d}/out"
    return "llm/input" if index == 0 else f"llm/layer{index - 1:02d}/out"


def _vit_block_producers(index: int, step: str) -> tuple[str, ...]:
    p, x = block_prefix("vit", index), _block_input("vit", index)
    return {"ln1": (x,), "attn_out": (p + "ln1",), "attn_residual": (x, p + "attn_out"), "ln2": (p + "attn_residual",),
            "mlp_out": (p + "ln2",), "out": (p + "attn_residual", p + "mlp_out")}[step]


def _decoder_block_producers(index: int, step: str, post_attn: bool, post_ffw: bool) -> tuple[str, ...]:
    p, x = block_prefix("decoder", index), _block_input("decoder", index)
    attn = p + ("post_attn_norm" if post_attn else "attn_out")
    ffw = p + ("post_ffw_norm" if post_ffw else "ffw_out")
    return {"pre_attn_norm": (x,), "attn_out": (p + "pre_attn_norm", "llm/mask"), "post_attn_norm": (p + "attn_out",),
            "attn_residual": (x, attn), "pre_ffw_norm": (p + "attn_residual",), "ffw_out": (p + "pre_ffw_norm",),
            "post_ffw_norm": (p + "ffw_out",), "out": (p + "attn_residual", ffw)}[step]


def producers(name: str, case: Case) -> tuple[str, ...]:
    """The taps ``name`` is computed from directly (refimpl/taps.py definitions), whether recorded or not."""
    c = case.parsed_config
    match = re.fullmatch(r"(img/block|llm/layer)(\d+)/(\w+)", name)
    if match and match.group(1) == "img/block":
        return _vit_block_producers(int(match.group(2)), match.group(3))
    if match:
        return _decoder_block_producers(int(match.group(2)), match.group(3), c.use_post_attention_norm,
                                        c.use_post_ffw_norm)
    last_vit = f"img/block{c.vit_num_layers - 1:02d}/out" if c.vit_num_layers else "img/embed"
    last_llm = f"llm/layer{c.num_layers - 1:02d}/out" if c.num_layers else "llm/input"
    return {"img/pixels": (), "img/embed": ("img/pixels",), "img/encoded": (last_vit,), "img/proj": ("img/encoded",),
            "llm/embed_text": (), "llm/input": ("img/proj", "llm/embed_text"), "llm/mask": (),
            "llm/final_norm": (last_llm,), "llm/logits": ("llm/final_norm",)}[name]


def nearest_upstream(name: str, case: Case, compared: Mapping[str, TapResult], golden_inputs: set[str]) -> list[str]:
    """The nearest compared taps upstream of ``name``; the walk stops at taps in ``golden_inputs``."""
    found, stack, seen = [], list(producers(name, case)), set()
    while stack:
        parent = stack.pop(0)
        if parent in seen or parent in golden_inputs:
            continue
        seen.add(parent)
        if parent in compared:
            found.append(parent)
        else:
            stack.extend(producers(parent, case))
    return found


def _upstream_entry(result: TapResult) -> dict:
    m = result.metrics
    return {"tap": result.name, "status": result.status, "mode": result.mode, "budget": result.budget,
            "max_abs": None if m is None else m.max_abs, "max_rel": None if m is None else m.max_rel}


def _upstream_results(case: Case, first: TapResult, results: list[TapResult],
                      free_run: Sequence[TapResult]) -> list[TapResult]:
    """Compared taps nearest upstream of ``first``: free-run ones for a free-run tap, and for a teacher-forced
    block tap the walk stops at the block input (golden)."""
    by_name = {r.name: r for r in results if r.compared}
    if first.mode == "run":
        by_name = {n: r for n, r in by_name.items() if r.mode == "run"} | {r.name: r for r in free_run if r.compared}
    golden = set()
    block = re.match(r"(img/block\d+|llm/layer\d+)/", first.name)
    if first.mode == "teacher_forced" and block:
        golden = {n for n in case.taps if not n.startswith(block.group(0)) and n != "llm/mask"}
    return [by_name[n] for n in nearest_upstream(first.name, case, by_name, golden)]


def _classify(case: Case, first: TapResult, upstream: list[TapResult], budget: float) -> tuple[str, str]:
    """(verdict, explanation) of the first divergence; see the module docstring."""
    if first.status == "missing":
        return "undetermined", first.message
    if not upstream:
        if not producers(first.name, case):
            return "introduced", "introduced: this tap is computed from the inputs alone"
        if first.mode == "teacher_forced":
            return "introduced", "introduced: teacher-forced, the block input was the golden tensor"
        return "undetermined", "undetermined: no tap upstream of it was compared (provide more taps to locate it)"
    worst = max(upstream, key=lambda u: u.budget if u.budget is not None else -1.0)
    up = worst.budget or 0.0
    if up > 1:
        return "inherited", f"inherited: upstream {worst.name} is already over its tolerance ({up:.3g}x)"
    if budget > INTRODUCED_FACTOR * up:
        return "introduced", (f"introduced: {budget:.3g}x its tolerance here, upstream {worst.name} used {up:.3g}x "
                              f"of its own (grew more than {INTRODUCED_FACTOR:g}x)")
    return "inherited", (f"inherited: upstream {worst.name} already used {up:.3g}x of its tolerance; {budget:.3g}x "
                         "here is accumulated drift, not a new error")


def find_divergence(case: Case, results: list[TapResult], free_run: Sequence[TapResult] = ()) -> Divergence | None:
    """The first failing tap, its upstream taps, and whether its error was introduced there or inherited.

    ``free_run``: in teacher-forced mode, the block taps of the free-running pass; a tap computed in the free run
    (outside the blocks) is judged against those, not against the teacher-forced block taps.
    """
    first = next((r for r in results if r.status in FAILING), None)
    if first is None:
        return None
    upstream = _upstream_results(case, first, results, free_run)
    budget = first.budget if first.budget is not None else float("inf")
    verdict, why = _classify(case, first, upstream, budget)
    return Divergence(first.name, first.kind, first.mode, budget, verdict, why, [_upstream_entry(u) for u in upstream])


# ---- comparing -------------------------------------------------------------------------------------------------
def selected_taps(case: Case, options: CheckOptions) -> list[str]:
    return [t for t in case.taps if (options.include is None or re.search(options.include, t))
            and not (options.exclude and re.search(options.exclude, t))]


def position_masks(case: Case) -> dict[int, np.ndarray]:
    """{sequence length: bool[B, length] of positions to compare}: L (image + text) and T (text)."""
    padding = case.inputs["padding_mask"]
    batch, text = padding.shape
    image = np.ones((batch, case.image_tokens), dtype=bool)
    return {case.image_tokens + text: np.concatenate([image, padding], axis=1), text: padding}


def keep_mask(name: str, reference: np.ndarray, case: Case, include_padding: bool) -> np.ndarray | None:
    """bool[B, length] of compared positions for ``llm/`` taps with a sequence axis 1, else None (everything)."""
    if include_padding or not name.startswith("llm/") or reference.ndim < 2:
        return None
    masks = position_masks(case)
    keep = masks.get(reference.shape[1])
    if keep is None or reference.shape[0] != keep.shape[0] or keep.all():
        return None
    return keep


def _format_for(options: CheckOptions, caps_dtype: str | None, candidate: np.ndarray) -> str:
    if options.candidate_dtype or caps_dtype:
        return tolerances.candidate_format(options.candidate_dtype or caps_dtype)
    if candidate.dtype in (np.float16, np.float32, np.float64):
        return str(candidate.dtype)
    return "float32"


def compare_tap(case: Case, name: str, index: int, candidate: np.ndarray | None, options: CheckOptions,
                caps_dtype: str | None, mode: str) -> TapResult:
    """Compare one tap of ``case`` with the candidate's array (None: the backend did not provide it)."""
    kind = tolerances.tap_kind(name)
    result = TapResult(name=name, index=index, kind=kind, status="pass", mode=mode)
    if candidate is None:
        result.status = "missing" if name in REQUIRED_TAPS else "not_provided"
        result.message = "required tap not provided by the backend" if result.status == "missing" else ""
        return result
    reference, candidate = case.golden[name], np.asarray(candidate)
    keep = keep_mask(name, reference, case, options.include_padding)
    result.excluded_positions = 0 if keep is None else int(np.count_nonzero(~keep))
    result.fmt = _format_for(options, caps_dtype, candidate)
    compared_ref = reference if keep is None else reference[keep]
    scale = float(np.max(np.abs(compared_ref))) if compared_ref.size and reference.dtype != bool else 0.0
    envelopes = {"float32": case.float32_envelope.get(name), "bfloat16": case.bfloat16_envelope.get(name)}
    result.tolerance = tolerances.resolve(name, result.fmt, scale, envelopes,
                                          case_overrides=case.tolerance_overrides,
                                          cli_overrides=options.tolerance_overrides)
    keep_for_shape = keep if keep is not None and candidate.shape == reference.shape else None
    result.metrics = metrics_lib.compare(candidate, reference, atol=result.tolerance.atol,
                                         rtol=result.tolerance.rtol, fmt=result.fmt, keep=keep_for_shape,
                                         logits=kind == "logits")
    result.status, result.message = _verdict(result)
    if result.status == "fail":
        result.xfail_reason = next((reason for pattern, reason in options.xfail if re.search(pattern, name)), None)
        if result.xfail_reason is not None:
            result.status = "xfail"
    return result


def _verdict(result: TapResult) -> tuple[str, str]:
    m, tol = result.metrics, result.tolerance
    if not m.shape_ok:
        return "fail", f"shape {list(m.candidate_shape)}, expected {list(m.reference_shape)}"
    if not m.dtype_ok:
        expected = "bool" if result.kind == "mask" else "a floating dtype"
        return "fail", f"dtype {m.candidate_dtype}, expected {expected}"
    if m.n_out == 0:
        return "pass", ""
    if tol.exact:
        return "fail", f"{m.n_out} of {m.compared} elements differ (masks compare exactly)"
    nonfinite = f", {m.nonfinite} non-finite" if m.nonfinite else ""
    return "fail", (f"max|err| {m.max_abs:.3g} = {m.budget_used:.3g}x tolerance (atol {tol.atol:.3g}"
                    f"{f', rtol {tol.rtol:.3g}' if tol.rtol else ''}); {m.n_out} of {m.compared} elements out"
                    f"{nonfinite}")


def _teacher_forced(case: Case, backend: Any, selected: list[str]) -> dict[str, np.ndarray]:
    """Block taps from run_block on golden block inputs, for every ViT and decoder block with selected taps."""
    if not callable(getattr(backend, "run_block", None)):
        raise CaseError(f"backend {backend.name!r} has no run_block(kind, index, block_input, inputs); "
                        "--teacher-forced needs it")
    config, out = case.parsed_config, {}
    for kind, count in zip(BLOCK_KINDS, (config.vit_num_layers, config.num_layers)):
        for index in range(count):
            prefix = block_prefix(kind, index)
            if not any(t.startswith(prefix) for t in selected):
                continue
            source = _block_input(kind, index)
            if source not in case.golden:
                raise CaseError(f"case {case.name!r} has no golden tap {source!r} to teacher-force {prefix}")
            block = backend.run_block(kind, index, case.golden[source].copy(), _copy(case.inputs))
            out.update({k: v for k, v in block.items() if k.startswith(prefix)})
    return out


def _copy(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.array(value, copy=True) for key, value in arrays.items()}


def _with_declared_xfails(options: CheckOptions, backend: Any) -> CheckOptions:
    """Add the (regex, reason) pairs a prepared backend declares for its case (``backend.xfail``, optional)."""
    declared = tuple(getattr(backend, "xfail", ()) or ())
    return replace(options, xfail=options.xfail + declared) if declared else options


# ---- generation ------------------------------------------------------------------------------------------------
GEN_TOKEN_IDS, GEN_PADDING_MASK = "gen/token_ids", "gen/padding_mask"  # names of the parts, for --xfail and reports


@dataclass
class TokenDivergence:
    """The first text position at which kept token ids differ, and the rows that differ there."""

    step: int | None  # generation step (0 = the first); None: a position before the first step (a prompt token)
    position: int  # text position (0 = bos)
    rows: list[int]
    candidate: list[int]  # those rows' ids at that position
    reference: list[int]
    reference_lead: list[float] = field(default_factory=list)  # per row: reference top-1 minus top-2 logit there

    def describe(self) -> str:
        where = f"step {self.step} (text position {self.position})" if self.step is not None else \
            f"text position {self.position}, inside every prompt"
        pairs = ", ".join(f"row {r}: {c} instead of {x}" for r, c, x in zip(self.rows, self.candidate, self.reference))
        lead = (f"; the reference's top-1 logit leads by {', '.join(f'{v:.3g}' for v in self.reference_lead)} there"
                if self.reference_lead else "")
        return f"token ids diverge at {where}: {pairs}{lead}"


@dataclass
class GenerationResult:
    """The check of one generation record: token ids and returned padding mask exactly, step logits in tolerance."""

    status: str  # "pass", "fail" or "not_provided"
    max_length: int
    stop_token_ids: list[int] | None
    first_index: int  # text position the first step predicts (the shortest prompt length)
    reference_steps: int
    candidate_steps: int | None = None  # rows of the candidate's step_logits (None: not provided)
    token_ids: str = "not_compared"  # "pass", "fail" or "xfail"
    token_divergence: TokenDivergence | None = None
    token_message: str = ""
    padding_mask: str = "not_compared"  # "pass", "fail" or "xfail"
    padding_mask_message: str = ""
    logits: TapResult | None = None  # gen/step_logits, kind "generation logits"; None when nothing was comparable
    logits_compared_steps: int = 0
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "fail"


def _xfail_reason(options: CheckOptions, name: str) -> str | None:
    return next((reason for pattern, reason in options.xfail if re.search(pattern, name)), None)


def _candidate_generation(out: Any, record: GenerationRecord) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """(token_ids, padding_mask, step_logits or None, problem): the candidate's arrays, checked for shape."""
    if not isinstance(out, Mapping) or "token_ids" not in out or "padding_mask" not in out:
        found = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        return None, None, None, f"generate() must return a dict with token_ids and padding_mask, found {found}"
    ids, mask = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"])
    shape = record.reference["token_ids"].shape
    if ids.shape != shape or not np.issubdtype(ids.dtype, np.integer):
        return None, None, None, f"token_ids are {ids.dtype}{list(ids.shape)}, expected int{list(shape)}"
    if mask.shape != shape or mask.dtype != bool:
        return None, None, None, f"padding_mask is {mask.dtype}{list(mask.shape)}, expected bool{list(shape)}"
    logits = out.get("step_logits")
    return ids, mask, None if logits is None else np.asarray(logits), ""


def _first_token_divergence(ids: np.ndarray, record: GenerationRecord) -> TokenDivergence | None:
    """Compare ids where the reference's returned padding_mask keeps them; the first differing position wins."""
    reference, kept = record.reference["token_ids"], record.reference["padding_mask"]
    differs = (ids != reference) & kept
    if not differs.any():
        return None
    position = int(np.flatnonzero(differs.any(axis=0))[0])
    rows = [int(r) for r in np.flatnonzero(differs[:, position])]
    step = position - record.first_index if position >= record.first_index else None
    lead = []
    if step is not None and step < record.steps:  # how close to a tie the reference's own choice was
        top = np.sort(record.reference["step_logits"][step, rows], axis=-1)
        lead = [float(v) for v in top[:, -1] - top[:, -2]]
    return TokenDivergence(step, position, rows, [int(ids[r, position]) for r in rows],
                           [int(reference[r, position]) for r in rows], lead)


def _padding_mask_message(mask: np.ndarray, record: GenerationRecord) -> str:
    differs = mask != record.reference["padding_mask"]
    if not differs.any():
        return ""
    row, position = (int(i) for i in np.argwhere(differs)[0])
    expected = bool(record.reference["padding_mask"][row, position])
    return (f"returned padding_mask differs in {int(differs.sum())} places, first at row {row}, text position "
            f"{position} ({bool(mask[row, position])} instead of {expected})")


def _compared_step_count(result: GenerationResult) -> int:
    """Steps whose logits are comparable: all of the reference's, up to and including the first token divergence
    (later steps are fed different tokens); none if a token before the first step differs."""
    d = result.token_divergence
    if d is None:
        return result.reference_steps
    return 0 if d.step is None else min(result.reference_steps, d.step + 1)


def _check_step_logits(case: Case, result: GenerationResult, logits: np.ndarray | None, options: CheckOptions,
                       caps_dtype: str | None) -> None:
    record, name = case.generation, tolerances.GENERATION_LOGITS
    n = _compared_step_count(result)
    tap = TapResult(name=name, index=len(case.taps), kind=tolerances.tap_kind(name), status="not_provided")
    result.logits = tap
    if logits is None:
        tap.message = "the backend returned no step_logits"
        return
    result.candidate_steps = int(logits.shape[0]) if logits.ndim else None
    reference = record.reference["step_logits"]
    if logits.ndim != 3 or logits.shape[1:] != reference.shape[1:] or logits.shape[0] < n:
        tap.status = "fail"
        tap.message = (f"step_logits {logits.dtype}{list(logits.shape)}, expected [{record.steps}, "
                       f"{reference.shape[1]}, {reference.shape[2]}] (at least {n} steps)")
        return
    if n == 0:
        tap.message = "no step is comparable (a prompt token differs)"
        return
    keep = record.compared_steps()[:n]
    tap.fmt = _format_for(options, caps_dtype, logits)
    scale = float(np.max(np.abs(reference[:n][keep])))
    envelopes = {"float32": record.float32_envelope, "bfloat16": record.bfloat16_envelope}
    tap.tolerance = tolerances.resolve(name, tap.fmt, scale, envelopes, case_overrides=case.tolerance_overrides,
                                       cli_overrides=options.tolerance_overrides)
    tap.metrics = metrics_lib.compare(logits[:n], reference[:n], atol=tap.tolerance.atol, rtol=tap.tolerance.rtol,
                                      fmt=tap.fmt, keep=keep, logits=True)
    tap.excluded_positions = int(np.count_nonzero(~keep))
    result.logits_compared_steps = n
    tap.status, tap.message = _verdict(tap)
    top1 = tap.metrics.top1_agreement
    if tap.status == "pass" and top1 is not None and top1 < 1:
        tap.status = "fail"
        tap.message = f"within tolerance, but the top-1 token differs in {1 - top1:.1%} of the compared (step, row)s"


def check_generation(case: Case, backend: Any, options: CheckOptions, caps_dtype: str | None) -> GenerationResult:
    """Run ``backend.generate`` on the case's generation record and compare (module docstring, "Generation")."""
    record = case.generation
    stops = None if record.stop_token_ids is None else list(record.stop_token_ids)
    result = GenerationResult(status="fail", max_length=record.max_length, stop_token_ids=stops,
                              first_index=record.first_index, reference_steps=record.steps)
    generate = getattr(backend, "generate", None)
    out = generate(_copy(record.inputs), record.max_length, stops) if callable(generate) else None
    if out is None:
        result.status = "not_provided"
        result.message = "the backend returned no generation" if callable(generate) else "the backend has no generate()"
        return result
    ids, mask, logits, problem = _candidate_generation(out, record)
    if problem:
        result.message = problem
        return result
    result.token_divergence = _first_token_divergence(ids, record)
    result.token_ids = "fail" if result.token_divergence else "pass"
    result.token_message = result.token_divergence.describe() if result.token_divergence else ""
    result.padding_mask_message = _padding_mask_message(mask, record)
    result.padding_mask = "fail" if result.padding_mask_message else "pass"
    _check_step_logits(case, result, logits, options, caps_dtype)
    _apply_generation_xfails(result, options)
    parts = (result.token_ids, result.padding_mask, result.logits.status)
    result.status = "fail" if "fail" in parts else "pass"
    return result


def _apply_generation_xfails(result: GenerationResult, options: CheckOptions) -> None:
    if result.token_ids == "fail" and _xfail_reason(options, GEN_TOKEN_IDS):
        result.token_ids = "xfail"
    if result.padding_mask == "fail" and _xfail_reason(options, GEN_PADDING_MASK):
        result.padding_mask = "xfail"
    tap = result.logits
    if tap.status == "fail" and tap.metrics is not None:
        tap.xfail_reason = _xfail_reason(options, tap.name)
        tap.status = "xfail" if tap.xfail_reason else "fail"


def _run(case: Case, backend: Any, options: CheckOptions, selected: list[str], result: CaseResult) -> None:
    backend.prepare(case)
    options = _with_declared_xfails(options, backend)
    caps = capabilities_of(backend)  # after prepare: a backend may learn its format from the case (dumps)
    outputs = dict(backend.run(_copy(case.inputs), list(selected)))
    forced = _teacher_forced(case, backend, selected) if options.teacher_forced else {}
    result.notes += list(getattr(backend, "notes", []) or [])
    unknown = sorted((set(outputs) | set(forced)) - set(case.taps))
    if unknown:
        result.notes.append(f"ignored {len(unknown)} returned taps the case does not have: {unknown[:5]}")
    result.candidate_dtype = options.candidate_dtype or caps.dtype or "per-array dtype"
    for index, name in enumerate(case.taps):
        if name not in selected:
            continue
        run = compare_tap(case, name, index, outputs.get(name), options, caps.dtype, "run")
        if name in forced:
            result.free_run_taps.append(run)
            run = compare_tap(case, name, index, forced[name], options, caps.dtype, "teacher_forced")
        result.taps.append(run)
    if options.generation and case.generation is not None:
        result.generation = check_generation(case, backend, options, caps.dtype)


def check_case(case: Case, backend: Any, options: CheckOptions = CheckOptions()) -> CaseResult:
    """Prepare ``backend`` for ``case``, run it, compare every selected tap.

    A backend that raises gives a result with status "error" (and the exception in ``error``), except
    ``BackendUnavailable``, which propagates: the backend cannot run here at all.
    """
    result = CaseResult(case=case.name, backend=str(getattr(backend, "name", type(backend).__name__)),
                        status="error", teacher_forced=options.teacher_forced)
    selected = selected_taps(case, options)
    start = time.perf_counter()
    try:
        _run(case, backend, options, selected, result)
    except BackendUnavailable:
        raise
    except CaseError as error:
        result.error = str(error)
        return result
    except Exception as error:  # noqa: BLE001 - a crashing backend is reported, not propagated
        result.error = f"backend {result.backend} raised {type(error).__name__}: {error}"
        frame = traceback.extract_tb(error.__traceback__)[-1]
        result.notes.append(f"raised at {frame.filename}:{frame.lineno} in {frame.name}")
        return result
    finally:
        result.seconds = time.perf_counter() - start
        # A backend's name may describe what prepare() chose for this case (keras-hub's dtype): read it again.
        result.backend = str(getattr(backend, "name", type(backend).__name__))
    result.excluded_positions = max((t.excluded_positions for t in result.taps), default=0)
    result.divergence = find_divergence(case, result.taps, result.free_run_taps)
    generation_failed = result.generation is not None and result.generation.status == "fail"
    if not any(t.compared for t in result.taps) and result.divergence is None:
        result.status, result.error = "fail", "no tap was compared (none selected, or none provided)"
    else:
        result.status = "fail" if result.divergence or generation_failed else "pass"
    return result


def check_cases(golden_dir: str | Path, names: Sequence[str] | None, backend: Any,
                options: CheckOptions = CheckOptions()) -> list[CaseResult]:
    """Verify, load and check each named case (all cases of ``golden_dir`` when ``names`` is None).

    A case that fails its integrity check or cannot be loaded gives a result with status "error".
    """
    results = []
    for name in (list_cases(golden_dir) if names is None else names):
        try:
            case = load_case(golden_dir, name)
        except CaseError as error:
            results.append(CaseResult(case=name, backend=str(getattr(backend, "name", backend)), status="error",
                                      error=f"{type(error).__name__}: {error}"))
            continue
        results.append(check_case(case, backend, options))
    return results


def exit_code(results: Sequence[CaseResult]) -> int:
    """0 when every case conforms, 1 when one diverges, 2 when one could not be checked (or there were none)."""
    if not results or any(r.status == "error" for r in results):
        return 2
    return 1 if any(r.status == "fail" for r in results) else 0
