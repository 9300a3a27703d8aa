"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights with a
per-input-channel scale s_j = max|X_j|^α / max|W_j|^(1-α) folded into the previous op, so that
both weights and activations quantize well (W8A8); then round the weights and mark every
quantized Linear of the layer to fake-quantize its input at run time.

The activation settings travel on each QuantizedTensor (``input_quant``): dynamic per-token
scales, or a static per-tensor scale from the calibrated absmax of the smoothed input
(absmax / s). Groups come from ``lowbit.model.arch`` (norm -> q/k/v, norm -> gate/up,
up -> down, v -> o where shapes allow); statistics are rescaled after folding as in AWQ.
Linears in no group are not smoothed but still get activation quantization; stacked experts
(no observed input) fall back to weight-only RTN and are listed.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.calib.runner import StatsRequest
from lowbit.errors import SchemeError
from lowbit.methods import rtn
from lowbit.methods.smoothing import ROUNDINGS, fold_group, gptq_round, matrix, resolve_groups, rtn_for_unobserved
from lowbit.nn.act_quant import input_quant_spec
from lowbit.scheme import ActivationScheme, scheme_of
from lowbit.tensor import QuantizedTensor

_CLAMP = 1e-5


@dataclasses.dataclass(frozen=True)
class Options:
    alpha: float = 0.5            # migration strength: 0 keeps activations, 1 moves all to weights
    rounding: str = "rtn"         # weight rounding after smoothing: "rtn" or "gptq"
    act_bits: int = 8
    act_format: str = "int"       # "int" (symmetric) or "fp8_e4m3" / "fp8_e5m2"
    act_static: bool = False      # static per-tensor scale from calibration, else dynamic per token

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise SchemeError(f"smoothquant rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise SchemeError(f"smoothquant alpha must lie in [0, 1], got {self.alpha}")
        if self.act_format == "int" and not 2 <= self.act_bits <= 16:
            raise SchemeError(f"act_bits must lie in 2..16, got {self.act_bits}")
        self.activation_scheme()  # validates the format

    def activation_scheme(self) -> ActivationScheme:
        bits = self.act_bits if self.act_format == "int" else 8
        return ActivationScheme(self.act_format, bits, "tensor" if self.act_static else "token", not self.act_static)


STATS = StatsRequest(hessian=True)  # the Hessian is only read for GPTQ rounding


def smoothing_scale(x_absmax: torch.Tensor, mats: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) = max|X_j|^α / max|W_j|^(1-α), W over all the group's Linears; 1 on dead channels."""
    w_absmax = torch.stack([W.abs().amax(dim=0) for W in mats]).amax(dim=0).clamp(min=_CLAMP)
    x = x_absmax.float()
    s = (x.clamp(min=_CLAMP).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=_CLAMP)
    return torch.where(x > 0, s, torch.ones_like(s))


@torch.no_grad()
def quantize_layer(model: torch.nn.Module, layer_targets, stats, scheme,
                   options: Options) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """SmoothQuant for the targets of one decoder layer; folds scales into the model in place."""
    options = options or Options()
    stats = dict(stats)
    out, fallback = rtn_for_unobserved(model, layer_targets, stats, scheme)
    for group in resolve_groups(model, layer_targets, stats):
        st = stats[group.members[0].name]
        s = smoothing_scale(st.absmax, [matrix(model, t) for t in group.members], options.alpha)
        fold_group(model, group, s, stats)
    rest = [t for t in layer_targets if t.name not in out]
    if options.rounding == "gptq":
        weights = gptq_round(model, rest, stats, scheme)
    else:
        weights = {t.name: rtn.quantize_weight(t.parameter(model).data, scheme_of(scheme, t.name), t.transposed)
                   for t in rest}
    act = options.activation_scheme()
    for t in rest:
        absmax = None if act.dynamic else float(stats[t.name].absmax.max())
        out[t.name] = dataclasses.replace(weights[t.name], input_quant=input_quant_spec(act, absmax))
    return out, fallback
