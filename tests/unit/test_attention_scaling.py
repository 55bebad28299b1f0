"""Attention at 896 px: 4096 image tokens plus text, without materialising every head's score matrix at once.

Both kernel sets walk the query heads one at a time: the spec (``refimpl.attention.attention``) with a whole head's
scores, the numba twin ``ATTENTION_BLOCK_ROWS`` (256) query rows at a time. One head's f32[T, S] score matrix at
T = S = 4352 is 75.8 MB; holding all N heads' scores would need N of them. Both are measured with tracemalloc,
which counts NumPy's allocations exactly (the numba twin allocates through NumPy too; its compiled passes work in
place).

- The spec (NumPy) is measured with tracemalloc, which counts NumPy's allocations exactly. Its softmax peaks with
  five such temporaries alive (scores, masked logits, exp'd logits, probabilities, masked probabilities) plus the
  previous head's probabilities, not yet replaced: 6 matrices for any N >= 2 (5 for N = 1).
- The numba twin never holds even one whole matrix: beside its output it has at most two blocks of scores (the
  next block is computed before the name of the previous one is rebound), each turned into probabilities in
  place, and a block's small f[256, H] product with the values.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from refimpl.attention import prefix_lm_mask
from refimpl.kernels import NUMPY_KERNELS, get_kernels
from tests.memory import traced_peak

IMAGE_TOKENS = 4096  # 896 px / 14 px patches, squared
TEXT_TOKENS = 256  # 4352 positions in all
SPEC_TEMPORARIES = 6  # one head's score-sized temporaries at the spec's peak (module docstring)


def _inputs(num_heads: int, num_kv_heads: int, head_dim: int, seed: int = 0):
    """q f32[1, L, N, H] (already scaled by 1/sqrt(H)), k, v f32[1, L, K, H], prefix-LM mask bool[1, L, L]."""
    rng = np.random.default_rng(seed)
    length = IMAGE_TOKENS + TEXT_TOKENS
    q = rng.standard_normal((1, length, num_heads, head_dim), dtype=np.float32) * np.float32(head_dim ** -0.5)
    k = rng.standard_normal((1, length, num_kv_heads, head_dim), dtype=np.float32)
    v = rng.standard_normal((1, length, num_kv_heads, head_dim), dtype=np.float32)
    response = np.arange(TEXT_TOKENS)[None, :] >= TEXT_TOKENS // 2  # prompt, then a causal response
    mask = prefix_lm_mask(np.ones((1, TEXT_TOKENS), bool), response, IMAGE_TOKENS)
    return q, k, v, mask


def _one_head_scores(q, k) -> int:
    return q.shape[1] * k.shape[1] * q.itemsize


@pytest.fixture(scope="module")
def small_heads():
    """896 px positions with 4 narrow query heads on 2 kv heads: big score matrices, cheap matmuls."""
    return _inputs(num_heads=4, num_kv_heads=2, head_dim=8)


def test_spec_attention_holds_one_head_of_temporaries(small_heads):
    q, k, v, mask = small_heads
    peak, out = traced_peak(lambda: NUMPY_KERNELS.attention(q, k, v, mask))
    one_head = _one_head_scores(q, k)
    assert out.shape == q.shape and np.isfinite(out).all()
    # The extra 2% covers the per-head vectors (row maxima and sums, f[1, T, 1]) and the output.
    assert peak < (SPEC_TEMPORARIES + 0.02) * one_head, (peak / one_head, "score matrices of one head")


@pytest.mark.numba
def test_numba_attention_never_holds_a_whole_score_matrix(small_heads):
    pytest.importorskip("numba", reason="numba not installed")
    from refimpl.kernels.numba_kernels import ATTENTION_BLOCK_ROWS
    from tests.test_kernel_parity import assert_within_bound

    q, k, v, mask = small_heads
    numba_kernels = get_kernels("numba")
    numba_kernels.attention(q[:, :8], k[:, :8], v[:, :8], mask[:, :8, :8])  # compile or load from the cache first
    peak, out = traced_peak(lambda: numba_kernels.attention(q, k, v, mask))
    block = ATTENTION_BLOCK_ROWS * k.shape[1] * q.itemsize
    assert peak < out.nbytes + 2.1 * block, ((peak - out.nbytes) / block, "blocks of scores")
    assert peak < _one_head_scores(q, k) / 5  # 2 x 256 of 4352 rows, plus the output
    # Query rows are independent: check a spread of them (image, prompt and response rows) against the spec.
    rows = np.linspace(0, q.shape[1] - 1, 48).astype(int)
    args = (q[:, rows], k, v, mask[:, rows])
    assert_within_bound("attention", args, {}, out[:, rows], NUMPY_KERNELS.attention(*args))


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", ["numpy", pytest.param("numba", marks=pytest.mark.numba)])
def test_full_width_896px_decoder_attention_runs(kernel_set):
    """PaliGemma 1 at 896 px: 8 query heads on 1 kv head of 256, 4352 positions; prints time and memory growth."""
    if kernel_set == "numba":
        pytest.importorskip("numba", reason="numba not installed")
    q, k, v, mask = _inputs(num_heads=8, num_kv_heads=1, head_dim=256)
    kernels = get_kernels(kernel_set)
    kernels.attention(q[:, :8], k[:, :8], v[:, :8], mask[:, :8, :8])
    start = time.perf_counter()
    growth, out = traced_peak(lambda: kernels.attention(q, k, v, mask))
    seconds = time.perf_counter() - start
    one_head = _one_head_scores(q, k)
    flops = 2 * 2 * q.shape[1] * k.shape[1] * q.shape[2] * q.shape[3]
    print(f"\n{kernel_set}: {seconds:.2f} s, {flops / seconds / 1e9:.1f} GFLOP/s, peak growth "
          f"{growth / 1e6:.0f} MB = {growth / one_head:.2f} score matrices of one head")
    assert out.shape == q.shape and np.isfinite(out).all()
    if kernel_set == "numpy":
        assert growth < out.nbytes + (SPEC_TEMPORARIES + 0.02) * one_head
    else:
        from refimpl.kernels.numba_kernels import ATTENTION_BLOCK_ROWS

        assert growth < out.nbytes + 2.1 * ATTENTION_BLOCK_ROWS * k.shape[1] * q.itemsize
