"""Numba twins of the spec kernels in ``refimpl.ops`` and ``refimpl.attention``.

Each public function has the name, signature and return convention of its spec function. It is a thin Python
wrapper: it checks that the inputs are ones the compiled core handles (ndarrays of one dtype, float32 or float64,
non-empty, with the shapes the spec documents, and for attention ``rnd`` the identity), makes them C-contiguous,
aligned and writeable (a copy only when they are not, so each core compiles exactly one signature per dtype), and
calls an ``@njit`` core. Anything else goes to the spec function unchanged, so this set never fails, or fails
differently, where the NumPy set would not.

Determinism (style.md section 5), kept by every core:
- fastmath is off: no reassociation and no FMA contraction, so results do not move between builds;
- ``prange`` runs only over independent rows, tokens or (batch, head) pairs; every reduction runs inside one
  worker, sequentially in index order;
- no module globals in the cores: eps and constants arrive as arguments, and 0, 1, 0.5 are made with
  ``x.dtype.type`` so that float32 arithmetic stays float32 (a bare literal would promote it to float64 in numba,
  whereas numpy treats Python scalars as weak);
- ``cache=True`` is safe because every helper a core calls lives in this file.

What still differs from the spec is the order of additions inside sums (sequential here; numpy's pairwise sums and
BLAS blocking there) and, in attention, libm's exp and tanh against numpy's SIMD ones. rope and gelu_tanh equal the
spec bit for bit. ``tests/test_kernel_parity.py`` bounds the rest.

Nothing compiles at import: each core compiles on its first call for a dtype and is cached on disk (numba writes
``__pycache__`` beside this file, or under NUMBA_CACHE_DIR), so later processes load it. Debug a core through its
``.py_func`` or with ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

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


@njit(parallel=True, cache=True)
def _layer_norm_rows(x, gamma, beta, eps, out):  # f[R, D], f[D], f[D], f scalar -> fills out f[R, D]
    rows, width = x.shape
    count = x.dtype.type(width)
    one = x.dtype.type(1)
    for r in prange(rows):  # rows are independent; each row's sums run sequentially in this worker
        total = x.dtype.type(0)
        for j in range(width):
            total += x[r, j]
        mean = total / count
        squares = x.dtype.type(0)  # population variance as the mean of squared deviations, like the spec
        for j in range(width):
            deviation = x[r, j] - mean
            squares += deviation * deviation
        rstd = one / np.sqrt(squares / count + eps)
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


@njit(parallel=True, cache=True)
def _rms_norm_rows(x, scale, eps, out):  # f[R, D], f[D], f scalar -> fills out f[R, D]
    rows, width = x.shape
    count = x.dtype.type(width)
    one = x.dtype.type(1)
    for r in prange(rows):  # rows are independent; each row's sum runs sequentially in this worker
        squares = x.dtype.type(0)
        for j in range(width):
            squares += x[r, j] * x[r, j]
        rstd = one / np.sqrt(squares / count + eps)
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


@njit(parallel=True, cache=True)
def _gelu_tanh_argument(x, c, cubic, out):  # f[E], f scalars sqrt(2/pi) and 0.044715 -> fills out f[E]
    for i in prange(x.shape[0]):
        v = x[i]  # the spec's order: c * (x + k * ((x*x)*x))
        out[i] = c * (v + cubic * ((v * v) * v))


@njit(parallel=True, cache=True)
def _gelu_tanh_finish(x, tanh, out):  # f[E], f[E] -> fills out f[E]; out may be tanh itself
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    for i in prange(x.shape[0]):
        out[i] = x[i] * (half * (one + tanh[i]))  # the spec's order: x * (0.5 * (1 + tanh))


def gelu_tanh(x: np.ndarray, rnd=identity) -> np.ndarray:
    """Twin of ``ops.gelu_tanh``: elementwise GELU, tanh approximation, over any shape; equal to the spec bit for bit.

    Two fused parallel passes around numpy's own tanh, run in place. numpy's tanh is SIMD and about 4x faster
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


@njit(parallel=True, cache=True)
def _rope_rows(x, cos, sin, out):  # f[B, T, heads, H], f[T, H], f[T, H] -> fills out f[B, T, heads, H]
    batch, length, heads, width = x.shape
    half = width // 2
    # The rotated vector is concat(-x[half:], x[:half]): its first `tail` entries are negated upper-half ones.
    tail = width - half
    for bt in prange(batch * length):  # (batch, token) pairs are independent
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
def _score_rows(q_rows, keys, scores):  # f[R, H], f[H, S] -> fills scores f[R, S]
    """scores[r, s] = q_rows[r, 0]*keys[0, s] + q_rows[r, 1]*keys[1, s] + ..., added in that order.

    The inner loops run over keys s, which are independent, so they vectorise without reassociating any sum.
    Four rows at a time share each load of keys[h, s] (about twice as fast); the numbers do not depend on it.
    """
    rows, head_dim = q_rows.shape
    kv_len = keys.shape[1]
    for r in range(rows):
        for s in range(kv_len):
            scores[r, s] = scores.dtype.type(0)
    r = 0
    while r + 4 <= rows:
        for h in range(head_dim):
            q0, q1, q2, q3 = q_rows[r, h], q_rows[r + 1, h], q_rows[r + 2, h], q_rows[r + 3, h]
            for s in range(kv_len):
                key = keys[h, s]
                scores[r, s] += q0 * key
                scores[r + 1, s] += q1 * key
                scores[r + 2, s] += q2 * key
                scores[r + 3, s] += q3 * key
        r += 4
    for last in range(r, rows):
        for h in range(head_dim):
            qh = q_rows[last, h]
            for s in range(kv_len):
                scores[last, s] += qh * keys[h, s]


@njit(cache=True)
def _weighted_rows(probs, values, out):  # f[R, S], f[S, Hv] -> fills out f[R, Hv]
    """out[r, :] = probs[r, 0]*values[0, :] + probs[r, 1]*values[1, :] + ..., added in that order.

    Same scheme as ``_score_rows``: independent output features inside, four rows sharing each values load.
    """
    rows, kv_len = probs.shape
    v_dim = values.shape[1]
    for r in range(rows):
        for h in range(v_dim):
            out[r, h] = out.dtype.type(0)
    r = 0
    while r + 4 <= rows:
        for s in range(kv_len):
            p0, p1, p2, p3 = probs[r, s], probs[r + 1, s], probs[r + 2, s], probs[r + 3, s]
            for h in range(v_dim):
                value = values[s, h]
                out[r, h] += p0 * value
                out[r + 1, h] += p1 * value
                out[r + 2, h] += p2 * value
                out[r + 3, h] += p3 * value
        r += 4
    for last in range(r, rows):
        for s in range(kv_len):
            p = probs[last, s]
            for h in range(v_dim):
                out[last, h] += p * values[s, h]


@njit(cache=True)
def _scale_and_cap_row(scores, divisor, has_divisor, cap, has_cap):  # f[S], in place
    """The spec's optional steps between the score matmul and the softmax: scores/divisor, then cap*tanh(x/cap)."""
    if has_divisor:
        for s in range(scores.shape[0]):
            scores[s] = scores[s] / divisor
    if has_cap:
        for s in range(scores.shape[0]):
            scores[s] = np.tanh(scores[s] / cap) * cap


@njit(cache=True)
def _masked_softmax_row(logits, mask_row, has_mask, masked_logit, probs):  # f[S], bool[S] -> fills probs f[S]
    """One row of ``ops.masked_softmax``: masked logits -> masked_logit, shift by the max, exp, normalise, then
    masked outputs -> 0, so a fully masked row gives zeros. ``logits`` is overwritten."""
    length = logits.shape[0]
    if has_mask:
        for s in range(length):
            if not mask_row[s]:
                logits[s] = masked_logit
    largest = logits[0]
    for s in range(1, length):
        largest = max(largest, logits[s])
    total = logits.dtype.type(0)
    for s in range(length):
        probs[s] = np.exp(logits[s] - largest)
        total += probs[s]
    for s in range(length):
        probs[s] = probs[s] / total
    if has_mask:
        for s in range(length):
            if not mask_row[s]:
                probs[s] = logits.dtype.type(0)


@njit(parallel=True, cache=True)
def _attention_heads(q, k, v, mask, has_mask, divisor, has_divisor, cap, has_cap, masked_logit, block, out):
    """f[B, T, N, H], f[B, S, K, H], f[B, S, K, Hv], bool[B, T, S] -> fills out f[B, T, N, Hv].

    One task per (batch, query head) pair. A task copies its kv head's keys transposed, f[H, S], and values,
    f[S, Hv], then walks the queries ``block`` rows at a time, so a worker never holds more than a block's rows
    of scores, whatever T is.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    for task in prange(batch * num_heads):  # (batch, query head) pairs are independent
        b = task // num_heads
        n = task % num_heads
        kv = n // group  # consecutive query heads share one kv head
        keys = np.ascontiguousarray(k[b, :, kv, :].T)  # f[H, S]
        values = np.ascontiguousarray(v[b, :, kv, :])  # f[S, Hv]
        for start in range(0, q_len, block):
            rows = min(block, q_len - start)
            q_rows = np.ascontiguousarray(q[b, start:start + rows, n, :])  # f[R, H]
            scores = np.empty((rows, kv_len), dtype=q.dtype)
            _score_rows(q_rows, keys, scores)
            probs = np.empty((rows, kv_len), dtype=q.dtype)
            for r in range(rows):
                _scale_and_cap_row(scores[r], divisor, has_divisor, cap, has_cap)
                _masked_softmax_row(scores[r], mask[b, start + r], has_mask, masked_logit, probs[r])
            out_rows = np.empty((rows, v_dim), dtype=q.dtype)
            _weighted_rows(probs, values, out_rows)
            for r in range(rows):
                for h in range(v_dim):
                    out[b, start + r, n, h] = out_rows[r, h]


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
    """
    core_mask = None
    if _attention_supported(q, k, v, rnd):
        core_mask = _mask_for_core(mask, q.shape[0], q.shape[1], k.shape[1])
    if core_mask is None:
        return spec_attention.attention(q, k, v, mask, score_divisor=score_divisor,
                                        logit_soft_cap=logit_soft_cap, softmax_in_float32=softmax_in_float32,
                                        rnd=rnd)
    dtype = q.dtype.type
    out = np.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
    # Query rows per block: enough to amortise the block's set-up, few enough to keep scores in cache.
    block = 32
    _attention_heads(_c(q), _c(k), _c(v), core_mask,
                     mask is not None, dtype(1 if score_divisor is None else score_divisor),
                     score_divisor is not None, dtype(1 if logit_soft_cap is None else logit_soft_cap),
                     logit_soft_cap is not None, dtype(ops.MASKED_LOGIT), block, out)
    return out
