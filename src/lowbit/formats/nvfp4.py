"""NVIDIA NVFP4: E2M1 elements in blocks of 16, an E4M3 scale per block and one FP32 scale
per tensor.

global_scale = amax(W) / (448 * 6), so the largest block scale (block amax / 6) lands on E4M3's
max 448; block_scale = E4M3((block_amax / 6) / global_scale); element = E2M1(x / (block_scale *
global_scale)). Stored: block scales as E4M3 bit patterns (uint8), the global scale fp32 0-d.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from lowbit.formats.base import Format, Params
from lowbit.formats.fp4 import E2M1_MAX, decode_e2m1, encode_e2m1
from lowbit.formats.fp8 import E4M3, decode_fp8, encode_fp8

_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class NVFP4Format(Format):
    """NVFP4 two-level scaling (E4M3 per 16 elements, FP32 per tensor)."""

    name = "nvfp4"
    fixed_group_size: ClassVar[int | None] = 16

    @property
    def code_bits(self) -> int:
        return 4

    def tensor_params(self, W) -> Params:
        gs = (W.detach().float().abs().amax() / (E4M3.max * E2M1_MAX)).clamp_min(_TINY)
        return {"global_scale": gs.reshape(())}

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        amax = torch.maximum(lo.abs(), hi.abs())
        # float here; store_params rounds it to E4M3 (fitting always round-trips through storage)
        return {"block_scale": (amax / E2M1_MAX) / tensor_params["global_scale"]}

    def _denominator(self, p):
        return p["block_scale"] * p["global_scale"]

    def encode(self, W, p):
        d = self._denominator(p)
        # a block scale that rounds to 0 in E4M3 decodes the whole block as 0 anyway
        x = torch.where(d > 0, W / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(W))
        return encode_e2m1(x)

    def decode(self, codes, p):
        return decode_e2m1(codes) * self._denominator(p)

    def store_params(self, p):
        return {"block_scale": encode_fp8(p["block_scale"], "e4m3"),
                "global_scale": p["global_scale"].to(torch.float32)}

    def load_params(self, stored):
        return {"block_scale": decode_fp8(stored["block_scale"], "e4m3"),
                "global_scale": stored["global_scale"].float()}
