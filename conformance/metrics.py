"""Error metrics of one candidate tap against its float64 reference.

All arithmetic is in float64 on the elements being compared (padded positions already removed by the caller via
``keep``). Definitions, with d = x - ref over the compared elements:

    max_abs              max |d|
    scale                max |ref|  (the tap's magnitude; relative numbers below divide by it)
    max_rel              max |d| / scale
    max_rel_elementwise  max |d| / |ref| over elements with ref != 0 (an element with ref == 0 and d != 0 gives inf)
    max_ulp              max |d| / ulp(ref), the unit in the last place of the CANDIDATE's format at ref
                         (bf16: 8 significant bits, f16: 11, f32: 24, f64: 53; subnormal spacing below the normals)
    cosine               <x, ref> / (|x| |ref|); 1.0 when both are all zeros
    nmse_db              10 log10(sum d^2 / sum ref^2); -inf when d is all zeros
    frac_out             fraction of elements with |d| > atol + rtol |ref| (NaN or inf candidates always count)
    budget_used          max |d| / (atol + rtol |ref|): <= 1 exactly when every element passes
    worst                the elements with the largest |d|: (index in the full tensor, value, ref)

Logits (f[B, T, V]) additionally get, over the compared positions: top-1 agreement (fraction of positions whose
argmax matches), top-5 overlap (mean |top5(x) & top5(ref)| / 5) and the mean KL divergence KL(softmax(ref) ||
softmax(x)) in nats. Masks (bool) compare exactly: every differing element is out of tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Significant bits (implicit bit included) and the smallest normal exponent of each candidate format.
FORMATS = {"bfloat16": (8, -126), "float16": (11, -14), "float32": (24, -126), "float64": (53, -1022)}
WORST_PAIRS = 3
TOP_K = 5


@dataclass
class TapMetrics:
    """Everything measured on one tap. Error fields are None when shapes differ (nothing was compared)."""

    shape_ok: bool
    dtype_ok: bool
    candidate_shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    candidate_dtype: str
    compared: int = 0  # elements compared
    excluded_elements: int = 0  # elements left out (padded positions)
    nonfinite: int = 0  # NaN/inf elements of the candidate among the compared ones
    scale: float | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    max_rel_elementwise: float | None = None
    max_ulp: float | None = None
    cosine: float | None = None
    nmse_db: float | None = None
    n_out: int = 0
    frac_out: float | None = None
    budget_used: float | None = None  # max |d| / (atol + rtol |ref|); masks: 0 if equal, inf otherwise
    worst_index: tuple[int, ...] | None = None
    worst: list[dict] = field(default_factory=list)  # [{"index", "value", "ref", "abs_err"}]
    top1_agreement: float | None = None
    top5_overlap: float | None = None
    mean_kl: float | None = None


def ulp(ref: np.ndarray, fmt: str) -> np.ndarray:
    """f64[...] spacing of format ``fmt`` at |ref|: 2^(max(floor(log2|ref|), emin) - (p - 1)).

    For ref = 1: bf16 2^-7, f32 2^-23. For ref = 0 the subnormal spacing 2^(emin - p + 1).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; expected one of {tuple(FORMATS)}")
    bits, emin = FORMATS[fmt]
    _, exponent = np.frexp(np.abs(np.asarray(ref, dtype=np.float64)))  # |ref| = m 2^e, m in [0.5, 1)
    floor_log2 = np.where(np.asarray(ref) == 0, emin, np.maximum(exponent - 1, emin))
    return np.ldexp(1.0, (floor_log2 - (bits - 1)).astype(np.int64))


def _worst(d_abs: np.ndarray, x: np.ndarray, ref: np.ndarray, positions: np.ndarray,
           shape: tuple[int, ...]) -> list[dict]:
    order = np.argsort(-np.nan_to_num(d_abs, nan=np.inf), kind="stable")[:WORST_PAIRS]
    return [{"index": tuple(int(i) for i in np.unravel_index(int(positions[k]), shape)), "value": float(x[k]),
             "ref": float(ref[k]), "abs_err": float(d_abs[k])} for k in order]


def _float_metrics(m: TapMetrics, x: np.ndarray, ref: np.ndarray, atol: float, rtol: float,
                   fmt: str) -> np.ndarray:
    """Fill the error fields from flat f64 x and ref (compared elements); return |d| (inf where x is not finite)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = x - ref
        d_abs = np.where(np.isfinite(x), np.abs(d), np.inf)
        ref_abs = np.abs(ref)
        m.nonfinite = int(np.count_nonzero(~np.isfinite(x)))
        m.scale = float(ref_abs.max())
        m.max_abs = float(d_abs.max())
        m.max_rel = m.max_abs / m.scale if m.scale > 0 else (0.0 if m.max_abs == 0 else float("inf"))
        rel = np.where(ref_abs > 0, d_abs / np.where(ref_abs > 0, ref_abs, 1.0), np.where(d_abs > 0, np.inf, 0.0))
        m.max_rel_elementwise = float(rel.max())
        m.max_ulp = float((d_abs / ulp(ref, fmt)).max())
        norms = float(np.linalg.norm(x)) * float(np.linalg.norm(ref))
        both_zero = not np.any(x) and not np.any(ref)
        m.cosine = 1.0 if both_zero else (float(np.dot(x, ref) / norms) if norms > 0 else 0.0)
        err_energy, ref_energy = float(np.sum(d_abs ** 2)), float(np.sum(ref ** 2))
        m.nmse_db = (float("-inf") if err_energy == 0 else
                     10.0 * np.log10(err_energy / ref_energy) if ref_energy > 0 else float("inf"))
        bound = atol + rtol * ref_abs
        out = ~(d_abs <= bound)
        used = np.where(bound > 0, d_abs / np.where(bound > 0, bound, 1.0), np.where(d_abs > 0, np.inf, 0.0))
        m.budget_used = float(used.max())
    m.n_out = int(np.count_nonzero(out))
    return d_abs


def _mask_metrics(m: TapMetrics, x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Exact comparison of flat bool x and ref; return 1.0 where they differ."""
    differs = x != ref
    m.n_out = int(np.count_nonzero(differs))
    m.max_abs = m.max_rel = float(differs.any())
    m.budget_used = float("inf") if differs.any() else 0.0
    return differs.astype(np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:  # f64[R, V] -> f64[R, V]
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logit_metrics(x: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, top-5 overlap, mean KL(softmax(ref) || softmax(x))) over rows of f[R, V]."""
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if x.shape[0] == 0:
        return 1.0, 1.0, 0.0
    top1 = float(np.mean(np.argmax(x, axis=-1) == np.argmax(ref, axis=-1)))
    k = min(TOP_K, x.shape[-1])
    top_x, top_ref = np.argsort(-x, axis=-1)[:, :k], np.argsort(-ref, axis=-1)[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_x.tolist(), top_ref.tolist())]))
    log_p, log_q = _log_softmax(ref), _log_softmax(x)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    return top1, overlap, kl


def compare(candidate: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float, fmt: str,
            keep: np.ndarray | None = None, logits: bool = False) -> TapMetrics:
    """Metrics of ``candidate`` against ``reference`` over the elements where ``keep`` is True.

    Args:
      candidate, reference: arrays of the same shape (a shape mismatch gives shape_ok=False and nothing else).
      atol, rtol: an element is out of tolerance when |x - ref| > atol + rtol |ref|.
      fmt: the candidate's number format for ULPs ("bfloat16", "float16", "float32", "float64").
      keep: bool broadcastable to the leading axes of the tap (e.g. bool[B, L]); None keeps everything.
      logits: also compute the top-k and KL metrics (last axis = vocabulary).
    """
    candidate, reference = np.asarray(candidate), np.asarray(reference)
    is_mask = reference.dtype == bool
    dtype_ok = candidate.dtype == bool if is_mask else np.issubdtype(candidate.dtype, np.floating)
    m = TapMetrics(shape_ok=candidate.shape == reference.shape, dtype_ok=bool(dtype_ok),
                   candidate_shape=tuple(candidate.shape), reference_shape=tuple(reference.shape),
                   candidate_dtype=str(candidate.dtype))
    if not (m.shape_ok and m.dtype_ok):
        return m
    full = _expand(keep, reference.shape)
    positions = np.flatnonzero(full)
    m.compared, m.excluded_elements = int(positions.size), int(full.size - positions.size)
    if positions.size == 0:
        m.frac_out, m.budget_used = 0.0, 0.0
        return m
    x, ref = candidate.reshape(-1)[positions], reference.reshape(-1)[positions]
    if is_mask:
        d_abs = _mask_metrics(m, x, ref)
    else:
        x, ref = x.astype(np.float64), ref.astype(np.float64)
        d_abs = _float_metrics(m, x, ref, atol, rtol, fmt)
    m.frac_out = m.n_out / positions.size
    m.worst = _worst(d_abs, x, ref, positions, reference.shape)
    m.worst_index = m.worst[0]["index"]
    if logits and not is_mask:
        vocabulary = reference.shape[-1]
        keep_rows = full.reshape(-1, vocabulary)[:, 0]  # positions kept (keep never splits the vocabulary axis)
        m.top1_agreement, m.top5_overlap, m.mean_kl = logit_metrics(candidate.reshape(-1, vocabulary)[keep_rows],
                                                                    reference.reshape(-1, vocabulary)[keep_rows])
    return m


def _expand(keep: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:  # bool[B, L] -> bool[*shape]
    """``keep`` over the leading axes, broadcast over the trailing ones; None keeps every element."""
    if keep is None:
        return np.ones(shape, dtype=bool)
    keep = np.asarray(keep, dtype=bool)
    return np.broadcast_to(keep.reshape(keep.shape + (1,) * (len(shape) - keep.ndim)), shape)
