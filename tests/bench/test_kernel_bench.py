"""Benchmarks of the two kernel sets on PaliGemma 1 (224 px) shapes, and the numba set's first-call compile cost.

Not in the default run: ``python -m pytest -m bench tests/bench/test_kernel_bench.py``. Every timed call is first
checked against the spec with the parity bound of ``tests/test_kernel_parity.py``. Throughput goes into
``extra_info`` (GB/s moved through memory, GFLOP/s for matmul and attention); ``--benchmark-json`` keeps it.
Thread counts matter: the numba cores are single-threaded; numpy's BLAS (every matmul) follows OPENBLAS_NUM_THREADS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from refimpl import attention as spec_attention
from refimpl.kernels import KERNEL_NAMES, NUMPY_KERNELS, get_kernels

pytest.importorskip("numba", reason="numba not installed: nothing to compare the spec with")
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark not installed: pip install pytest-benchmark")

from tests.test_kernel_parity import assert_within_bound  # noqa: E402  (needs numba, hence after the skip)

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.bench, pytest.mark.numba]


def _normal(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _decoder_attention(rng):
    """Decoder self-attention: 256 image + 64 text tokens, prefix of 300, 8 query heads on 1 kv head of 256."""
    length, prefix = 320, 300
    mask = spec_attention.prefix_lm_mask(np.ones((1, length - 256), bool),
                                         np.arange(length - 256)[None, :] >= prefix - 256, 256)
    q = _normal(rng, 1, length, 8, 256, scale=256**-0.5)  # the decoder scales q by 1/sqrt(H) before attention
    return (q, _normal(rng, 1, length, 1, 256), _normal(rng, 1, length, 1, 256), mask), {}


def _vit_attention(rng):
    """SigLIP self-attention: 256 patches, 16 heads of 72, scores divided by sqrt(72), no mask."""
    qkv = [_normal(rng, 1, 256, 16, 72) for _ in range(3)]
    return (*qkv, None), {"score_divisor": float(np.sqrt(72))}


# name -> (kernel, inputs(rng) -> (args, kwargs), floating-point operations per call or 0 for memory-bound ones)
CASES = {
    "rms_norm f32[1,320,2048]": ("rms_norm", lambda r: ((_normal(r, 1, 320, 2048), _normal(r, 2048), 1e-6), {}), 0),
    "layer_norm f32[1,256,1152]": (
        "layer_norm", lambda r: ((_normal(r, 1, 256, 1152), _normal(r, 1152), _normal(r, 1152), 1e-6), {}), 0),
    "gelu_tanh f32[1,320,16384]": ("gelu_tanh", lambda r: ((_normal(r, 1, 320, 16384),), {}), 0),
    "rope f32[1,320,8,256]": (
        "rope", lambda r: ((_normal(r, 1, 320, 8, 256), _normal(r, 320, 256), _normal(r, 320, 256)), {}), 0),
    "matmul f32[1,320,2048]@[2048,2048]": (
        "matmul", lambda r: ((_normal(r, 1, 320, 2048), _normal(r, 2048, 2048)), {}), 2 * 320 * 2048 * 2048),
    "attention decoder B1 T=S=320 N8 K1 H256": ("attention", _decoder_attention, 2 * 2 * 8 * 320 * 320 * 256),
    "attention vit B1 T=S=256 N16 K16 H72": ("attention", _vit_attention, 2 * 2 * 16 * 256 * 256 * 72),
}


def _bytes_moved(args, out) -> int:
    return sum(a.nbytes for a in args if isinstance(a, np.ndarray)) + out.nbytes


@pytest.mark.parametrize("kernel_set", ["numpy", "numba"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_speed(benchmark, case, kernel_set):
    name, make_inputs, flops = CASES[case]
    args, kwargs = make_inputs(np.random.default_rng(0))
    fn = getattr(get_kernels(kernel_set), name)
    got = fn(*args, **kwargs)  # also compiles (or loads from the cache) before timing
    assert_within_bound(name, args, kwargs, got, getattr(NUMPY_KERNELS, name)(*args, **kwargs))

    benchmark.group = case
    benchmark(fn, *args, **kwargs)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["GB/s"] = round(_bytes_moved(args, got) / seconds / 1e9, 2)
    if flops:
        benchmark.extra_info["GFLOP/s"] = round(flops / seconds / 1e9, 2)


# Run in a fresh interpreter: the time of each kernel's first call on tiny inputs, per dtype, as JSON.
_FIRST_CALLS = """
import json, time
import numpy as np
t0 = time.perf_counter()
from refimpl.kernels import get_kernels
kernels = get_kernels("numba")
times = {"import": time.perf_counter() - t0}
for dtype in (np.float32, np.float64):
    x = np.ones((2, 3, 5), dtype)
    w = np.ones(5, dtype)
    q, k = np.ones((1, 3, 2, 4), dtype), np.ones((1, 3, 1, 4), dtype)
    calls = {
        "matmul": lambda: kernels.matmul(x, np.ones((5, 2), dtype)),
        "layer_norm": lambda: kernels.layer_norm(x, w, w, 1e-6),
        "rms_norm": lambda: kernels.rms_norm(x, w, 1e-6),
        "gelu_tanh": lambda: kernels.gelu_tanh(x),
        "rope": lambda: kernels.rope(q, np.ones((3, 4), dtype), np.ones((3, 4), dtype)),
        "attention": lambda: kernels.attention(q, k, k, np.ones((1, 3, 3), bool), logit_soft_cap=5.0),
    }
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        times[f"{name} {np.dtype(dtype).name}"] = time.perf_counter() - start
print(json.dumps(times))
"""


def _first_calls(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    done = subprocess.run([sys.executable, "-c", _FIRST_CALLS], cwd=REPO, env=env, check=True, timeout=600,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_first_call_compile_time(record_property):
    """Cold (empty on-disk cache: compile) against warm (load from the cache) first calls, in fresh processes."""
    with tempfile.TemporaryDirectory() as cache_dir:
        cold, warm = _first_calls(cache_dir), _first_calls(cache_dir)
    print(f"\n{'first call':20s} {'cold s':>8s} {'warm s':>8s}")
    for key in cold:
        print(f"{key:20s} {cold[key]:8.3f} {warm[key]:8.3f}")
        record_property(key, {"cold": cold[key], "warm": warm[key]})
    compiled = [key for key in cold if key != "import" and not key.startswith("matmul")]
    assert len(compiled) == 2 * (len(KERNEL_NAMES) - 1)
    # The on-disk cache must work: loading every kernel costs a fraction of compiling it.
    assert sum(warm[key] for key in compiled) < 0.5 * sum(cold[key] for key in compiled)
