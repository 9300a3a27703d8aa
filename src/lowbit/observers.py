"""Observers choose the value range [lo, hi] a format represents, per group (last dim = group).

min-max, percentile, MSE grid search over clipping ratios (needs the format), KL divergence
(TensorRT-style histogram calibration) and amax history for delayed FP8 scaling.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import torch

from lowbit.errors import SchemeError

OBSERVERS = ("minmax", "percentile", "mse", "kl")


def minmax_range(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest value of each group."""
    return blocks.amin(dim=-1), blocks.amax(dim=-1)


def percentile_range(blocks: torch.Tensor, percentile: float = 99.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Range between the (100-p)th and p-th percentile of each group, clipping outliers."""
    q = torch.tensor([1 - percentile / 100, percentile / 100], dtype=blocks.dtype)
    lo_hi = torch.quantile(blocks.float(), q.float(), dim=-1)
    return lo_hi[0].to(blocks.dtype), lo_hi[1].to(blocks.dtype)


def kl_threshold(values: torch.Tensor, n_levels: int = 128, bins: int = 2048) -> float:
    """TensorRT entropy calibration: the |x| clipping threshold minimising KL(P || Q), where P is
    the clipped histogram and Q the same histogram merged into n_levels quantization bins."""
    a = values.detach().abs().reshape(-1).float()
    amax = float(a.max())
    if amax == 0.0:
        return 0.0
    hist = torch.histc(a, bins=bins, min=0.0, max=amax).double()
    edges_width = amax / bins
    best_i, best_kl = bins, float("inf")
    for i in range(n_levels, bins + 1, max(1, (bins - n_levels) // 256)):
        p = hist[:i].clone()
        p[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
        # quantize the first i bins into n_levels bins, spreading each back over its nonzero bins
        ref = hist[:i]
        idx = (torch.arange(i) * n_levels // i).clamp(max=n_levels - 1)
        sums = torch.zeros(n_levels, dtype=torch.float64).index_add_(0, idx, ref)
        nonzero = torch.zeros(n_levels, dtype=torch.float64).index_add_(0, idx, (ref > 0).double())
        q = torch.where(ref > 0, sums[idx] / nonzero[idx].clamp_min(1), torch.zeros_like(ref))
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        pn, qn = p / p_sum, q / q_sum
        mask = pn > 0
        kl = float((pn[mask] * torch.log(pn[mask] / qn[mask].clamp_min(1e-12))).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * edges_width


def kl_range(blocks: torch.Tensor, n_levels: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric range per group from KL calibration (one histogram search per group)."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    t = torch.tensor([kl_threshold(row, n_levels) for row in flat], dtype=blocks.dtype)
    t = t.view(blocks.shape[:-1])
    return -t, t


def mse_search(blocks, fmt, tensor_params, fit_once, lo, hi, grid: int = 20, min_ratio: float = 0.5,
               importance: torch.Tensor | None = None):
    """Shrink [lo, hi] by ratios in [min_ratio, 1] and keep, per group, the one with least
    squared error after quantize-dequantize through the format (weighted per column by
    `importance`, e.g. diag(X^T X), when given)."""
    best_p = fit_once(lo, hi)
    best_err = _sq_err(blocks, fmt, best_p, importance)
    for r in torch.linspace(1.0, min_ratio, grid)[1:]:
        p = fit_once(lo * r, hi * r)
        err = _sq_err(blocks, fmt, p, importance)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        for k, v in p.items():
            if v.ndim:  # tensor-level parameters are shared and stay as they are
                best_p[k] = torch.where(better, v, best_p[k])
    return best_p


def _sq_err(blocks, fmt, p, importance=None):
    pe = {k: (v.unsqueeze(-1) if v.ndim else v) for k, v in p.items()}
    e = (fmt.quantize_dequantize(blocks, pe) - blocks).pow(2)
    return (e if importance is None else e * importance).sum(dim=-1)


def observe(blocks: torch.Tensor, observer: str, percentile: float = 99.9, n_levels: int = 128):
    """Range of each group by the named observer (mse is handled by the caller: it needs a format)."""
    if observer in ("minmax", "mse"):
        return minmax_range(blocks)
    if observer == "percentile":
        return percentile_range(blocks, percentile)
    if observer == "kl":
        return kl_range(blocks, n_levels)
    raise SchemeError(f"unknown observer {observer!r}; choose one of: {', '.join(OBSERVERS)}")


@dataclasses.dataclass
class AmaxHistory:
    """Delayed scaling (Transformer Engine style): the scale for step t comes from the max of the
    amax values seen over the last `length` steps, so it is known before the tensor is."""

    length: int = 16
    fmt_max: float = 448.0
    margin: int = 0
    history: deque = dataclasses.field(default_factory=deque)

    def scale(self) -> float:
        """Scale to use now; 1.0 before anything was observed."""
        if not self.history:
            return 1.0
        amax = max(self.history)
        return amax / self.fmt_max * 2.0**self.margin if amax > 0 else 1.0

    def update(self, x: torch.Tensor) -> None:
        """Record the amax of the tensor just processed."""
        self.history.append(float(x.detach().abs().max()))
        while len(self.history) > self.length:
            self.history.popleft()
