"""Ternary weights (BitNet b1.58): w = scale * t, t in {-1, 0, +1}, with the absmean scale
scale = mean(|w|) per group (fp16 stored) and t = clamp(round(w / scale), -1, 1).

Codes are t + 1 in {0, 1, 2}, stored in 2 bits.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.formats.base import Format, Params

_TINY = 1e-8


@dataclasses.dataclass(frozen=True)
class TernaryFormat(Format):
    """BitNet b1.58 absmean ternary quantization."""

    name = "ternary"

    @property
    def code_bits(self) -> int:
        return 2

    def params_from_blocks(self, blocks, tensor_params, importance=None) -> Params:
        # absmean needs every value of the group, not just the observer's [lo, hi]
        return {"scale": blocks.abs().mean(dim=-1).clamp_min(_TINY)}

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        # Fallback for callers that only have a range: amax / 2 puts the zero band at
        # |w| < amax / 4, about where absmean puts it for bell-shaped weights.
        amax = torch.maximum(lo.abs(), hi.abs())
        return {"scale": (amax / 2).clamp_min(_TINY)}

    def encode(self, W, p):
        return (torch.round(W / p["scale"]).clamp(-1, 1) + 1).to(torch.uint8)

    def decode(self, codes, p):
        return (codes.float() - 1) * p["scale"]

    def store_params(self, p):
        return {"scale": p["scale"].to(torch.float16)}

    def load_params(self, stored):
        return {"scale": stored["scale"].float().clamp_min(2.0**-24)}
