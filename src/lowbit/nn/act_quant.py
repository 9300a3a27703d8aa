"""Run-time fake quantization of a Linear's input (W8A8, FP8 activations).

The settings travel as a JSON-serialisable dict on the QuantizedTensor (``input_quant``), so the
native format persists them with the weight's metadata:
{"format": "int" | "fp8_e4m3" | "fp8_e5m2", "bits": 8, "granularity": "token" | "tensor",
 "dynamic": bool, "symmetric": True, "observer": "minmax", "scale": float | None}
Dynamic: one scale per token (row of x over the last dim) or per tensor, from the current
absmax. Static: the calibrated per-tensor `scale` (absmax / format max).
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError
from lowbit.formats.base import round_half_even
from lowbit.formats.fp8 import decode_fp8, encode_fp8, VARIANTS
from lowbit.scheme import ActivationScheme

_TINY = 1e-12


def format_max(fmt: str, bits: int) -> float:
    """Largest representable magnitude of the (unscaled) activation grid."""
    if fmt == "int":
        return float(2 ** (bits - 1) - 1)
    return VARIANTS[fmt.removeprefix("fp8_")].max


def input_quant_spec(act: ActivationScheme, absmax: float | None = None) -> dict:
    """The serialisable settings for `act`; a static scheme needs the calibrated input absmax."""
    if not act.symmetric:
        raise SchemeError("asymmetric activation quantization is not supported; use symmetric activations")
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


def fake_quantize_input(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """x quantized to the activation grid and back (same dtype and shape)."""
    fmt, bits = spec["format"], spec["bits"]
    qmax = format_max(fmt, bits)
    xf = x.float()
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
