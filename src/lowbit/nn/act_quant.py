"""Run-time fake quantization of a Linear's input (W8A8, FP8, W4A8, NVFP4 / MX W4A4).

The settings travel as a JSON-serialisable dict on the QuantizedTensor (``input_quant``), so
every exporter and the native format persist them with the weight:
{"format": "int" | "fp8_e4m3" | "fp8_e5m2" | "nvfp4" | "mxfp8" | "mxfp4", "bits": 8,
 "granularity": "token" | "tensor" | "block", "dynamic": bool, "symmetric": True,
 "observer": "minmax", "percentile": 99.9, "scale": float | None}
int / fp8: x ≈ q * scale, one scale per token (dynamic, the row's absmax / format max), per
tensor dynamic, or the calibrated per-tensor `scale` (static).
nvfp4: E4M3 block scales per 16 values of the last dim from each block, times a per-tensor
global scale: `scale` (static, calibrated absmax / (448 * 6)) or the current tensor's (dynamic).
mxfp8 / mxfp4: an E8M0 scale per 32 values of the last dim (OCP MX v1.0), always dynamic.
Block formats reuse the weight formats' own fit/encode/decode (lowbit.formats): the same
numbers for weights and activations.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError
from lowbit.formats import make_format
from lowbit.formats.base import round_half_even
from lowbit.formats.fp4 import E2M1_MAX
from lowbit.formats.fp8 import E4M3, VARIANTS, decode_fp8, encode_fp8
from lowbit.scheme import ACTIVATION_BLOCK, ActivationScheme

_TINY = 1e-12


def format_max(fmt: str, bits: int) -> float:
    """Largest magnitude of the per-tensor scaled grid: the value absmax maps to."""
    if fmt == "int":
        return float(2 ** (bits - 1) - 1)
    if fmt == "nvfp4":
        return E4M3.max * E2M1_MAX   # global scale = absmax / (448 * 6)
    if fmt.startswith("mx"):
        raise SchemeError(f"{fmt} activations have no per-tensor scale")
    return VARIANTS[fmt.removeprefix("fp8_")].max


def input_quant_spec(act: ActivationScheme, absmax: float | None = None) -> dict:
    """The serialisable settings for `act`; a static scheme needs the calibrated input absmax
    (already clipped by the scheme's observer)."""
    spec = {**dataclasses.asdict(act), "scale": None}
    if not act.dynamic:
        if absmax is None:
            raise SchemeError("static activation quantization needs calibration statistics")
        spec["scale"] = max(float(absmax), _TINY) / format_max(act.format, act.bits)
    return spec


def validate_spec(spec: dict) -> ActivationScheme:
    """The ActivationScheme of a stored spec (unknown keys or values are a SchemeError)."""
    fields = {f.name for f in dataclasses.fields(ActivationScheme)}
    unknown = set(spec) - fields - {"scale"}
    if unknown:
        raise SchemeError(f"activation quantization has unknown key(s) {sorted(unknown)}")
    act = ActivationScheme(**{k: v for k, v in spec.items() if k in fields})
    if not act.dynamic and spec.get("scale") is None:
        raise SchemeError("static activation quantization without a scale")
    return act


def _block_fake_quant(xf: torch.Tensor, fmt_name: str, global_scale: torch.Tensor | None) -> torch.Tensor:
    """x (..., features) through a weight block format along the last dim (a last, shorter
    block where the block does not divide the features)."""
    from lowbit.tensor import encode_matrix, expand_params, fit_groups, group_index

    fmt = make_format(fmt_name)
    X = xf.reshape(-1, xf.shape[-1])
    tp = fmt.tensor_params(X) if global_scale is None else {"global_scale": global_scale.reshape(())}
    block = min(ACTIVATION_BLOCK[fmt_name], X.shape[1])
    p = fit_groups(fmt, X, block, tensor_params=tp)
    codes = encode_matrix(fmt, X, p, block)
    out = fmt.decode(codes, expand_params(p, group_index(X.shape[1], block)))
    return out.reshape(xf.shape)


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """(features,) bool: the input columns where any token of this call reaches the threshold."""
    return (x2.abs() >= threshold).any(dim=0)


def outlier_split_scale(xf: torch.Tensor, threshold: float, qmax: float) -> torch.Tensor:
    """Per-token scales of LLM.int8's int8 part: each row's absmax over the values below the
    threshold (bitsandbytes zeroes the outlier values, not their whole columns, before it)."""
    return (xf.masked_fill(xf.abs() >= threshold, 0.0).abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_TINY)


def fake_quantize_input(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """x quantized to the activation grid and back (same dtype and shape)."""
    fmt, bits = spec["format"], spec["bits"]
    xf = x.float()
    if spec.get("outlier_threshold") is not None:   # LLM.int8: outlier columns pass through
        t = spec["outlier_threshold"]
        outl = outlier_columns(xf.reshape(-1, xf.shape[-1]), t)
        scale = outlier_split_scale(xf, t, format_max(fmt, bits))
        rest = round_half_even(xf.masked_fill(outl, 0.0) / scale).clamp(-format_max(fmt, bits), format_max(fmt, bits))
        return torch.where(outl, xf, rest * scale).to(x.dtype)
    if fmt in ACTIVATION_BLOCK:
        gs = None if (spec["dynamic"] or fmt != "nvfp4") else torch.tensor(spec["scale"], dtype=torch.float32)
        return _block_fake_quant(xf, fmt, gs).to(x.dtype)
    qmax = format_max(fmt, bits)
    if spec["dynamic"]:
        amax = xf.abs().amax(dim=-1, keepdim=True) if spec["granularity"] == "token" else xf.abs().amax()
        scale = (amax / qmax).clamp_min(_TINY)
    else:
        scale = torch.tensor(spec["scale"], dtype=torch.float32)
    if fmt == "int":
        q = round_half_even(xf / scale).clamp(-qmax, qmax) * scale
    else:
        q = decode_fp8(encode_fp8(xf / scale, fmt.removeprefix("fp8_")), fmt.removeprefix("fp8_")) * scale
    return q.to(x.dtype)
