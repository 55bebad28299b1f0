"""Parity of the numba kernel set with the spec (the NumPy set), by property, plus its fallbacks and lazy import.

``test_numba_kernel_matches_spec`` is the one parity test: it walks ``KERNEL_NAMES``, draws inputs for each
kernel with hypothesis (sizes 1, odd, prime, a few larger; masks with fully masked rows; grouped heads; soft-cap
and divisor) and compares the two sets elementwise against the bound tabled below.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl import attention as spec_attention
from refimpl import ops
from refimpl.dtypes import round_to_bfloat16
from refimpl.kernels import KERNEL_NAMES, NUMPY_KERNELS, Kernels, get_kernels

pytest.importorskip("numba", reason="numba not installed: the numba kernel set cannot be compared with the spec")

NUMBA_KERNELS = get_kernels("numba")
REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ the bound
#
# Allowed |numba - spec| per element = ULPS * eps(dtype) * n * scale, where `scale` is the size of the terms the
# element is built from and `n` counts the roundings that can differ, both per kernel (the functions below).
#
# Why: both sets do the same elementwise operations in the same dtype and order (rope and gelu_tanh agree bit for
# bit). They differ only in the order of additions inside sums: sequential in the kernels, pairwise in numpy,
# blocked in BLAS. Summing m terms in any such order errs by at most (m-1)u * sum|terms| (Higham, Accuracy and
# Stability of Numerical Algorithms, 2nd ed., sec. 4.2; u = eps/2), so two orders differ by at most m*eps*sum|terms|;
# the other operations add a few ulps each. ULPS = 4 covers those (square roots, divisions, exp, tanh) with room
# to spare while staying a worst-case bound, so it holds for any drawn input. In float64 it comes to 1e-14..2e-12
# of the term scale for the sizes drawn here: a logic bug (a wrong index, axis, constant, order) shows as an error
# of order one, far above it in either dtype. Observed errors stay below 12% of the bound (1000 examples per kernel
# and dtype); ten hand-made bugs in the kernels (GQA head mapping, masking, centring, signs, constants) all fail.
ULPS = 4


def _matmul_terms(x, w):
    return x.shape[-1], np.abs(x) @ np.abs(w)  # each output sums I products


def _layer_norm_terms(x, gamma, beta, eps):
    # A different mean shifts an output by (mean error) * rstd * gamma, the mean error being up to n*eps*mean|x|;
    # the rest is n*eps relative error on rstd and ulps on each term of x*inv + (beta - mean*inv).
    rstd = 1.0 / np.sqrt(x.astype(np.float64).var(axis=-1, keepdims=True) + eps)
    mean_abs = np.abs(x).mean(axis=-1, keepdims=True)
    return x.shape[-1] + 4, (np.abs(x) + mean_abs) * rstd * np.abs(gamma) + np.abs(beta)


def _rms_norm_terms(x, scale, eps):
    # A sum of squares has no cancellation: n*eps relative error on mean(x^2), half that after the square root.
    return x.shape[-1] + 4, np.abs(ops.rms_norm(x, scale, eps))


def _gelu_tanh_terms(x):
    return 4, np.abs(x)  # no sums, a few operations on x


def _rope_terms(x, cos, sin):
    # Two products and a sum per element, each at most the head vector's largest entry times |cos| or |sin|.
    return 4, np.abs(x).max(axis=-1, keepdims=True) * (np.abs(cos) + np.abs(sin))[:, None, :]


def _attention_terms(q, k, v, mask, *, score_divisor=None, logit_soft_cap=None, rnd=None):
    # A score sums H products, so it errs by up to H*eps*(sum of |products|) in absolute terms (divisor and soft-cap
    # only shrink that). The softmax turns absolute logit errors into relative probability errors (twice: numerator
    # and normalising sum, which adds S terms), and the output is a probability-weighted sum of value rows.
    group = q.shape[2] // k.shape[2]
    products = np.einsum("btnh,bsnh->btns", np.abs(q.astype(np.float64)), np.repeat(np.abs(k), group, axis=2))
    logit_terms = max(1.0, products.max() / (score_divisor or 1.0))
    return 2 * (q.shape[3] + 2) * logit_terms + 2 * k.shape[1] + 4, np.abs(v).max()


ERROR_TERMS = {
    "matmul": _matmul_terms,
    "layer_norm": _layer_norm_terms,
    "rms_norm": _rms_norm_terms,
    "gelu_tanh": _gelu_tanh_terms,
    "rope": _rope_terms,
    "attention": _attention_terms,
}


def allowed_error(name: str, args: tuple, kwargs: dict, out_shape: tuple) -> np.ndarray:
    """The bound on |numba - spec| for each output element of kernel `name` on these inputs."""
    n, scale = ERROR_TERMS[name](*args, **kwargs)
    return np.broadcast_to(ULPS * np.finfo(args[0].dtype).eps * n * np.asarray(scale), out_shape)


def assert_within_bound(name: str, args: tuple, kwargs: dict, got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    allowed = allowed_error(name, args, kwargs, ref.shape)
    error = np.abs(got.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(error - allowed), ref.shape)
    assert error[worst] <= allowed[worst], (
        f"{name} {ref.dtype} at {worst}: numba {got[worst]!r}, spec {ref[worst]!r}, "
        f"error {error[worst]:.3g} > allowed {allowed[worst]:.3g}")


# ----------------------------------------------------------------------------------------------- the inputs

# Axis sizes: 1, small odd and prime sizes that no unroll or vector width divides, and a few larger ones.
SIZES = st.one_of(st.integers(1, 9), st.sampled_from([13, 31, 64, 127, 257]))
SMALL = st.integers(1, 5)
LEADING = st.lists(SMALL, min_size=0, max_size=2)


@st.composite
def arrays(draw, shape, dtype, offset_allowed=False, scales=(1.0, 1e-3, 30.0)):
    """f[shape] of scaled normal values, from a drawn seed (hypothesis shrinks the seed, sizes and scales)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from(scales))
    offset = draw(st.sampled_from([0.0, 3.0])) * scale if offset_allowed else 0.0
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


@st.composite
def matmul_inputs(draw, dtype):
    inner = draw(SIZES)
    x = draw(arrays(tuple(draw(LEADING)) + (inner,), dtype))
    return (x, draw(arrays((inner, draw(SIZES)), dtype))), {}


@st.composite
def layer_norm_inputs(draw, dtype):
    width = draw(SIZES)
    x = draw(arrays(tuple(draw(LEADING)) + (width,), dtype, offset_allowed=True))
    gamma, beta = draw(arrays((width,), dtype)), draw(arrays((width,), dtype))
    return (x, gamma, beta, draw(st.sampled_from([1e-6, 1e-3]))), {}


@st.composite
def rms_norm_inputs(draw, dtype):
    width = draw(SIZES)
    x = draw(arrays(tuple(draw(LEADING)) + (width,), dtype, offset_allowed=True))
    return (x, draw(arrays((width,), dtype)), draw(st.sampled_from([1e-6, 1e-3]))), {}


@st.composite
def gelu_tanh_inputs(draw, dtype):
    return (draw(arrays(tuple(draw(st.lists(SIZES, min_size=0, max_size=3))), dtype)),), {}


@st.composite
def rope_inputs(draw, dtype):
    batch, length, heads = draw(SMALL), draw(SIZES), draw(SMALL)
    width = draw(st.one_of(st.sampled_from([2, 4, 8, 256]), st.integers(1, 33)))  # odd H too: the spec allows it
    angles = draw(arrays((length, width), np.float64))
    return (draw(arrays((batch, length, heads, width), dtype)), np.cos(angles).astype(dtype),
            np.sin(angles).astype(dtype)), {}


@st.composite
def attention_inputs(draw, dtype):
    batch, q_len, kv_len = draw(SMALL), draw(SIZES), draw(SIZES)
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))  # N = K * G
    head_dim = draw(st.sampled_from([1, 3, 8, 17, 32]))
    # Logits of order 1 to 30: larger ones make the softmax one-hot and the comparison uninformative.
    q = draw(arrays((batch, q_len, kv_heads * group, head_dim), dtype, scales=(1.0, 0.3, 1e-3)))
    k = draw(arrays((batch, kv_len, kv_heads, head_dim), dtype, scales=(1.0, 0.3)))
    v = draw(arrays((batch, kv_len, kv_heads, draw(st.sampled_from([head_dim, 5]))), dtype))
    kwargs = {"score_divisor": draw(st.sampled_from([None, float(np.sqrt(head_dim)), 0.7])),
              "logit_soft_cap": draw(st.sampled_from([None, 50.0, 2.0, 0.3]))}
    return (q, k, v, draw(masks(batch, q_len, kv_len))), kwargs


@st.composite
def masks(draw, batch, q_len, kv_len):
    """None, or bool[B, T, S] (sometimes bool[T, S], which the spec broadcasts) with some fully masked rows."""
    kind = draw(st.sampled_from(["none", "random", "random", "causal_2d"]))
    if kind == "none":
        return None
    if kind == "causal_2d":
        return spec_attention.causal_mask(np.arange(q_len) + max(0, kv_len - q_len), kv_len)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = rng.random((batch, q_len, kv_len)) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    mask[rng.random((batch, q_len)) < 0.2] = False  # fully masked rows must give zeros, not NaN
    return mask


INPUTS: dict[str, Callable] = {
    "matmul": matmul_inputs,
    "layer_norm": layer_norm_inputs,
    "rms_norm": rms_norm_inputs,
    "gelu_tanh": gelu_tanh_inputs,
    "rope": rope_inputs,
    "attention": attention_inputs,
}


# --------------------------------------------------------------------------------------------- the property


@pytest.mark.property
@pytest.mark.numba
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", KERNEL_NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_numba_kernel_matches_spec(name, dtype, data):
    spec_fn, numba_fn = getattr(NUMPY_KERNELS, name, None), getattr(NUMBA_KERNELS, name, None)
    assert callable(spec_fn) and callable(numba_fn), f"kernel {name!r} missing from a kernel set"
    assert name in INPUTS and name in ERROR_TERMS, f"kernel {name!r} has no input strategy or error bound: add them"
    args, kwargs = data.draw(INPUTS[name](np.dtype(dtype)), label="inputs")

    ref = spec_fn(*args, **kwargs)
    got = numba_fn(*args, **kwargs)

    assert np.all(np.isfinite(ref)), "the drawn inputs should keep the spec finite"
    assert_within_bound(name, args, kwargs, got, ref)


def test_every_kernel_has_an_input_strategy_and_a_bound():
    assert set(INPUTS) == set(ERROR_TERMS) == set(KERNEL_NAMES)


def test_kernel_names_are_the_function_fields():
    assert KERNEL_NAMES == tuple(f.name for f in fields(Kernels) if f.name != "name")
    assert NUMPY_KERNELS.name == "numpy" and NUMBA_KERNELS.name == "numba"
    assert NUMPY_KERNELS.attention is spec_attention.attention and NUMPY_KERNELS.layer_norm is ops.layer_norm


# ------------------------------------------------------------------------------------------- the fallbacks


def _spy(monkeypatch, module, name) -> list:
    """Replace module.name by a wrapper that records its calls (the numba wrappers look spec functions up there)."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


_RNG = np.random.default_rng(0)


def _rand(*shape, dtype=np.float32):
    return _RNG.standard_normal(shape).astype(dtype)


X, D = _rand(2, 3, 7), 7
Q, K, V = _rand(1, 4, 4, 8), _rand(1, 5, 2, 8), _rand(1, 5, 2, 8)
MASK = _RNG.random((1, 4, 5)) < 0.5

# Inputs the compiled cores do not take: each must reach the spec function and give its result exactly.
FALLBACK_INPUTS = {
    "bf16 rounding": ("attention", (Q, K, V, MASK), {"rnd": round_to_bfloat16}),
    "non-identity rnd": ("attention", (Q, K, V, None), {"rnd": lambda x: x + 0}),
    "float16 attention": ("attention", (Q.astype(np.float16), K.astype(np.float16), V.astype(np.float16), None), {}),
    "mixed q/k dtypes": ("attention", (Q, K.astype(np.float64), V, None), {}),
    "float16 layer_norm": ("layer_norm", (X.astype(np.float16), _rand(D), _rand(D), 1e-6), {}),
    "mixed layer_norm": ("layer_norm", (X, _rand(D, dtype=np.float64), _rand(D), 1e-6), {}),
    "broadcast gamma": ("layer_norm", (X, _rand(1, D), _rand(D), 1e-6), {}),
    "int rms_norm": ("rms_norm", (np.arange(14).reshape(2, 7), _rand(D), 1e-6), {}),
    "mixed rms_norm": ("rms_norm", (X.astype(np.float64), _rand(D), 1e-6), {}),
    "float16 gelu": ("gelu_tanh", (X.astype(np.float16),), {}),
    "empty gelu": ("gelu_tanh", (np.zeros((0, 3), np.float32),), {}),
    "batched matmul weights": ("matmul", (X, _rand(2, D, 5)), {}),
    "int matmul": ("matmul", (np.arange(6).reshape(2, 3), np.arange(12).reshape(3, 4)), {}),
    "broadcast cos": ("rope", (_rand(1, 3, 2, 4), _rand(1, 4), _rand(1, 4)), {}),
    "3-d rope": ("rope", (_rand(3, 2, 4), _rand(3, 1, 4), _rand(3, 1, 4)), {}),
}


@pytest.mark.numba
@pytest.mark.parametrize("label", list(FALLBACK_INPUTS))
def test_unsupported_inputs_fall_back_to_the_spec(label, monkeypatch):
    name, args, kwargs = FALLBACK_INPUTS[label]
    expected = getattr(NUMPY_KERNELS, name)(*args, **kwargs)
    calls = _spy(monkeypatch, spec_attention if name == "attention" else ops, name)
    got = getattr(NUMBA_KERNELS, name)(*args, **kwargs)
    assert calls == [name], f"{label}: the numba {name} did not fall back to the spec"
    assert got.dtype == expected.dtype and np.array_equal(got, expected, equal_nan=True)


# Inputs the cores take after a copy or a broadcast: no fallback, and parity within the bound.
SUPPORTED_INPUTS = {
    "transposed x": ("layer_norm", (X.transpose(1, 0, 2), _rand(D), _rand(D), 1e-6), {}),
    "strided x": ("rms_norm", (X[:, ::2], _rand(D), 1e-6), {}),
    "fortran gelu": ("gelu_tanh", (np.asfortranarray(X),), {}),
    "strided rope": ("rope", (_rand(2, 3, 2, 8)[:, :, ::-1], _rand(3, 8), _rand(3, 8)), {}),
    "2-d causal mask": ("attention", (Q, K, V, spec_attention.causal_mask(np.arange(4) + 1, 5)), {}),
    "read-only mask": ("attention", (Q, K, V, np.broadcast_to(MASK, MASK.shape)), {"score_divisor": 2.0}),
    "int mask": ("attention", (Q, K, V, MASK.astype(np.int64)), {"logit_soft_cap": 3.0}),
    "1-d matmul": ("matmul", (_rand(D), _rand(D, 3)), {}),
}


@pytest.mark.numba
@pytest.mark.parametrize("label", list(SUPPORTED_INPUTS))
def test_supported_inputs_do_not_fall_back(label, monkeypatch):
    name, args, kwargs = SUPPORTED_INPUTS[label]
    expected = getattr(NUMPY_KERNELS, name)(*args, **kwargs)
    calls = _spy(monkeypatch, spec_attention if name == "attention" else ops, name)
    got = getattr(NUMBA_KERNELS, name)(*args, **kwargs)
    assert calls == [], f"{label}: the numba {name} fell back to the spec"
    assert_within_bound(name, args, kwargs, got, expected)


def test_input_layouts_compile_no_new_signatures():
    """Read-only, strided, Fortran-ordered or broadcast inputs are copied to the one layout each core compiles for."""
    cores = sys.modules["refimpl.kernels.numba_kernels"]
    NUMBA_KERNELS.rms_norm(X, _rand(D), 1e-6)
    NUMBA_KERNELS.attention(Q, K, V, MASK)
    before = (len(cores._rms_norm_rows.signatures), len(cores._normalise_rows.signatures))
    read_only = X.copy()
    read_only.flags.writeable = False
    for x in (read_only, np.asfortranarray(X), X[:, ::2]):
        NUMBA_KERNELS.rms_norm(x, _rand(D), 1e-6)
    for mask in (None, MASK[0], np.broadcast_to(MASK, MASK.shape), MASK.astype(np.int8)):
        NUMBA_KERNELS.attention(Q, K, V, mask)
    assert (len(cores._rms_norm_rows.signatures), len(cores._normalise_rows.signatures)) == before


def test_fully_masked_rows_give_zeros():
    """The spec's convention (ops.masked_softmax): a query that sees no key outputs exactly 0, not NaN."""
    mask = np.ones((1, 4, 5), dtype=bool)
    mask[0, 2] = False
    got = NUMBA_KERNELS.attention(Q, K, V, mask)
    assert np.all(got[0, 2] == 0) and np.all(np.isfinite(got))


# ---------------------------------------------------------------------------------------- lazy import


def test_unknown_kernel_set_is_a_clear_error():
    with pytest.raises(ValueError, match=r"name='cuda' is unknown; expected one of \('numpy', 'numba'\)"):
        get_kernels("cuda")


def test_missing_numba_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    monkeypatch.delitem(sys.modules, "refimpl.kernels.numba_kernels")
    with pytest.raises(ImportError, match="kernel set 'numba' needs the numba package"):
        get_kernels("numba")


def test_numba_is_imported_and_compiled_only_on_demand():
    """Importing refimpl.kernels does not import numba; importing the twins compiles nothing."""
    script = (
        "import sys, refimpl.kernels as k\n"
        "assert 'numba' not in sys.modules, 'refimpl.kernels imported numba'\n"
        "from refimpl.kernels import numba_kernels as nk\n"
        "cores = [f for f in vars(nk).values() if hasattr(f, 'signatures')]\n"
        "assert len(cores) >= 5 and not any(f.signatures for f in cores), 'compiled at import'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)
