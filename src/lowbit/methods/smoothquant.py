"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights with a
per-input-channel scale s_j = max|X_j|^α / max|W_j|^(1-α) folded into the previous op, so that
both weights and activations quantize well (W8A8); then round the weights. α can be searched per
smoothing group (``alpha_grid``): the value whose group output, with rounded weights and
quantized inputs, is closest to full precision on sampled calibration rows.

Which activation quantization the smoothed inputs get is the plan's (the scheme's activation
spec; W8A8's int8 per-token dynamic when the scheme has none), attached after every layer is
quantized, static scales calibrated on the smoothed, quantized model. Groups come from
``lowbit.model.arch`` (norm -> q/k/v, norm -> gate/up, up -> down, v -> o where shapes allow);
statistics are rescaled after folding as in AWQ.
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
from lowbit.scheme import scheme_of
from lowbit.tensor import QuantizedTensor

_CLAMP = 1e-5


@dataclasses.dataclass(frozen=True)
class Options:
    alpha: float = 0.5            # migration strength: 0 keeps activations, 1 moves all to weights
    rounding: str = "rtn"         # weight rounding after smoothing: "rtn" or "gptq"
    # > 0: per smoothing group, search α in {0, 1/grid, ..., 1} for the least output error of
    # the group with rounded weights *and* quantized inputs on sampled calibration rows; 0: the
    # fixed `alpha` everywhere. Off by default: on SmolLM2 W8A8 the local output error did not
    # track the model's KL divergence (measure with bench/methods.py's alpha_grid row)
    alpha_grid: int = 0

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise SchemeError(f"smoothquant rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise SchemeError(f"smoothquant alpha must lie in [0, 1], got {self.alpha}")
        if self.alpha_grid < 0:
            raise SchemeError(f"smoothquant alpha_grid must be 0 (fixed alpha) or positive, got {self.alpha_grid}")


# the Hessian is only read for GPTQ rounding; sampled rows serve the α search
STATS = StatsRequest(hessian=True, sample_rows=512)
# quantize_layer takes the plan's activation spec per target (the α search measures with it)
USES_ACTIVATIONS = True


def smoothing_scale(x_absmax: torch.Tensor, mats: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) = max|X_j|^α / max|W_j|^(1-α), W over all the group's Linears; 1 on dead channels."""
    w_absmax = torch.stack([W.abs().amax(dim=0) for W in mats]).amax(dim=0).clamp(min=_CLAMP)
    x = x_absmax.float()
    s = (x.clamp(min=_CLAMP).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=_CLAMP)
    return torch.where(x > 0, s, torch.ones_like(s))


@torch.no_grad()
def search_alpha(X: torch.Tensor, x_absmax: torch.Tensor, mats: list[torch.Tensor], schemes: list,
                 act, grid: int) -> tuple[float, list[float]]:
    """(best α, error per α): Σ over the group's Linears of ||X W^T - Q_a(X/s) Q_w(W diag s)^T||²
    on sampled input rows X, Q_a the activation fake quantization (static scales from the
    absmax of X/s), Q_w round-to-nearest."""
    from lowbit.nn.act_quant import fake_quantize_input, input_quant_spec
    from lowbit.tensor import quantize_tensor

    X = X.float()
    ref = [X @ W.T for W in mats]
    errors = []
    for i in range(grid + 1):
        alpha = i / grid
        s = smoothing_scale(x_absmax, mats, alpha)
        Xs = X / s
        if act is None:
            Xq = Xs
        else:
            Xq = fake_quantize_input(Xs, input_quant_spec(act, None if act.dynamic else float((x_absmax / s).max())))
        err = 0.0
        for W, ws, Y in zip(mats, schemes, ref):
            W_hat = quantize_tensor(W * s, ws).dequantize_matrix()
            err += float(((Xq @ W_hat.T - Y) ** 2).sum())
        errors.append(err)
    best = min(range(len(errors)), key=lambda i: (errors[i], i))
    return best / grid, errors


@torch.no_grad()
def quantize_layer(model: torch.nn.Module, layer_targets, stats, scheme,
                   options: Options, activations: dict | None = None) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """SmoothQuant for the targets of one decoder layer; folds scales into the model in place.
    activations: the plan's activation scheme per target name (None: not quantized)."""
    options = options or Options()
    activations = activations or {}
    stats = dict(stats)
    out, fallback = rtn_for_unobserved(model, layer_targets, stats, scheme)
    for group in resolve_groups(model, layer_targets, stats):
        st = stats[group.members[0].name]
        mats = [matrix(model, t) for t in group.members]
        alpha = options.alpha
        if options.alpha_grid and st.sample is not None:
            alpha, _ = search_alpha(st.sample, st.absmax, mats, [scheme_of(scheme, t.name) for t in group.members],
                                    activations.get(group.members[0].name), options.alpha_grid)
        s = smoothing_scale(st.absmax, mats, alpha)
        fold_group(model, group, s, stats)
    rest = [t for t in layer_targets if t.name not in out]
    if options.rounding == "gptq":
        weights = gptq_round(model, rest, stats, scheme)
    else:
        weights = {t.name: rtn.quantize_weight(t.parameter(model).data, scheme_of(scheme, t.name), t.transposed)
                   for t in rest}
    out.update(weights)
    return out, fallback
