"""Memory calculator: weights at a bit-width, scale overhead, and KV cache."""

from __future__ import annotations

import dataclasses
import re

from lowbit.errors import SchemeError

# (layers, kv_heads, head_dim) of well-known dense LLaMA-family sizes, for the KV-cache estimate
KNOWN_ARCHS = {
    7e9: (32, 32, 128), 8e9: (32, 8, 128), 13e9: (40, 40, 128), 70e9: (80, 8, 128), 405e9: (126, 8, 128),
}

# bits of one code and of each per-group parameter, by format name
FORMAT_BITS = {
    "fp32": (32, 0), "fp16": (16, 0), "bf16": (16, 0), "int8": (8, 16), "fp8": (8, 32), "int4": (4, 16),
    "int3": (3, 16), "int2": (2, 16), "nf4": (4, 32), "fp4": (4, 16), "mxfp4": (4, 8), "mxfp8": (8, 8),
    "nvfp4": (4, 8), "ternary": (2, 16),
}
FIXED_GROUPS = {"mxfp4": 32, "mxfp8": 32, "nvfp4": 16}


def parse_count(text: str) -> float:
    """'70B', '7.5b', '135M', '1e9' -> number of parameters."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not m:
        raise SchemeError(f"cannot read model size {text!r}; write it like 70B, 135M or 7e9")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]


@dataclasses.dataclass
class SizeEstimate:
    params: float
    format: str
    bits: int
    group_size: int
    asymmetric: bool
    weight_bytes: float        # codes only: params * bits / 8
    scale_bytes: float         # per-group scales (and zero-points)
    kv_cache_bytes: float | None
    total_bytes: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate(params: float, fmt: str = "int4", group_size: int = 128, asymmetric: bool = False,
             context: int = 0, batch: int = 1, kv_bits: int = 16,
             arch: tuple[int, int, int] | None = None) -> SizeEstimate:
    """Bytes needed to hold a model of `params` weights in `fmt`, plus KV cache if asked."""
    if fmt not in FORMAT_BITS:
        raise SchemeError(f"unknown format {fmt!r} for the size calculator; choose one of: {', '.join(FORMAT_BITS)}")
    bits, param_bits = FORMAT_BITS[fmt]
    group = FIXED_GROUPS.get(fmt, group_size)
    weight_bytes = params * bits / 8
    scale_bytes = 0.0
    if param_bits and group > 0:
        per_group = param_bits + (bits if asymmetric and fmt.startswith("int") else 0)
        scale_bytes = params / group * per_group / 8
    kv = None
    if context > 0:
        arch = arch or KNOWN_ARCHS.get(min(KNOWN_ARCHS, key=lambda k: abs(k - params)))
        layers, kv_heads, head_dim = arch
        kv = 2 * layers * kv_heads * head_dim * context * batch * kv_bits / 8
    return SizeEstimate(params, fmt, bits, group, asymmetric, weight_bytes, scale_bytes, kv,
                        weight_bytes + scale_bytes + (kv or 0.0))
