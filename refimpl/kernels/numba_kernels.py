"""Numba twins of the spec kernels in ``refimpl.ops`` and ``refimpl.attention``.

Each public function has the name, signature and return convention of its spec function. It is a thin Python
wrapper: it checks that the inputs are ones the compiled core handles (ndarrays of one dtype, float32 or float64,
non-empty, with the shapes the spec documents, and for attention ``rnd`` the identity), makes them C-contiguous,
aligned and writeable (a copy only when they are not, so each core compiles exactly one signature per dtype), and
calls an ``@njit`` core. Anything else goes to the spec function unchanged, so this set never fails, or fails
differently, where the NumPy set would not.

Threads: the cores are single-threaded on purpose. Every matrix product, the two inside attention included, is one
numpy BLAS call, and BLAS already runs on all cores; a numba thread pool beside it competed with BLAS's own
threads (measured on 2 cores, mid-size model: the BLAS calls of a forward pass took 0.69 s instead of 0.53 s
while numba's OpenMP workers spun between parallel regions). What is left for the cores is memory-bound passes over rows,
which one thread does in a few milliseconds per call at PaliGemma sizes.

Determinism (style.md section 5), kept by every core:
- fastmath is off: no reassociation and no FMA contraction, so results do not move between builds;
- every reduction runs in one fixed order (``_sum``'s eight interleaved lanes, or index order);
- no module globals in the cores: eps and constants arrive as arguments, and 0, 1, 0.5 are made with
  ``x.dtype.type`` so that float32 arithmetic stays float32 (a bare literal would promote it to float64 in numba,
  whereas numpy treats Python scalars as weak);
- ``cache=True`` is safe because every helper a core calls lives in this file.

What still differs from the spec is the order of additions inside sums (eight lanes here; numpy's pairwise sums
there): in the norms and the softmax denominators. Elementwise transcendentals (tanh, exp) are numpy's own, called
between compiled passes, so rope and gelu_tanh equal the spec bit for bit, and attention differs from it only by
the softmax sums. ``tests/test_kernel_parity.py`` bounds the rest.

Nothing compiles at import: each core compiles on its first call for a dtype and is cached on disk (numba writes
``__pycache__`` beside this file, or under NUMBA_CACHE_DIR), so later processes load it. Debug a core through its
``.py_func`` or with ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from refimpl import attention as spec_attention
from refimpl import ops
from refimpl.dtypes import identity

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _compilable(*arrays) -> bool:
    """True if every input is a non-empty float32 or float64 ndarray and all share one dtype."""
    if not all(isinstance(a, np.ndarray) for a in arrays):
        return False
    dtype = arrays[0].dtype
    return dtype in _FLOAT_DTYPES and all(a.dtype == dtype and a.size > 0 for a in arrays)


def _c(a: np.ndarray) -> np.ndarray:
    """a itself if C-contiguous, aligned and writeable, else a copy that is: the one array layout cores compile for."""
    return np.require(a, requirements=("C", "A", "W"))


# ---------------------------------------------------------------------------------------------------- matmul


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Twin of ``ops.matmul``: f[..., I] @ f[I, O] -> f[..., O], as one BLAS GEMM over the folded leading axes.

    Numba's own ``np.dot`` would call a BLAS too (scipy's); numpy's is used directly, without compiling anything.
    """
    if not (_compilable(x, w) and w.ndim == 2 and x.ndim >= 1 and x.shape[-1] == w.shape[0]):
        return ops.matmul(x, w)
    rows = x.reshape(-1, x.shape[-1])  # f[B*T, I]
    return np.matmul(rows, w).reshape(x.shape[:-1] + (w.shape[1],))


# ------------------------------------------------------------------------------------------------ norms


@njit(cache=True)
def _sum(row):  # f[D] -> f scalar
    """The sum of row in eight interleaved partial sums (lane i adds elements i, i+8, i+16, ...), combined
    pairwise, then the leftover tail in order. A fixed order, so a deterministic result; eight independent
    chains of additions run about eight times faster than one (an addition's latency, not its cost, is the
    limit of a sequential sum)."""
    zero = row.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    full = row.shape[0] - row.shape[0] % 8
    for j in range(0, full, 8):
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        s4 += row[j + 4]
        s5 += row[j + 5]
        s6 += row[j + 6]
        s7 += row[j + 7]
    tail = zero
    for j in range(full, row.shape[0]):
        tail += row[j]
    return (((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) + tail


@njit(cache=True)
def _sum_squared_deviations(row, centre):  # f[D], f scalar -> f scalar: sum((row - centre)^2), lanes as _sum
    zero = row.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    full = row.shape[0] - row.shape[0] % 8
    for j in range(0, full, 8):
        d0, d1, d2, d3 = row[j] - centre, row[j + 1] - centre, row[j + 2] - centre, row[j + 3] - centre
        d4, d5, d6, d7 = row[j + 4] - centre, row[j + 5] - centre, row[j + 6] - centre, row[j + 7] - centre
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        s4 += d4 * d4
        s5 += d5 * d5
        s6 += d6 * d6
        s7 += d7 * d7
    tail = zero
    for j in range(full, row.shape[0]):
        d = row[j] - centre
        tail += d * d
    return (((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) + tail


@njit(cache=True)
def _layer_norm_rows(x, gamma, beta, eps, out):  # f[R, D], f[D], f[D], f scalar -> fills out f[R, D]
    rows, width = x.shape
    count = x.dtype.type(width)
    one = x.dtype.type(1)
    for r in range(rows):
        mean = _sum(x[r]) / count
        # population variance as the mean of squared deviations, like the spec
        rstd = one / np.sqrt(_sum_squared_deviations(x[r], mean) / count + eps)
        for j in range(width):  # keras' order: inv = rstd*gamma; x*inv + (beta - mean*inv)
            inv = rstd * gamma[j]
            out[r, j] = x[r, j] * inv + (beta[j] - mean * inv)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """Twin of ``ops.layer_norm``: f[..., D] with gamma, beta f[D] -> f[..., D], one fused pass per row."""
    if not (_compilable(x, gamma, beta) and x.ndim >= 1 and gamma.shape == beta.shape == x.shape[-1:]):
        return ops.layer_norm(x, gamma, beta, eps)
    rows = _c(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _layer_norm_rows(rows, _c(gamma), _c(beta), x.dtype.type(eps), out)
    return out.reshape(x.shape)


@njit(cache=True)
def _rms_norm_rows(x, scale, eps, out):  # f[R, D], f[D], f scalar -> fills out f[R, D]
    rows, width = x.shape
    count = x.dtype.type(width)
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    for r in range(rows):
        rstd = one / np.sqrt(_sum_squared_deviations(x[r], zero) / count + eps)  # (x - 0)^2 is x*x exactly
        for j in range(width):  # the spec's order: (x * rstd) * (1 + scale)
            out[r, j] = (x[r, j] * rstd) * (one + scale[j])


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """Twin of ``ops.rms_norm``: f[..., D] with scale f[D] -> f[..., D], one fused pass per row."""
    if not (_compilable(x, scale) and x.ndim >= 1 and scale.shape == x.shape[-1:]):
        return ops.rms_norm(x, scale, eps)
    rows = _c(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _rms_norm_rows(rows, _c(scale), x.dtype.type(eps), out)
    return out.reshape(x.shape)


# -------------------------------------------------------------------------------------------- elementwise


@njit(cache=True)
def _gelu_tanh_argument(x, c, cubic, out):  # f[E], f scalars sqrt(2/pi) and 0.044715 -> fills out f[E]
    for i in range(x.shape[0]):
        v = x[i]  # the spec's order: c * (x + k * ((x*x)*x))
        out[i] = c * (v + cubic * ((v * v) * v))


@njit(cache=True)
def _gelu_tanh_finish(x, tanh, out):  # f[E], f[E] -> fills out f[E]; out may be tanh itself
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    for i in range(x.shape[0]):
        out[i] = x[i] * (half * (one + tanh[i]))  # the spec's order: x * (0.5 * (1 + tanh))


def gelu_tanh(x: np.ndarray, rnd=identity) -> np.ndarray:
    """Twin of ``ops.gelu_tanh``: elementwise GELU, tanh approximation, over any shape; equal to the spec bit for bit.

    Two fused passes around numpy's own tanh, run in place. numpy's tanh is SIMD and about 4x faster
    than the scalar libm tanh a numba loop calls (which also differs from it by up to 3 ulps in float32), and
    everything else repeats the spec's operations in its order and dtype, so the result is the spec's exactly.
    """
    if rnd is not identity or not _compilable(x):
        return ops.gelu_tanh(x, rnd)
    flat = _c(x).reshape(-1)
    out = np.empty_like(flat)
    # The constants of ops.gelu_tanh, rounded to the array's dtype as the spec rounds them.
    _gelu_tanh_argument(flat, x.dtype.type(math.sqrt(2.0 / math.pi)), x.dtype.type(0.044715), out)
    np.tanh(out, out=out)
    _gelu_tanh_finish(flat, out, out)
    return out.reshape(x.shape)


@njit(cache=True)
def _rope_rows(x, cos, sin, out):  # f[B, T, heads, H], f[T, H], f[T, H] -> fills out f[B, T, heads, H]
    batch, length, heads, width = x.shape
    half = width // 2
    # The rotated vector is concat(-x[half:], x[:half]): its first `tail` entries are negated upper-half ones.
    tail = width - half
    for bt in range(batch * length):  # (batch, token) pairs are independent
        t = bt % length
        rows, dest = x[bt // length, t], out[bt // length, t]  # f[heads, H]
        c, s = cos[t], sin[t]  # f[H]
        for n in range(heads):
            for j in range(tail):
                dest[n, j] = rows[n, j] * c[j] + (-rows[n, half + j]) * s[j]
            for j in range(half):
                dest[n, tail + j] = rows[n, tail + j] * c[tail + j] + rows[n, j] * s[tail + j]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rnd=identity) -> np.ndarray:
    """Twin of ``ops.rope``: rotate x f[B, T, heads, H] by cos, sin f[T, H]; returns a new array."""
    if rnd is not identity or not (_compilable(x, cos, sin) and x.ndim == 4
                                   and cos.shape == sin.shape == (x.shape[1], x.shape[3])):
        return ops.rope(x, cos, sin, rnd)
    out = np.empty(x.shape, dtype=x.dtype)
    _rope_rows(_c(x), _c(cos), _c(sin), out)
    return out


# ---------------------------------------------------------------------------------------------- attention


@njit(cache=True)
def _mask_and_shift_rows(scores, mask, has_mask, masked_logit):  # f[R, S], bool[R, S]; in place
    """The first half of ``ops.masked_softmax``, per row: masked logits -> masked_logit, then minus the row's max."""
    rows, length = scores.shape
    for r in range(rows):
        row = scores[r]
        if has_mask:
            for s in range(length):
                if not mask[r, s]:
                    row[s] = masked_logit
        largest = row[0]
        for s in range(1, length):
            largest = max(largest, row[s])
        for s in range(length):
            row[s] = row[s] - largest


@njit(cache=True)
def _normalise_rows(weights, mask, has_mask):  # f[R, S] exponentials, bool[R, S]; in place
    """The second half: divide each row by its sum (``_sum``), then masked outputs -> exactly 0, so a fully
    masked row gives zeros."""
    rows, length = weights.shape
    zero = weights.dtype.type(0)
    for r in range(rows):
        row = weights[r]
        total = _sum(row)
        for s in range(length):
            row[s] = row[s] / total
        if has_mask:
            for s in range(length):
                if not mask[r, s]:
                    row[s] = zero


# Query rows per block: a block's scores, f[rows, S], are all that exists of a head's score matrix at one time
# (256 x 4352 x 4 B = 4.5 MB for the 896-px model), and 256 rows keep the two matmuls at BLAS speed.
ATTENTION_BLOCK_ROWS = 256


def _attention_supported(q, k, v, rnd) -> bool:
    """The inputs the compiled core handles; everything else (bf16 rounding above all) goes to the spec."""
    if rnd is not identity or not _compilable(q, k, v) or not q.ndim == k.ndim == v.ndim == 4:
        return False
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    return (k.shape[0] == v.shape[0] == batch and k.shape[1] == v.shape[1] and v.shape[2] == num_kv_heads
            and k.shape[3] == head_dim and num_heads % num_kv_heads == 0)


def _mask_for_core(mask, batch: int, q_len: int, kv_len: int) -> np.ndarray | None:
    """bool[B, T, S], C-contiguous, from a mask broadcastable to it (the spec broadcasts too); None if it is not."""
    if mask is None:
        return np.ones((1, 1, 1), dtype=bool)  # never read: the core gets has_mask=False
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (batch, q_len, kv_len):
        try:
            mask = np.broadcast_to(mask, (batch, q_len, kv_len))  # a read-only view; _c copies it
        except ValueError:
            return None
    return _c(mask)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, *,
              score_divisor: float | None = None, logit_soft_cap: float | None = None,
              softmax_in_float32: bool = True, rnd=identity) -> np.ndarray:
    """Twin of ``refimpl.attention.attention``: grouped-query attention with optional divisor, soft-cap, mask.

    Args and Returns as the spec: q f[B, T, N, H], k f[B, S, K, H], v f[B, S, K, Hv], mask bool[B, T, S] (or
    broadcastable to it) or None -> f[B, T, N, Hv]. A non-identity ``rnd`` (bf16 emulation) goes to the spec;
    without rounding, ``softmax_in_float32`` changes nothing (the arrays already are float32 or float64).

    Per (batch row, query head) and per block of ``ATTENTION_BLOCK_ROWS`` queries: the scores are one BLAS
    matmul with the head's kv keys, the compiled core turns them into probabilities in place, and a second BLAS
    matmul weights the values. In between, the spec's softmax steps: the divisor, soft-cap and exp are numpy's
    (SIMD, bit for bit the spec's), the masking, max shift, sum and division are two compiled passes per row.
    The loops are Python's: at most B x N x ceil(T / 256) turns, microseconds each against milliseconds of work.
    """
    core_mask = None
    if _attention_supported(q, k, v, rnd):
        core_mask = _mask_for_core(mask, q.shape[0], q.shape[1], k.shape[1])
    if core_mask is None:
        return spec_attention.attention(q, k, v, mask, score_divisor=score_divisor,
                                        logit_soft_cap=logit_soft_cap, softmax_in_float32=softmax_in_float32,
                                        rnd=rnd)
    batch, q_len, num_heads, _ = q.shape
    group = num_heads // k.shape[2]
    divisor = None if score_divisor is None else q.dtype.type(score_divisor)
    cap = None if logit_soft_cap is None else q.dtype.type(logit_soft_cap)
    masked_logit = q.dtype.type(ops.MASKED_LOGIT)
    out = np.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
    for b in range(batch):
        for n in range(num_heads):
            keys_t, values = k[b, :, n // group, :].T, v[b, :, n // group, :]  # f[H, S], f[S, Hv] (views)
            for start in range(0, q_len, ATTENTION_BLOCK_ROWS):
                stop = min(start + ATTENTION_BLOCK_ROWS, q_len)
                block_mask = core_mask[b, start:stop] if mask is not None else core_mask[0]  # bool[R, S]
                scores = np.matmul(q[b, start:stop, n, :], keys_t)  # f[R, S], a new C-contiguous array
                # The spec's steps, in its order and dtype, in place; numpy's SIMD exp and tanh, as in the spec.
                if divisor is not None:
                    np.divide(scores, divisor, out=scores)
                if cap is not None:
                    np.multiply(np.tanh(np.divide(scores, cap, out=scores), out=scores), cap, out=scores)
                _mask_and_shift_rows(scores, block_mask, mask is not None, masked_logit)
                np.exp(scores, out=scores)
                _normalise_rows(scores, block_mask, mask is not None)
                out[b, start:stop, n, :] = np.matmul(scores, values)
    return out
