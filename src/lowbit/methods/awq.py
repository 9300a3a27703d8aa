"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling their input
channels up before rounding (and the previous op's output down), with the scale s = mean|x|^α
chosen per smoothing group by a grid search on the group's output error; then shrink each
group's weight range where that lowers the output error (AutoAWQ's auto_clip).

Works with every format: the search quantizes through ``lowbit.tensor.quantize_tensor``.

Per decoder layer:
1. for each smoothing group (``lowbit.model.arch``), in table order: s_α = x_mean^α normalised
   by sqrt(max s * min s) for α in {0, 1/grid, ..., (grid-1)/grid}; keep the α minimising
   sum over the group's Linears of ||X W^T - X (Q(W diag s) diag(1/s))^T||^2 on the sampled
   input rows X (α = 0 is plain rounding, so the search never picks worse than RTN on X);
   fold s into the model and replace the group's statistics by those of X / s.
2. clip (rounding "rtn" only): per weight not feeding a softmax (q/k, see arch.NO_CLIP_PATTERNS),
   per (output row, group) the max range ratio r in {1, 0.95, ..., 0.55} minimising
   (W - Ŵ_r)_g H_g (W - Ŵ_r)_g^T with H_g the diagonal block of the (scaled) Hessian of all
   calibration tokens — exactly AutoAWQ's ||X_g (W_g - Ŵ_g)^T||^2 per output channel and group,
   from X^T X instead of a token sample; W is clamped to ±r·absmax of the group (as AutoAWQ,
   also for asymmetric formats) and rounded.
3. round: RTN of the (clipped) scaled weights, or GPTQ with the scaled Hessian.
Linears in no foldable group (o_proj under grouped-query attention) are rounded plainly, not
recorded as a fallback; stacked experts (no observed input) fall back to RTN and are listed.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from lowbit.calib.runner import StatsRequest
from lowbit.errors import SchemeError
from lowbit.methods import rtn
from lowbit.methods.smoothing import ROUNDINGS, fold_group, gptq_round, matrix, resolve_groups, rtn_for_unobserved
from lowbit.model.arch import NO_CLIP_PATTERNS
from lowbit.scheme import WeightScheme, scheme_of
from lowbit.tensor import QuantizedTensor, from_matrix, quantize_tensor, resolve_group_size

MAX_SHRINK = 0.5   # AutoAWQ: clip ratios 1 - i/grid for i < grid * MAX_SHRINK
CLIP_GRID = 20


@dataclasses.dataclass(frozen=True)
class Options:
    grid: int = 20          # scale exponents tried: α = i / grid, i < grid
    clip: bool = True       # search per-group clipping after scaling (RTN rounding only)
    rounding: str = "rtn"   # "gptq": GPTQ rounding of the scaled weights (Hessian scaled exactly)
    refit: int = 0          # with rounding=gptq: GPTQ's scale refitting rounds (gptq --opt refit)

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise SchemeError(f"awq rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.refit and self.rounding != "gptq":
            raise SchemeError("awq --opt refit refits the scales of GPTQ's codes: add --opt rounding=gptq, or drop refit")
        if self.grid < 1:
            raise SchemeError(f"awq grid must be at least 1, got {self.grid}")


# the Hessian serves GPTQ rounding and the clip search; the sample rows the scale search
STATS = StatsRequest(hessian=True, sample_rows=512)


def _qdq(W: torch.Tensor, ws: WeightScheme) -> torch.Tensor:
    """W (out, in) rounded with the scheme and decoded."""
    return quantize_tensor(W, ws).dequantize_matrix()


def candidate_scale(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AutoAWQ's s = x_mean^α, normalised so that max(s) * min(s) = 1."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(X: torch.Tensor, mats: list[torch.Tensor], schemes: list[WeightScheme], x_mean: torch.Tensor,
                 grid: int) -> tuple[torch.Tensor, float, list[float]]:
    """(best s, its α, the error per α) for Linears W (out, in) sharing the input rows X (n, in)."""
    X = X.float()
    ref = [X @ W.T for W in mats]
    errors, best = [], (float("inf"), None, 0.0)
    for i in range(grid):
        alpha = i / grid
        s = candidate_scale(x_mean, alpha)
        err = 0.0
        for W, ws, Y in zip(mats, schemes, ref):
            W_hat = _qdq(W * s, ws) / s
            err += float(((X @ W_hat.T - Y) ** 2).sum())
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], errors


def _block_error(D: torch.Tensor, H: torch.Tensor, g: int) -> torch.Tensor:
    """(rows, n_groups): D_g H_g D_g^T per row and column group (H_g: diagonal blocks of H)."""
    rows, cols = D.shape
    n_full, tail = divmod(cols, g)
    parts = []
    if n_full:
        N = n_full * g
        Dg = D[:, :N].reshape(rows, n_full, g)
        idx = torch.arange(n_full)
        Hb = H[:N, :N].reshape(n_full, g, n_full, g)[idx, :, idx, :]       # (n_full, g, g)
        parts.append((torch.einsum("rni,nij->rnj", Dg, Hb) * Dg).sum(-1))
    if tail:
        Dt = D[:, n_full * g:]
        parts.append(((Dt @ H[n_full * g:, n_full * g:]) * Dt).sum(-1, keepdim=True))
    return torch.cat(parts, dim=1)


def _expand(v: torch.Tensor, cols: int, g: int) -> torch.Tensor:
    """Per-(row, group) values (rows, n_groups) -> per column (rows, cols)."""
    return v.repeat_interleave(g, dim=1)[:, :cols]


@torch.no_grad()
def clip_search(W: torch.Tensor, H: torch.Tensor, ws: WeightScheme, grid: int = CLIP_GRID) -> torch.Tensor:
    """W (out, in) clamped per (row, group) to the range ratio that minimises the output error."""
    rows, cols = W.shape
    g = resolve_group_size(ws.effective_group_size(), cols)
    if g == 0:
        return W  # one range for the whole tensor: no per-group clipping
    amax = torch.cat([W[:, i: i + g].abs().amax(dim=1, keepdim=True) for i in range(0, cols, g)], dim=1)
    H = H.float()
    best_err = torch.full(amax.shape, float("inf"))
    best_max = amax.clone()
    for i in range(int(grid * MAX_SHRINK)):
        mx = amax * (1 - i / grid)
        lim = _expand(mx, cols, g)
        Wc = torch.maximum(torch.minimum(W, lim), -lim)
        err = _block_error(W - _qdq(Wc, ws), H, g)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, mx, best_max)
    lim = _expand(best_max, cols, g)
    return torch.maximum(torch.minimum(W, lim), -lim)


def _clippable(name: str) -> bool:
    return not any(re.search(p, name) for p in NO_CLIP_PATTERNS)


@torch.no_grad()
def quantize_layer(model: torch.nn.Module, layer_targets, stats, scheme,
                   options: Options) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """AWQ for the targets of one decoder layer (`scheme`: a WeightScheme or one per name).
    Folds the chosen scales into the model (the previous norms / Linears) in place."""
    options = options or Options()
    stats = dict(stats)  # folding replaces entries by scaled copies; the caller's dict stays as is
    out, fallback = rtn_for_unobserved(model, layer_targets, stats, scheme)
    for group in resolve_groups(model, layer_targets, stats):
        st = stats[group.members[0].name]
        if st.sample is None:
            continue
        mats = [matrix(model, t) for t in group.members]
        s, _alpha, _errs = search_scale(st.sample, mats, [scheme_of(scheme, t.name) for t in group.members],
                                        st.absmean, options.grid)
        fold_group(model, group, s, stats)
    rest = [t for t in layer_targets if t.name not in out]
    if options.rounding == "gptq":
        out.update(gptq_round(model, rest, stats, scheme, refit=options.refit))
        return out, fallback
    for t in rest:
        ws = scheme_of(scheme, t.name)
        W = matrix(model, t)
        st = stats[t.name]
        if options.clip and _clippable(t.module_name):
            H = st.hessian if st.hessian is not None else st.sample.T @ st.sample
            W = clip_search(W, H, ws)
        shape = tuple(t.parameter(model).shape)
        out[t.name] = rtn.quantize_weight(from_matrix(W, shape, t.transposed), ws, t.transposed)
    return out, fallback
