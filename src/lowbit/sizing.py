"""Memory calculator: weights at a bit-width, scale overhead, and KV cache."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

from lowbit.errors import SchemeError, SourceError

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


def nearest_arch(params: float) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the known LLaMA-family size nearest to `params`."""
    return KNOWN_ARCHS[min(KNOWN_ARCHS, key=lambda k: abs(k - params))]


@dataclasses.dataclass
class KVEstimate:
    """One KV cache's size for `batch` concurrent sequences of `context` tokens."""

    kind: str
    label: str
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    batch: int
    bytes_per_token: float   # one token of one sequence, all layers, keys and values (averaged over context)
    bits_per_element: float  # bytes_per_token * 8 / (2 * layers * kv_heads * head_dim)
    total_bytes: int         # bytes_per_token * context * batch, exactly as the cache stores it
    ratio_fp16: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def kv_estimate(kind: str, arch: tuple[int, int, int], context: int, batch: int = 1, residual: int | None = None,
                group_size: int = 32, sink: int | None = None) -> KVEstimate:
    """Bytes of a KV cache of `kind` (fp16 | int8 | fp8 | int4 | kivi2 | kivi4): layers x KV heads x head_dim x 2
    (keys, values) x bits/8 per token plus fp16 scales (and KIVI's fp16 window), x context x batch.
    The per-head count is the one the cache's measured bytes are tested against."""
    from lowbit.runtime.kv_cache import KVCacheSpec

    if KVCacheSpec(kind).kind == "none":   # the fp16 reference row: no window, no sink
        residual = sink = None
    spec = KVCacheSpec(kind, residual=residual, group_size=group_size, sink=sink)
    spec.check_head_dim(arch[2])
    layers, kv_heads, head_dim = arch
    total = spec.bytes_per_head(context, head_dim, full_bytes=2) * layers * kv_heads * batch
    fp16 = 2 * layers * kv_heads * head_dim * context * batch * 2
    per_token = total / max(1, context * batch)
    name = "fp16" if spec.kind == "none" else spec.kind
    return KVEstimate(name, "fp16" if spec.kind == "none" else spec.label(), layers, kv_heads, head_dim, context, batch, per_token,
                      per_token * 8 / (2 * layers * kv_heads * head_dim), total, total / max(1, fp16))


def arch_from_config(path: str | Path) -> tuple[tuple[int, int, int], int | None, float | None]:
    """((layers, kv_heads, head_dim), max_position_embeddings, parameter count or None) from a
    config.json or a model folder; the count comes from the folder's safetensors headers."""
    p = Path(path).expanduser()
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise SourceError(f"{path}: no config.json found; pass a model's config.json or its folder to --config")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{cfg_path}: not a readable JSON config ({e})") from None
    cfg = cfg.get("text_config", cfg)
    try:
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{cfg_path}: missing the attention geometry ({e}); pass --arch LAYERS KV_HEADS HEAD_DIM") from None
    params = None
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if files:
            params = float(sum(_safetensors_count(f) for f in files))
    return (layers, kv_heads, head_dim), cfg.get("max_position_embeddings"), params


def _safetensors_count(path: Path) -> int:
    """Elements of every tensor in a safetensors file, read from its JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
    return total


def estimate(params: float, fmt: str = "int4", group_size: int = 128, asymmetric: bool = False,
             context: int = 0, batch: int = 1, kv_bits: int = 16,
             arch: tuple[int, int, int] | None = None, kv: str | None = None,
             kv_residual: int | None = None, kv_sink: int | None = None) -> SizeEstimate:
    """Bytes needed to hold a model of `params` weights in `fmt`, plus KV cache if asked: at
    `kv_bits` per element, or, with `kv`, as that quantized cache stores it (see kv_estimate)."""
    if fmt not in FORMAT_BITS:
        raise SchemeError(f"unknown format {fmt!r} for the size calculator; choose one of: {', '.join(FORMAT_BITS)}")
    bits, param_bits = FORMAT_BITS[fmt]
    group = FIXED_GROUPS.get(fmt, group_size)
    weight_bytes = params * bits / 8
    scale_bytes = 0.0
    if param_bits and group > 0:
        per_group = param_bits + (bits if asymmetric and fmt.startswith("int") else 0)
        scale_bytes = params / group * per_group / 8
    if context > 0:
        arch = arch or nearest_arch(params)
        layers, kv_heads, head_dim = arch
        if kv is not None:
            kv_bytes = float(kv_estimate(kv, arch, context, batch, kv_residual, sink=kv_sink).total_bytes)
        else:
            kv_bytes = 2 * layers * kv_heads * head_dim * context * batch * kv_bits / 8
    else:
        kv_bytes = None
    return SizeEstimate(params, fmt, bits, group, asymmetric, weight_bytes, scale_bytes, kv_bytes,
                        weight_bytes + scale_bytes + (kv_bytes or 0.0))
