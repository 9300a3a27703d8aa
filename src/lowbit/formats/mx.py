"""OCP Microscaling (MX v1.0) formats: blocks of 32 elements share one E8M0 scale.

Shared scale X = 2^(floor(log2(amax)) - emax_elem) (spec section 6.3), emax_elem being the
exponent of the element format's largest normal (E2M1: 2, E4M3: 8), clamped to E8M0's range
[-127, 127]; elements are cast(x / X), saturating to the element max (the spec clamps; values
of a block's top binade can exceed the element max, e.g. 7.9 -> 6 for E2M1).

Stored: the scale as its E8M0 byte (unbiased exponent + 127; 255 would be NaN and is never
produced). A block of zeros gets exponent -127 (byte 0): log2(0) is -inf, which the clamp sends
to the bottom of the range, as the reference microxcaling library does; its elements are 0.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from lowbit.formats.base import Format, Params
from lowbit.formats.fp4 import E2M1
from lowbit.formats.fp8 import E4M3, Minifloat, decode_minifloat, encode_minifloat

E8M0_BIAS = 127


def shared_exponent(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """Unbiased E8M0 exponent floor(log2(amax)) - emax_elem, clamped to [-127, 127]."""
    amax = amax.float()
    # frexp gives floor(log2) exactly (log2 can round up just below a power of two)
    e = torch.frexp(amax)[1].to(torch.int32) - 1 - emax_elem
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS))
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def e8m0_value(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent in float32 (2^-127 is an fp32 subnormal, still exact)."""
    return torch.ldexp(torch.ones(exponent.shape), exponent.float())


@dataclasses.dataclass(frozen=True)
class _MXFormat(Format):
    """MX block format: E8M0 shared scale per 32 elements, minifloat elements."""

    fixed_group_size: ClassVar[int | None] = 32
    element: ClassVar[Minifloat] = E2M1
    emax_elem: ClassVar[int] = 2

    @property
    def code_bits(self) -> int:
        return self.element.bits

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        amax = torch.maximum(lo.abs(), hi.abs())
        return {"scale": e8m0_value(shared_exponent(amax, self.emax_elem))}

    def encode(self, W, p):
        return encode_minifloat(W / p["scale"], self.element)

    def decode(self, codes, p):
        return decode_minifloat(codes, self.element) * p["scale"]

    def store_params(self, p):
        # the scale is a power of two already; its exponent field is the whole E8M0 byte
        e = torch.frexp(p["scale"].float())[1].to(torch.int32) - 1
        return {"scale": (e.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)}

    def load_params(self, stored):
        return {"scale": e8m0_value(stored["scale"].to(torch.int32) - E8M0_BIAS)}


@dataclasses.dataclass(frozen=True)
class MXFP4Format(_MXFormat):
    """MXFP4: E2M1 elements (emax 2), 32 per E8M0 scale: 4.25 bits per weight."""

    name = "mxfp4"
    element = E2M1
    emax_elem = 2


@dataclasses.dataclass(frozen=True)
class MXFP8Format(_MXFormat):
    """MXFP8: E4M3 elements (emax 8), 32 per E8M0 scale: 8.25 bits per weight."""

    name = "mxfp8"
    element = E4M3
    emax_elem = 8
