"""Kernel sets: the hot functions of the forward pass, passed explicitly into the towers.

A kernel set is a frozen dataclass of functions. ``NUMPY_KERNELS`` points at the specification itself
(``refimpl.ops`` and ``refimpl.attention``); the numba set (``refimpl.kernels.numba_kernels``) holds compiled twins
with the same names, signatures and return conventions, and falls back to the spec for inputs it does not handle.
Parity between the two is enforced by ``tests/test_kernel_parity.py``, which walks ``KERNEL_NAMES``.

numba is imported only when ``get_kernels("numba")`` is called, so a NumPy-only install works.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from refimpl import attention, ops

KernelFn = Callable[..., np.ndarray]

# Names accepted by ``get_kernels``.
KERNEL_SET_NAMES = ("numpy", "numba")


@dataclass(frozen=True)
class Kernels:
    """One implementation of each kernel; every field has the signature of the spec function it names."""

    name: str  # "numpy" or "numba"
    matmul: KernelFn  # ops.matmul(x, w): f[..., I] @ f[I, O] -> f[..., O]
    layer_norm: KernelFn  # ops.layer_norm(x, gamma, beta, eps): f[..., D] -> f[..., D]
    rms_norm: KernelFn  # ops.rms_norm(x, scale, eps): f[..., D] -> f[..., D]
    gelu_tanh: KernelFn  # ops.gelu_tanh(x): elementwise
    rope: KernelFn  # ops.rope(x, cos, sin): f[B, T, heads, H], f[T, H], f[T, H] -> f[B, T, heads, H]
    attention: KernelFn  # attention.attention(q, k, v, mask, *, score_divisor, logit_soft_cap, rnd)


# The function fields of ``Kernels``, in declaration order: what the parity test walks.
KERNEL_NAMES = tuple(f.name for f in fields(Kernels) if f.name != "name")

NUMPY_KERNELS = Kernels(
    name="numpy",
    matmul=ops.matmul,
    layer_norm=ops.layer_norm,
    rms_norm=ops.rms_norm,
    gelu_tanh=ops.gelu_tanh,
    rope=ops.rope,
    attention=attention.attention,
)


def _numba_kernels() -> Kernels:
    """Import the numba twins (this is where numba itself gets imported) and bundle them."""
    try:
        module = importlib.import_module("refimpl.kernels.numba_kernels")
    except ImportError as error:
        if (error.name or "").partition(".")[0] not in ("numba", "llvmlite"):
            raise  # a bug in refimpl itself, not a missing numba
        raise ImportError(
            f"kernel set 'numba' needs the numba package, which could not be imported ({error}); "
            "install it with `pip install numba`, or use get_kernels('numpy')") from error
    return Kernels(name="numba", **{name: getattr(module, name) for name in KERNEL_NAMES})


def get_kernels(name: str) -> Kernels:
    """The kernel set called ``name``: "numpy" (the spec) or "numba" (compiled twins, imported on demand).

    Raises:
      ValueError: for an unknown name.
      ImportError: for "numba" when numba cannot be imported.
    """
    if name == "numpy":
        return NUMPY_KERNELS
    if name == "numba":
        return _numba_kernels()
    raise ValueError(f"kernel set name={name!r} is unknown; expected one of {KERNEL_SET_NAMES}")
