"""The bf16 emulation rounds exactly like round-to-nearest-even on the float32 bit patterns.

Two references: a pure-integer RNE written here (keep the top 16 bits; round up when the dropped 16 bits exceed
half, or equal half and the kept part is odd), and ``ml_dtypes.bfloat16`` casts (the dtype jax and keras use),
when ml_dtypes is importable. Drawn bit patterns cover zeros, subnormals, normals, the largest finite values
(which round to infinity), infinities, NaNs, and exact ties with both parities of the last kept bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.dtypes import bfloat16_bits_to_float32, round_to_bfloat16

pytestmark = pytest.mark.property

EXPONENT, MANTISSA = 0x7F800000, 0x007FFFFF
HALF = 0x8000  # the dropped 16 bits at exactly half a bf16 ulp


def rne_reference(bits: int) -> int:
    """float32 bits -> bf16 bits by round-to-nearest-even, in integers; a NaN becomes the quiet NaN of its sign."""
    if is_nan(bits):
        return (bits >> 16) & 0x8000 | 0x7FC0
    kept, dropped = bits >> 16, bits & 0xFFFF
    if dropped > HALF or (dropped == HALF and kept & 1):
        kept += 1  # a carry out of the mantissa steps the exponent: the largest finite values round to inf
    return kept & 0xFFFF


def is_nan(bits: int) -> bool:
    return (bits & EXPONENT) == EXPONENT and (bits & MANTISSA) != 0


def emulated_bits(bits: list[int]) -> np.ndarray:  # uint32[n] -> the top 16 bits of round_to_bfloat16
    x = np.array(bits, dtype=np.uint32).view(np.float32)
    out = round_to_bfloat16(x)
    assert out.dtype == np.float32 and np.all(out.view(np.uint32) & 0xFFFF == 0)  # a bf16 value, NaNs included
    return out.view(np.uint32) >> 16


@st.composite
def float32_bits(draw) -> int:
    sign = draw(st.sampled_from([0, 0x80000000]))
    kind = draw(st.sampled_from(["any", "tie", "near_tie", "subnormal", "special", "top"]))
    if kind == "any":
        return draw(st.integers(0, 2**32 - 1))
    if kind in ("tie", "near_tie"):
        kept = draw(st.integers(0, 0x7FFF))
        low = HALF if kind == "tie" else draw(st.sampled_from([HALF - 1, HALF + 1, 0, 0xFFFF, 1]))
        return sign | (kept << 16) | low
    if kind == "subnormal":
        return sign | draw(st.integers(0, MANTISSA))
    if kind == "top":  # the largest finite float32 values: round to the largest bf16 or overflow to inf
        return sign | draw(st.integers(0x7F7F0000, 0x7F7FFFFF))
    return sign | draw(st.sampled_from([0, EXPONENT, EXPONENT | 1, EXPONENT | HALF, 0x7FC00000, 0x7FFFFFFF,
                                        0x7F7FFFFF, 0x00800000, 0x00000001]))


@given(st.lists(float32_bits(), min_size=1, max_size=64))
def test_rounds_like_integer_round_to_nearest_even(bits):
    got = emulated_bits(bits)
    for value, rounded in zip(bits, got):
        assert int(rounded) == rne_reference(value), f"{value:#010x}: {int(rounded):#06x} != " \
                                                     f"{rne_reference(value):#06x}"


@given(st.lists(float32_bits(), min_size=1, max_size=64))
def test_rounds_like_ml_dtypes_bfloat16(bits):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed (it comes with jax): no "
                                                        "second reference for bf16 rounding")
    x = np.array(bits, dtype=np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):  # ml_dtypes warns when it casts a NaN
        expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(emulated_bits(bits), expected.astype(np.uint32))  # NaNs: the same quiet NaN


def test_every_bf16_value_and_every_tie_exhaustively():
    """All 2^16 kept halves, each with the dropped halves 0, 1, half-1, half, half+1 and all ones."""
    kept = np.arange(1 << 16, dtype=np.uint32) << 16
    for low in (0, 1, HALF - 1, HALF, HALF + 1, 0xFFFF):
        bits = kept | np.uint32(low)
        x = bits.view(np.float32)
        got = round_to_bfloat16(x).view(np.uint32)
        kept_part, odd = bits >> 16, (bits >> 16) & 1
        up = (low > HALF) | ((low == HALF) & (odd == 1))
        expected = ((kept_part + up.astype(np.uint32)) & 0xFFFF) << 16
        expected[np.isnan(x)] = (bits[np.isnan(x)] & 0x80000000) | 0x7FC00000
        np.testing.assert_array_equal(got, expected, err_msg=f"dropped half {low:#06x}")


def test_widening_is_the_top_half_of_a_float32():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = bfloat16_bits_to_float32(bits)
    np.testing.assert_array_equal(widened.view(np.uint32), bits.astype(np.uint32) << 16)
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed: no second reference")
    reference = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    finite = ~np.isnan(reference)
    np.testing.assert_array_equal(widened[finite].view(np.uint32), reference[finite].view(np.uint32))


def test_rounding_keeps_bf16_values():
    bits = np.arange(1 << 16, dtype=np.uint32) << 16
    x = bits.view(np.float32)
    keep = ~np.isnan(x) | ((bits & 0x7FFFFFFF) == 0x7FC00000)  # every bf16 value except non-canonical NaNs
    np.testing.assert_array_equal(round_to_bfloat16(x)[keep].view(np.uint32), bits[keep])
