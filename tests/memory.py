"""Memory measurement shared by the tests that bound what a call allocates."""

from __future__ import annotations

import tracemalloc
from typing import Callable, TypeVar

T = TypeVar("T")


def traced_peak(call: Callable[[], T]) -> tuple[int, T]:
    """(peak bytes allocated through Python's allocators during ``call()``, its result).

    tracemalloc sees NumPy's array buffers and h5py's, not memory that BLAS or compiled numba code takes directly.
    """
    tracemalloc.start()
    try:
        result = call()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()
