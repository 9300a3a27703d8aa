"""NF4 (QLoRA NormalFloat 4-bit): 16 levels at normal quantiles in [-1, 1], per-group absmax scale.

w = NF4[code] * absmax. absmax is stored fp32, or with ``double_quant`` quantized again as in
QLoRA ("double quantization"): the absmax values of the tensor (all rows and groups, flattened
row-major) minus their mean are quantized in blocks of 256 values to symmetric int8,
    q = clamp(round((absmax - mean) / s_b), -127, 127),  s_b = max |absmax - mean| over block / 127,
stored as int8 codes shaped like absmax (rows, n_groups), one fp32 s_b per block (1-D) and the
fp32 mean (0-d); absmax = q * s_b + mean. (bitsandbytes uses its 8-bit dynamic map instead of
linear int8; the storage cost is the same, 8 bits per group + 32 bits per 256 groups.)
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.formats.base import Format, Params, nearest_level

# bitsandbytes functional.get_4bit_type("nf4") / QLoRA appendix: index 7 is exact zero, the
# table is asymmetric (8 positive levels, 7 negative) so that 0 is representable.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
DQ_BLOCK = 256
_TINY = 1e-8


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels as float32, ascending."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def double_quantize(absmax: torch.Tensor) -> Params:
    """int8 codes (absmax's shape), fp32 scale per 256-block (1-D) and fp32 mean (0-d)."""
    flat = absmax.float().reshape(-1)
    mean = flat.mean()
    centred = flat - mean
    pad = (-flat.numel()) % DQ_BLOCK
    blocks = torch.cat([centred, centred.new_zeros(pad)]).view(-1, DQ_BLOCK)
    scale = (blocks.abs().amax(dim=1) / 127).clamp_min(_TINY)
    q = torch.round(blocks / scale[:, None]).clamp(-127, 127)
    codes = q.reshape(-1)[: flat.numel()].view(absmax.shape).to(torch.int8)
    return {"absmax_q": codes, "absmax_scale": scale, "absmax_mean": mean.reshape(())}


def double_dequantize(stored: Params) -> torch.Tensor:
    """float32 absmax (shape of the codes) from double_quantize's output."""
    codes = stored["absmax_q"]
    flat = codes.reshape(-1).float()
    block = torch.arange(flat.numel()) // DQ_BLOCK
    absmax = flat * stored["absmax_scale"].float()[block] + stored["absmax_mean"].float()
    return absmax.view(codes.shape)


@dataclasses.dataclass(frozen=True)
class NF4Format(Format):
    """NormalFloat 4-bit codes with a per-group absmax, optionally double-quantized."""

    name = "nf4"
    double_quant: bool = False

    @property
    def rows_independent(self) -> bool:
        return not self.double_quant   # the absmax values of all rows are quantized together

    @property
    def code_bits(self) -> int:
        return 4

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        return {"absmax": torch.maximum(lo.abs(), hi.abs()).clamp_min(_TINY)}

    def encode(self, W, p):
        return nearest_level(W / p["absmax"], nf4_levels())

    def decode(self, codes, p):
        return nf4_levels()[codes.long()] * p["absmax"]

    def store_params(self, p):
        if self.double_quant:
            return double_quantize(p["absmax"])
        return {"absmax": p["absmax"].to(torch.float32)}

    def load_params(self, stored):
        absmax = double_dequantize(stored) if "absmax_q" in stored else stored["absmax"].float()
        # double quantization can take a tiny absmax to <= 0; keep W / absmax finite
        return {"absmax": absmax.clamp_min(_TINY)}
