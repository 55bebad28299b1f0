"""Dtype policies: which dtype the arrays have, and where keras' bfloat16 rounding is emulated.

keras-hub runs a model under one of four policies; refimpl adds float64 as the oracle mode:

    policy            arrays    rounding to bf16 at keras' cast points
    float32           float32   none
    float64           float64   none            (the ground truth for golden cases)
    bfloat16          float32   weights, and every layer output in the compute dtype
    mixed_bfloat16    float32   as bfloat16, but weights stay float32 where keras reads them without autocast

bf16 is emulated, not stored: a bf16 value is a float32 whose low 16 bits are zero. ``round_to_bfloat16`` is the
one place where that rounding happens; the forward pass calls it through ``Policy.cast`` at the cast points that
spec section 7 lists (norms and the decoder softmax compute in float32 and round their output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICY_NAMES = ("float32", "float64", "bfloat16", "mixed_bfloat16")


def identity(x: np.ndarray) -> np.ndarray:
    """The rounding of the float32 and float64 policies: none. Kernels test ``rnd is identity`` to go fast."""
    return x


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32. NaN stays NaN.

    bf16 keeps the top 16 bits of a float32. Adding 0x7FFF plus the lowest kept bit, then truncating, is
    round-to-nearest-even on the bit pattern; overflow carries into the exponent and gives inf, as it should.
    A NaN becomes the quiet bf16 NaN of its sign (0x7FC0 / 0xFFC0, as ml_dtypes casts it): the addition could
    carry a NaN into infinity, and keeping it unchanged would leave payload bits below the bf16 mantissa.
    """
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    lowest_kept_bit = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + lowest_kept_bit) & np.uint32(0xFFFF0000)
    quiet_nan = (bits & np.uint32(0x80000000)) | np.uint32(0x7FC00000)
    return np.where(np.isnan(x), quiet_nan, rounded).view(np.float32)


def bfloat16_bits_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (uint16) to float32: the pattern becomes the top half of a float32."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass(frozen=True)
class Policy:
    """A dtype policy. ``dtype`` is the numpy dtype of every array; ``bf16`` turns on rounding emulation."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"dtype={self.name!r} is not a supported policy; expected one of {POLICY_NAMES}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self.name == "float64" else np.float32)

    @property
    def bf16(self) -> bool:
        return self.name in ("bfloat16", "mixed_bfloat16")

    @property
    def mixed(self) -> bool:
        return self.name == "mixed_bfloat16"

    @property
    def rounding(self):
        """Rounding applied to every tensor keras produces in the compute dtype: bf16 or none."""
        return round_to_bfloat16 if self.bf16 else identity

    def cast(self, x: np.ndarray) -> np.ndarray:
        """Cast to the compute dtype, as keras does when a layer returns or receives a tensor."""
        x = np.asarray(x, dtype=self.dtype)
        return round_to_bfloat16(x) if self.bf16 else x

    def scalar(self, value: float) -> np.ndarray:
        """A float32 constant cast to the compute dtype (keras computes sqrt(D) etc. in float32 first)."""
        if self.name == "float64":
            return np.float64(value)
        return self.cast(np.float32(value))[()]


def policy_from_keras(dtype) -> Policy:
    """Accept None, a policy name, a ``Policy`` or a serialized keras ``DTypePolicy`` dict."""
    if dtype is None:
        return Policy("float32")
    if isinstance(dtype, Policy):
        return dtype
    if isinstance(dtype, dict):
        if dtype.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy"):
            raise ValueError(f"dtype: unsupported keras dtype policy class {dtype.get('class_name')!r}; "
                             "expected DTypePolicy (quantized policies are not supported)")
        dtype = (dtype.get("config") or {}).get("name")
    if isinstance(dtype, str):
        return Policy(dtype)
    raise ValueError(f"dtype: expected None, a policy name {POLICY_NAMES} or a keras DTypePolicy dict, "
                     f"found {type(dtype).__name__}")
