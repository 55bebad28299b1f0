"""The one tolerance table of the repository: how far a candidate tap may be from the float64 reference.

An element passes when |x - ref| <= atol + rtol |ref| (masks: when x == ref). The table gives, per tap kind and
candidate dtype, how atol is derived for one tap of one case (rtol is 0 unless an override sets it):

    candidate  atol                                                              when
    float32    8 * float32_envelope.max_abs           + 4 ulp_f32(scale)          case has a float32 envelope
    float64    8 * float32_envelope.max_abs * 2^-29   + 4 ulp_f64(scale)          (2^-29 = eps_f64 / eps_f32)
    bfloat16   4 * bfloat16_envelope.max_abs          + 1 ulp_bf16(scale)         case has a bfloat16 envelope
    any        FALLBACK_REL[dtype][kind] * scale      + the same ulp floor        no envelope for this tap

``scale`` is max |ref| over the compared elements; ``ulp_fmt(scale)`` is the spacing of the candidate's format at
that magnitude (``conformance.metrics.ulp``). The envelope is the reference's own error on that tap in that
precision (refimpl float32, or refimpl's keras-bf16 emulation, against refimpl float64, on the case's weights and
inputs, recorded in case.json by ``tools/make_goldens.py``), so the bound follows the tap's magnitude and grows with
depth by itself. The floor covers taps the reference computes exactly in float32 (pixels, sqrt(D) = 16 embeddings),
where another correct implementation may still round once or twice differently.

Where the numbers come from (``python -m conformance.calibrate`` reruns the refimpl part of the measurement):
tiny configs of PaliGemma 1 shape (2-6 layers), PaliGemma 2 shape (post-norms, soft-caps, window) and a wider one
(D=256, 6 + 6 layers), 2-3 seeds each, every weight perturbed, on a 2-core x86-64 with OpenBLAS:

    candidate                      max over taps of error / envelope.max_abs           multiple   margin
    refimpl numba float32          2.78 (llm/logits, wide config)                       8          2.9x
    keras-hub 0.32 jax float32     2.44 (llm/final_norm; the 7 float32 golden cases)    8          3.3x
    refimpl numba float64          3.13 (llm/logits; against envelope * 2^-29)          8          2.6x
    keras-hub 0.32 jax bfloat16    1.79 (img ln2; 4 oracle presets run in bf16, against 4          2.2x
                                   the bf16 emulation's envelope; 1.33 on golden pg1_bf16)

The multiples do not depend on the tap kind: the ratios per kind (``conformance.calibrate`` prints them) all lie
between 1.0 and 3.1, so one multiple per dtype keeps the table short; the kind picks the fallback row below and
makes masks exact. The fallback relative bounds (used only for a tap the case gives no envelope for) are the
largest envelope.max_rel measured per kind, times the same multiple, rounded up (float32); float64 is float32 *
2^-29; bfloat16 is twice the largest relative error of the emulation and of keras-hub bf16 against float64; float16
is not measured (nothing here emulates it): the bfloat16 row scaled by the unit roundoff ratio 2^-11 / 2^-8 = 1/8.

Generation logits (kind "generation logits", name ``gen/step_logits``): the per-step logits of a case's generation
record follow the same rules, with the record's own envelope (case.json ``generation.float32_envelope``: refimpl
float32 against float64 over every compared step and row) in place of a tap's; scale is max |ref| over the compared
entries. Measured on the shipped records (pg1_basic, pg2_window), error / envelope.max_abs: refimpl numba float32
1.47 and 1.13, keras-hub's compiled generate 2.28 and 1.14 (at most 0.23 of the tolerance). The records carry no
bf16 envelope, so a bf16 candidate gets the fallback row, the same as for ``llm/logits`` (refimpl's bf16 emulation:
max rel 4.1e-2 against 9e-2).

Overrides, in increasing precedence: case.json ``tolerance_overrides`` {tap regex: {atol, rtol}}, then the command
line (``--tolerance REGEX ATOL RTOL``); both are absolute and replace the table for matching taps; the report says
which rule decided every tap. Regexes match with ``re.search``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from conformance.cases import Envelope
from conformance.metrics import ulp

CANDIDATE_DTYPES = ("float64", "float32", "bfloat16", "float16")
TAP_KINDS = ("input", "embedding", "norm", "attention", "mlp", "residual", "logits", "generation logits", "mask")
GENERATION_LOGITS = "gen/step_logits"  # the name generation's per-step logits go by in reports and overrides

# Kinds by tap name (refimpl/taps.py). Order matters: the first matching pattern decides.
_KIND_PATTERNS = (
    ("mask", r"/mask$"),
    ("input", r"^img/pixels$"),
    ("embedding", r"^(img/embed|img/proj|llm/embed_text|llm/input)$"),
    ("norm", r"(/ln1|/ln2|_norm|^img/encoded)$"),
    ("attention", r"/attn_out$"),
    ("mlp", r"/(mlp_out|ffw_out)$"),
    ("logits", r"^llm/logits$"),
    ("generation logits", r"^gen/step_logits$"),
    ("residual", r"/(attn_residual|out)$"),
)


@dataclass(frozen=True)
class EnvelopeRule:
    """atol = multiple * envelope.max_abs * envelope_scale + floor_ulps * ulp(scale) in the candidate's format."""

    envelope: str | None  # "float32" or "bfloat16": which envelope of the case; None: always the fallback
    multiple: float
    envelope_scale: float
    floor_ulps: float


RULES: dict[str, EnvelopeRule] = {
    "float32": EnvelopeRule("float32", 8.0, 1.0, 4.0),
    "float64": EnvelopeRule("float32", 8.0, 2.0 ** -29, 4.0),
    "bfloat16": EnvelopeRule("bfloat16", 4.0, 1.0, 1.0),
    "float16": EnvelopeRule(None, 0.0, 0.0, 2.0),
}

# Relative bounds (atol / scale) when a tap has no envelope. Measured maxima of envelope.max_rel (float32) per kind:
# input 0, embedding 6.8e-7, norm 2.0e-6, attention 9.9e-7, mlp 1.7e-6, residual 6.0e-7, logits 9.3e-7.
_F32 = {"input": 0.0, "embedding": 6e-6, "norm": 1.6e-5, "attention": 8e-6, "mlp": 1.4e-5, "residual": 5e-6,
        "logits": 8e-6, "generation logits": 8e-6}
# Measured maxima of the bf16 relative error (emulation / keras-hub bf16, against float64):
# input 1.95e-3 (one rounding), embedding 1.07e-2, norm 4.6e-2, attention 1.7e-2, mlp 2.5e-2, residual 1.6e-2,
# logits 4.3e-2.
_BF16 = {"input": 3.9e-3, "embedding": 2.5e-2, "norm": 1e-1, "attention": 3.5e-2, "mlp": 5e-2, "residual": 3.5e-2,
         "logits": 9e-2, "generation logits": 9e-2}
FALLBACK_REL: dict[str, dict[str, float]] = {
    "float32": _F32,
    "float64": {kind: value * 2.0 ** -29 for kind, value in _F32.items()},
    "bfloat16": _BF16,
    "float16": {kind: value / 8 for kind, value in _BF16.items()},
}


@dataclass(frozen=True)
class Tolerance:
    """The resolved bound for one tap: |x - ref| <= atol + rtol |ref|, or exact equality."""

    atol: float
    rtol: float
    exact: bool
    source: str  # which rule decided, e.g. "table float32/norm: 8 x float32 envelope + 4 ulp"

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "exact": self.exact, "source": self.source}


def tap_kind(name: str) -> str:
    """The kind of a tap name, e.g. ``llm/layer03/attn_out`` -> "attention"."""
    for kind, pattern in _KIND_PATTERNS:
        if re.search(pattern, name):
            return kind
    raise KeyError(f"tap {name!r} has no tolerance kind; known kinds: {TAP_KINDS}")


def candidate_format(dtype: str | np.dtype) -> str:
    """Map a dtype or keras policy name to a row of the table ("mixed_bfloat16" -> "bfloat16")."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    name = {"mixed_bfloat16": "bfloat16", "bf16": "bfloat16", "f32": "float32", "f64": "float64",
            "f16": "float16", "half": "float16"}.get(name, name)
    if name not in CANDIDATE_DTYPES:
        raise ValueError(f"candidate dtype {dtype!r} has no tolerance row; expected one of {CANDIDATE_DTYPES}")
    return name


def _from_table(kind: str, fmt: str, scale: float, envelopes: Mapping[str, Envelope | None]) -> Tolerance:
    rule = RULES[fmt]
    floor = rule.floor_ulps * float(ulp(np.float64(scale), fmt))
    envelope = envelopes.get(rule.envelope) if rule.envelope else None
    if envelope is not None:
        atol = rule.multiple * envelope.max_abs * rule.envelope_scale + floor
        scaled = f" x 2^{np.log2(rule.envelope_scale):.0f}" if rule.envelope_scale != 1 else ""
        return Tolerance(atol, 0.0, False, f"table {fmt}/{kind}: {rule.multiple:g} x {rule.envelope} envelope "
                                           f"{envelope.max_abs:.3g}{scaled} + {rule.floor_ulps:g} ulp")
    rel = FALLBACK_REL[fmt][kind]
    return Tolerance(rel * scale + floor, 0.0, False,
                     f"table {fmt}/{kind} (no envelope): {rel:.3g} x max|ref| + {rule.floor_ulps:g} ulp")


def resolve(tap: str, fmt: str, scale: float, envelopes: Mapping[str, Envelope | None], *,
            case_overrides: Mapping[str, Mapping[str, float]] | None = None,
            cli_overrides: Sequence[tuple[str, float, float]] = ()) -> Tolerance:
    """The tolerance of ``tap`` for a candidate in format ``fmt``.

    Args:
      tap: tap name; its kind picks the table row. Masks are always exact (overrides do not apply).
      fmt: one of CANDIDATE_DTYPES (see ``candidate_format``).
      scale: max |ref| over the compared elements.
      envelopes: {"float32": Envelope or None, "bfloat16": Envelope or None} for this tap, from the case.
      case_overrides: case.json ``tolerance_overrides``; the first regex that matches wins.
      cli_overrides: (regex, atol, rtol) from the command line; the last matching one wins, over the case.
    """
    kind = tap_kind(tap)
    if kind == "mask":
        return Tolerance(0.0, 0.0, True, "masks compare exactly")
    for pattern, atol, rtol in reversed(list(cli_overrides)):
        if re.search(pattern, tap):
            return Tolerance(float(atol), float(rtol), False, f"command-line override {pattern!r}")
    for pattern, entry in (case_overrides or {}).items():
        if re.search(pattern, tap):
            return Tolerance(float(entry["atol"]), float(entry["rtol"]), False, f"case.json override {pattern!r}")
    return _from_table(kind, fmt, scale, envelopes)
