"""Integer affine formats, 2-8 bits: symmetric, or asymmetric with an integer zero-point
(GPTQ/AWQ/compressed-tensors style) or a float minimum (llama.cpp Q4_1 / HQQ style)."""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError
from lowbit.formats.base import Format, Params

_TINY = 1e-8


@dataclasses.dataclass(frozen=True)
class IntFormat(Format):
    """b-bit integers with an fp16 scale per group; codes are unsigned 0..2^b-1.

    symmetric: w = (code - 2^(b-1)) * scale, scale = absmax / (2^(b-1) - 1).
    asymmetric, zero_point="int": w = (code - zero) * scale, zero an integer in [0, 2^b-1].
    asymmetric, zero_point="float": w = code * scale + min, min stored in fp16.
    """

    name = "int"
    bits: int = 4
    symmetric: bool = True
    zero_point: str = "int"

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise SchemeError(f"integer format needs 2..8 bits, got {self.bits}; pass --bits between 2 and 8")
        if self.zero_point not in ("int", "float"):
            raise SchemeError(f"zero_point must be 'int' or 'float', got {self.zero_point!r}")

    @property
    def range_kind(self) -> str:  # type: ignore[override]
        return "absmax" if self.symmetric else "minmax"

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def signed_offset(self) -> int:
        return 1 << (self.bits - 1)

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = (amax / (self.signed_offset - 1)).clamp_min(_TINY)
            return {"scale": scale}
        if self.zero_point == "float":
            scale = ((hi - lo) / self.qmax).clamp_min(_TINY)
            return {"scale": scale, "min": lo}
        lo = lo.clamp(max=0)  # an integer zero-point must represent 0 exactly
        hi = hi.clamp(min=0)
        scale = ((hi - lo) / self.qmax).clamp_min(_TINY)
        zero = torch.round(-lo / scale).clamp(0, self.qmax)
        return {"scale": scale, "zero": zero}

    def encode(self, W, p):
        scale = p["scale"]
        if self.symmetric:
            q = torch.round(W / scale) + self.signed_offset
        elif self.zero_point == "float":
            q = torch.round((W - p["min"]) / scale)
        else:
            q = torch.round(W / scale) + p["zero"]
        return q.clamp(0, self.qmax).to(torch.uint8)

    def decode(self, codes, p):
        q = codes.float()
        if self.symmetric:
            return (q - self.signed_offset) * p["scale"]
        if self.zero_point == "float":
            return q * p["scale"] + p["min"]
        return (q - p["zero"]) * p["scale"]

    def store_params(self, p):
        out = {"scale": p["scale"].to(torch.float16)}
        if "zero" in p:
            out["zero"] = p["zero"].to(torch.uint8)
        if "min" in p:
            out["min"] = p["min"].to(torch.float16)
        return out

    def load_params(self, stored):
        p = {k: v.float() for k, v in stored.items()}
        # an fp16 scale can underflow to 0 for an all-zero group; keep decode finite
        p["scale"] = p["scale"].clamp_min(2.0**-24)
        return p
