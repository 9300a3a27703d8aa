"""FP8 formats (OCP 8-bit floating point): E4M3 "fn" (max 448, no inf, NaN = S.1111.111) and
E5M2 (IEEE-like, max 57344), with one fp32 scale per group: scale = amax / fmt_max.

The encoder is lowbit's own integer/float arithmetic, not torch's float8 cast, so that torch's
casts can serve as an independent reference in tests. The same generic minifloat code encodes
E2M1 (FP4) elements, see ``lowbit.formats.fp4``.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import ClassVar, NamedTuple

import torch

from lowbit.formats.base import Format, Params, round_half_even

_TINY = 1e-12


class Minifloat(NamedTuple):
    """Bit layout of a small float: 1 sign bit, ebits exponent bits, mbits mantissa bits."""

    ebits: int
    mbits: int
    bias: int
    max: float  # largest finite value (the encoder saturates to it)
    nan_codes: tuple[int, ...] = ()  # magnitude codes that mean NaN (decoded as NaN)
    inf_codes: tuple[int, ...] = ()  # magnitude codes that mean infinity

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number; subnormals share its quantum."""
        return 1 - self.bias


E4M3 = Minifloat(4, 3, 7, 448.0, nan_codes=(0x7F,))
E5M2 = Minifloat(5, 2, 15, 57344.0, nan_codes=(0x7D, 0x7E, 0x7F), inf_codes=(0x7C,))
VARIANTS = {"e4m3": E4M3, "e5m2": E5M2}


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(a)) for a > 0 (frexp is exact, log2 may round up near powers of two)."""
    return torch.frexp(a)[1].to(torch.int32) - 1


def encode_minifloat(x: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Bit patterns (uint8) of x in the minifloat layout: round to nearest, ties to even,
    subnormals, saturation to +-max, the sign of zero kept (as IEEE casts do)."""
    x = x.float()
    sign = torch.signbit(x).to(torch.int32)
    a = x.abs().clamp(max=fmt.max)  # saturate: nothing rounds above max once clamped there
    # Quantum (spacing of representable values) at a's binade; subnormals use the emin binade.
    # Dividing by a power of two is exact, so torch.round (half to even) rounds exactly.
    e = torch.where(a > 0, _floor_log2(a), torch.full_like(sign, fmt.emin)).clamp(min=fmt.emin)
    quantum = torch.ldexp(torch.ones_like(a), (e - fmt.mbits).float())
    v = round_half_even(a / quantum) * quantum  # representable (a carry may move it up a binade)
    # Bit fields of the rounded value v.
    normal = v >= 2.0**fmt.emin
    ev = torch.where(normal, _floor_log2(v.clamp(min=2.0**fmt.emin)), torch.full_like(sign, fmt.emin))
    mant = (v / torch.ldexp(torch.ones_like(v), (ev - fmt.mbits).float())).to(torch.int32)
    exp_field = torch.where(normal, ev + fmt.bias, torch.zeros_like(ev))
    mant = torch.where(normal, mant - (1 << fmt.mbits), mant)  # drop the implicit leading 1
    code = (sign << (fmt.bits - 1)) | (exp_field << fmt.mbits) | mant
    return code.to(torch.uint8)


@lru_cache(maxsize=None)
def decode_table(fmt: Minifloat) -> torch.Tensor:
    """Value of every code (2^bits float32 entries), built from the bit layout."""
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32)
    mag = codes & ((1 << (fmt.bits - 1)) - 1)
    exp_field = mag >> fmt.mbits
    mant = (mag & ((1 << fmt.mbits) - 1)).double()
    # exp_field 0: subnormal 0.m * 2^emin; otherwise 1.m * 2^(exp_field - bias)
    frac = torch.where(exp_field == 0, mant, mant + (1 << fmt.mbits)) / (1 << fmt.mbits)
    exp = torch.where(exp_field == 0, torch.full_like(exp_field, fmt.emin), exp_field - fmt.bias)
    vals = frac * torch.pow(2.0, exp.double())
    for c in fmt.inf_codes:
        vals[mag == c] = float("inf")
    for c in fmt.nan_codes:
        vals[mag == c] = float("nan")
    vals = torch.where(codes >> (fmt.bits - 1) == 1, -vals, vals)
    return vals.float()


def decode_minifloat(codes: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """float32 values of bit patterns (a table lookup)."""
    return decode_table(fmt)[codes.long()]


def encode_fp8(x: torch.Tensor, variant: str = "e4m3") -> torch.Tensor:
    """uint8 FP8 bit patterns of x ("e4m3" or "e5m2"), saturating to +-max."""
    return encode_minifloat(x, VARIANTS[variant])


def decode_fp8(codes: torch.Tensor, variant: str = "e4m3") -> torch.Tensor:
    """float32 values of FP8 bit patterns."""
    return decode_minifloat(codes, VARIANTS[variant])


@dataclasses.dataclass(frozen=True)
class _FP8Format(Format):
    """FP8 codes with an fp32 scale per group; the group's amax maps to the format's max."""

    variant: ClassVar[str] = "e4m3"

    @property
    def code_bits(self) -> int:
        return 8

    @property
    def fmt_max(self) -> float:
        return VARIANTS[self.variant].max

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        amax = torch.maximum(lo.abs(), hi.abs())
        return {"scale": (amax / self.fmt_max).clamp_min(_TINY)}

    def encode(self, W, p):
        return encode_fp8(W / p["scale"], self.variant)

    def decode(self, codes, p):
        return decode_fp8(codes, self.variant) * p["scale"]

    def store_params(self, p):
        return {"scale": p["scale"].to(torch.float32)}


@dataclasses.dataclass(frozen=True)
class FP8E4M3Format(_FP8Format):
    name = "fp8_e4m3"
    variant = "e4m3"


@dataclasses.dataclass(frozen=True)
class FP8E5M2Format(_FP8Format):
    name = "fp8_e5m2"
    variant = "e5m2"
