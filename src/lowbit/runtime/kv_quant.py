"""KV-cache numerics: quantize/dequantize pairs over key or value states, and the cache's size.

States have the cache layout (batch, kv_heads, tokens, head_dim). Every stored tensor keeps the
token axis at -2, so codes and scales of new tokens are appended with one `torch.cat`.

- absmax (int8, fp8 E4M3): symmetric, one fp16 scale per (token, head) over head_dim, or one per
  head over the tokens and head_dim of the prefill (then frozen: later tokens saturate to it);
- minmax groups (int4, KIVI values, asymmetric int8): one fp16 scale and fp16 minimum per group
  of `group` channels of one token; codes packed along head_dim (two per byte at 4 bits, four at 2);
- channel blocks (KIVI keys): asymmetric, one fp16 scale and minimum per channel over a block of
  `block` tokens (keys have outlier channels, so they are grouped per channel, KIVI section 3).

Asymmetric ranges are min-max, or with ``clip="mse"`` the pair (min + a·range, max - b·range),
a, b in {0, 0.05, ..., 0.25}, of least squared error after fp16 rounding of scale and minimum: at
2 bits clipping the tails beats covering them; at 4 bits it clips outlier channels that attention
needs (measured in bench/results/kv_cache.md), so min-max is the 4-bit default.
"""

from __future__ import annotations

import torch

from lowbit.formats.fp8 import encode_fp8

SCALE_DTYPE = torch.float16
# fp16's smallest normal number: a scale never underflows to zero (an all-zero group decodes to 0)
_SCALE_MIN = float(torch.finfo(torch.float16).tiny)
INT8_MAX = 127
FP8_MAX = 448.0  # E4M3 "fn"


# ---- scales -----------------------------------------------------------------------------------

def absmax_scale(x: torch.Tensor, qmax: float, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """fp16 scale = amax(|x|) / qmax over `dims` (kept as size-1 dims)."""
    amax = x.float().abs().amax(dim=dims, keepdim=True)
    return (amax / qmax).clamp_min(_SCALE_MIN).to(SCALE_DTYPE)


CLIPS = ("minmax", "mse")
_CLIP_STEPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)   # fractions of the range cut from each end ("mse")


def minmax_params(x: torch.Tensor, bits: int, dim: int, clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, minimum) in fp16 over `dim` (kept): scale = (hi - lo) / (2^bits - 1), with (lo, hi)
    the min and max, or ("mse") the clipped pair of least squared error (ties keep min-max)."""
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    if clip == "minmax":
        scale = ((hi - lo) / levels).clamp_min(_SCALE_MIN)
        return scale.to(SCALE_DTYPE), lo.to(SCALE_DTYPE)
    if clip != "mse":
        raise ValueError(f"unknown KV range clip {clip!r}")
    span = hi - lo
    best = None
    for a in _CLIP_STEPS:
        for b in _CLIP_STEPS:
            scale = ((span * (1 - a - b)) / levels).clamp_min(_SCALE_MIN).to(SCALE_DTYPE)
            minimum = (lo + a * span).to(SCALE_DTYPE)
            s, m = scale.float(), minimum.float()
            err = (torch.round((xf - m) / s).clamp(0, levels) * s + m - xf).square().sum(dim=dim, keepdim=True)
            if best is None:
                best = [err, scale, minimum]
                continue
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, minimum, best[2])]
    return best[1], best[2]


# ---- symmetric absmax: int8 and fp8 ---------------------------------------------------------------

def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes round(x / scale), saturated to +-127."""
    return torch.round(x.float() / scale.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in `dtype`."""
    return (codes.float() * scale.float()).to(dtype)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of x / scale (lowbit's own round-to-nearest-even encoder, saturating)."""
    return encode_fp8(x.float() / scale.float(), "e4m3").view(torch.float8_e4m3fn)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in `dtype` (torch's float8 cast decodes)."""
    return (codes.float() * scale.float()).to(dtype)


# ---- packing along head_dim -------------------------------------------------------------------------

def pack_last(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) codes < 2^bits -> (..., D * bits / 8) uint8; code i of a byte in bits [i*bits, (i+1)*bits)."""
    per = 8 // bits
    d = codes.shape[-1]
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], d // per, per)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (i * bits)
    return out


def unpack_last(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_last: (..., D * bits / 8) uint8 -> (..., D) uint8 codes."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


# ---- asymmetric minmax: groups along head_dim (int4, KIVI values) ------------------------------------

def quantize_minmax(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes round((x - minimum) / scale) in [0, 2^bits - 1] (unpacked)."""
    q = torch.round((x.float() - minimum.float()) / scale.float())
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8)


def dequantize_minmax(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """codes * scale + minimum in `dtype`."""
    return (codes.float() * scale.float() + minimum.float()).to(dtype)


def quantize_token_groups(x: torch.Tensor, bits: int, group: int,
                          clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes (..., T, D*bits/8), scale (..., T, D/group), minimum (..., T, D/group)):
    each token's head_dim cut into groups of `group` channels, each with its own range."""
    *lead, d = x.shape
    xg = x.reshape(*lead, d // group, group)                 # (..., T, groups, group)
    scale, minimum = minmax_params(xg, bits, dim=-1, clip=clip)   # (..., T, groups, 1)
    codes = quantize_minmax(xg, scale, minimum, bits).reshape(*lead, d)
    return pack_last(codes, bits), scale.squeeze(-1), minimum.squeeze(-1)


def dequantize_token_groups(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_token_groups, (..., T, D) in `dtype`."""
    codes = unpack_last(packed, bits)
    *lead, d = codes.shape
    n_groups = scale.shape[-1]
    cg = codes.reshape(*lead, n_groups, d // n_groups)
    return dequantize_minmax(cg, scale.unsqueeze(-1), minimum.unsqueeze(-1), dtype).reshape(*lead, d)


# ---- asymmetric minmax: per channel over blocks of tokens (KIVI keys) -----------------------------

def quantize_channel_blocks(x: torch.Tensor, bits: int, block: int,
                            clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes (B, H, T, D*bits/8), scale (B, H, T/block, D), minimum (B, H, T/block, D)) of
    x (B, H, T, D) with T a multiple of `block`: each channel of each block of tokens has its range."""
    b, h, t, d = x.shape
    xb = x.reshape(b, h, t // block, block, d)               # (B, H, blocks, block, D)
    scale, minimum = minmax_params(xb, bits, dim=-2, clip=clip)   # (B, H, blocks, 1, D)
    codes = quantize_minmax(xb, scale, minimum, bits).reshape(b, h, t, d)
    return pack_last(codes, bits), scale.squeeze(-2), minimum.squeeze(-2)


def dequantize_channel_blocks(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int,
                              dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_channel_blocks, (B, H, T, D) in `dtype`."""
    codes = unpack_last(packed, bits)
    b, h, t, d = codes.shape
    n_blocks = scale.shape[-2]
    cb = codes.reshape(b, h, n_blocks, t // n_blocks, d)
    return dequantize_minmax(cb, scale.unsqueeze(-2), minimum.unsqueeze(-2), dtype).reshape(b, h, t, d)


# ---- sizes ----------------------------------------------------------------------------------------

def kivi_split(tokens: int, residual: int, block: int) -> tuple[int, int]:
    """(quantized, residual) token counts of a KIVI cache holding `tokens`: whole blocks leave the
    full-precision window while it would keep at least `residual` tokens without them."""
    quantized = max(0, (tokens - residual) // block * block)
    return quantized, tokens - quantized


def kv_bytes_per_head(kind: str, tokens: int, head_dim: int, *, granularity: str = "token", group_size: int = 32,
                      block: int = 32, residual: int = 128, sink: int = 0, symmetric: bool = True,
                      full_bytes: int = 2, residual_bytes: int = 2) -> int:
    """Bytes one KV head of one layer holds for `tokens` tokens of one sequence, keys and values,
    codes and fp16 scales: the single source of truth the cache's measured bytes are checked against.
    The first `sink` tokens and the full-precision window (`residual` most recent tokens, leaving
    it in whole `block`s for KIVI, one token at a time otherwise) take `residual_bytes` per element;
    `full_bytes`: element size of an unquantized cache. symmetric=False (int8): a scale and a
    minimum per token or group."""
    s = torch.finfo(SCALE_DTYPE).bits // 8
    d = head_dim
    if kind == "none":
        return 2 * tokens * d * full_bytes
    kivi = kind in ("kivi2", "kivi4")
    n_sink = min(sink, tokens)
    q, r = kivi_split(tokens - n_sink, residual, block if kivi else 1)
    kept = 2 * (n_sink + r) * d * residual_bytes
    if kind in ("int8", "fp8"):
        ranges = {"token": q, "group": q * (d // group_size), "head": 1 if q else 0}[granularity]
        per = q * d + ranges * s * (1 if symmetric else 2)   # asymmetric: a minimum beside each scale
    elif kind == "int4":
        per = q * d // 2 + q * (d // group_size) * 2 * s
    elif kivi:
        bits = int(kind[-1])
        keys = q * d * bits // 8 + (q // block) * d * 2 * s
        values = q * d * bits // 8 + q * (d // group_size) * 2 * s
        return keys + values + kept
    else:
        raise ValueError(f"unknown KV kind {kind!r}")
    return 2 * per + kept
