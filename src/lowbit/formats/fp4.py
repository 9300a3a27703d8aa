"""FP4 E2M1 (OCP MX / NVIDIA FP4) with an fp16 scale per group: scale = amax / 6.

E2M1 magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6. A code is sign (bit 3) + 3-bit magnitude index,
which is the bit layout of the OCP spec and of torch's float4_e2m1fn_x2 nibbles (exponent bits
2-1, mantissa bit 0), so the magnitude index is just the E2M1 bit pattern.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.formats.base import Format, Params
from lowbit.formats.fp8 import Minifloat, decode_minifloat, encode_minifloat

# bias 1: exponent field 0 holds the subnormal 0.5, fields 1..3 the binades 1, 2, 4; no inf/NaN
E2M1 = Minifloat(2, 1, 1, 6.0)
E2M1_MAX = 6.0


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) of x: round to nearest, ties to the even mantissa (so 0.25 -> 0,
    0.75 -> 1, 2.5 -> 2, 5 -> 4), saturating to +-6."""
    return encode_minifloat(x, E2M1)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes."""
    return decode_minifloat(codes, E2M1)


@dataclasses.dataclass(frozen=True)
class FP4Format(Format):
    """E2M1 codes with one fp16 scale per group (the group's amax maps to 6)."""

    name = "fp4"

    @property
    def code_bits(self) -> int:
        return 4

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        amax = torch.maximum(lo.abs(), hi.abs())
        return {"scale": amax / E2M1_MAX}

    def encode(self, W, p):
        return encode_e2m1(W / p["scale"])

    def decode(self, codes, p):
        return decode_e2m1(codes) * p["scale"]

    def store_params(self, p):
        return {"scale": p["scale"].to(torch.float16)}

    def load_params(self, stored):
        # an all-zero group (or an fp16 underflow) gives scale 0; keep W / scale finite
        return {"scale": stored["scale"].float().clamp_min(2.0**-24)}
