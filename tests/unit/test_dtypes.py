"""bf16 rounding on hand-checked bit patterns, and the policy table."""

import numpy as np
import pytest

from refimpl.dtypes import Policy, bfloat16_bits_to_float32, policy_from_keras, round_to_bfloat16


def f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


@pytest.mark.parametrize("bits,expected", [
    (0x3F800000, 0x3F800000),  # 1.0 is exact
    (0x3F808000, 0x3F800000),  # halfway, kept bit 0 (even): round down
    (0x3F818000, 0x3F820000),  # halfway, kept bit 1 (odd): round up to even
    (0x3F808001, 0x3F810000),  # just above halfway: up
    (0x3F807FFF, 0x3F800000),  # just below halfway: down
    (0xBF818000, 0xBF820000),  # sign does not matter
    (0x7F7FFFFF, 0x7F800000),  # float32 max rounds to inf, as bf16 has no such value
    (0x00000001, 0x00000000),  # smallest subnormal rounds to zero
])
def test_round_to_nearest_even_on_bits(bits, expected):
    out = round_to_bfloat16(np.array([f32(bits)]))
    assert out.view(np.uint32)[0] == expected


def test_nan_stays_nan_and_values_are_idempotent():
    x = np.array([np.nan, np.inf, -np.inf, 3.14159, -2.5e-3], dtype=np.float32)
    once = round_to_bfloat16(x)
    assert np.isnan(once[0]) and once[1] == np.inf and once[2] == -np.inf
    np.testing.assert_array_equal(round_to_bfloat16(once[1:]), once[1:])


def test_widening_bf16_bits():
    np.testing.assert_array_equal(bfloat16_bits_to_float32(np.array([0x3F80, 0xC000, 0x0000], dtype=np.uint16)),
                                  np.array([1.0, -2.0, 0.0], dtype=np.float32))


def test_sqrt_scales_round_as_the_spec_says():
    bf16 = Policy("bfloat16")
    assert bf16.scalar(2048 ** 0.5) == 45.25 and bf16.scalar(2304 ** 0.5) == 48.0
    assert bf16.scalar(3584 ** 0.5) == 59.75 and bf16.scalar(72 ** 0.5) == 8.5
    assert bf16.scalar(128 ** -0.5) == 0.08837890625


def test_policies():
    assert policy_from_keras(None).name == "float32"
    assert policy_from_keras({"module": "keras", "class_name": "DTypePolicy", "config": {"name": "bfloat16"},
                              "registered_name": None}).bf16
    assert Policy("float64").dtype == np.float64
    with pytest.raises(ValueError, match="float16"):
        Policy("float16")
    with pytest.raises(ValueError, match="QuantizedDTypePolicy"):
        policy_from_keras({"class_name": "QuantizedDTypePolicy", "config": {"name": "int8_from_float32"}})
