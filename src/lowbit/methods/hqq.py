"""HQQ: Half-Quadratic Quantization (Badri & Shaji, 2023). Calibration-free.

For an asymmetric affine quantizer with scale s and a float zero z per group,

    W_q = clamp(round(W / s + z), 0, 2^b - 1),    W_r = (W_q - z) * s,

HQQ minimises the sparsity-promoting loss ||W - W_r||_p^p (p < 1, robust to outliers) over z
with s fixed (as the official implementation does), by half-quadratic splitting: an auxiliary
error W_e ~ W - W_r and alternating closed-form updates, starting from min-max parameters:

    (1) W_e = shrink_lp(W - W_r, beta, p)
            = sign(x) * relu(|x| - |x|^(p-1) / beta),   x = W - W_r     (generalised soft threshold)
    (2) z   = mean_group( W_q - (W - W_e) / s )                         (least squares in z)
        beta = beta * kappa

Each (row, group) is an independent problem, so the best iterate is kept per group (the
official code keeps the best iterate globally and stops at the first increase; per group is a
strict refinement). The error tracked is the mean |W - W_r| of the group, as in the official code.

Storage: lowbit's float-zero integer format stores ``w = code * scale + min``; HQQ's zero maps to
``min = -z * scale``. Parameters are rounded through the format's fp16 storage and the codes are
re-encoded with the stored values, so encode and decode see identical parameters. As a last step
each group keeps whichever of {HQQ, min-max start} has the lower error after that rounding, so
HQQ is never worse than RTN on any group under the tracked error.

Only ``zero_point="float"`` is accepted. With the scale fixed, an integer zero can only move the
grid by whole steps; HQQ's optimum lies within half a step of the min-max zero, so rounding it
(the official ``round_zero``) gives back exactly the RTN zero (measured: every group, 2/3/4 bits,
Student-t weights). Rather than silently do RTN, integer zero-points are refused, and so is
symmetric quantization, which has no zero to optimise.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError
from lowbit.formats.integer import IntFormat
from lowbit.scheme import WeightScheme
from lowbit.tensor import QuantizedTensor, expand_params, fit_groups, group_index as make_group_index
from lowbit.tensor import resolve_group_size, to_matrix


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal step of the lp norm (p <= 1)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * torch.pow(x.abs() + 1e-8, p - 1))


def _group_mean(X: torch.Tensor, gidx: torch.Tensor, n_groups: int, param_rows: int) -> torch.Tensor:
    """Mean of X (rows, cols) over each group's columns -> (param_rows, n_groups).

    Summed with index_add over the group index, so a shorter last group is averaged over its
    own columns only. param_rows == 1 (one group for the whole tensor) also averages over rows.
    """
    sums = X.new_zeros(X.shape[0], n_groups).index_add_(1, gidx, X)
    counts = torch.bincount(gidx, minlength=n_groups).to(X.dtype)
    if param_rows == 1 and X.shape[0] > 1:
        sums = sums.sum(0, keepdim=True)
        counts = counts * X.shape[0]
    return sums / counts


def hqq_optimize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_index: torch.Tensor, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01) -> torch.Tensor:
    """HQQ's half-quadratic solver for the float zero-point; the scale is held fixed.

    W: (rows, cols); scale, zero: per group (rows, n_groups) (or (1, n_groups)); group_index:
    (cols,) group of each column. Returns the best zero (per group, by mean |W - W_r|) among
    the start and all iterates, same shape as ``zero``.
    """
    W = W.float()
    gidx = group_index.to(W.device, torch.long)
    n_groups, param_rows = zero.shape[1], zero.shape[0]
    qmax = (1 << bits) - 1
    s = scale.float()[:, gidx]
    z = zero.float().clone()
    best_z = z.clone()
    best_err = torch.full_like(z, float("inf"))
    for i in range(iters + 1):
        zx = z[:, gidx]
        W_q = torch.round(W / s + zx).clamp(0, qmax)
        W_r = (W_q - zx) * s
        err = _group_mean((W - W_r).abs(), gidx, n_groups, param_rows)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better, z, best_z)
        if i == iters:
            break
        W_e = shrink_lp(W - W_r, beta, p)
        z = _group_mean(W_q - (W - W_e) / s, gidx, n_groups, param_rows)
        beta *= kappa
    return best_z


def _group_error(fmt: IntFormat, W: torch.Tensor, p: dict, gidx: torch.Tensor, n_groups: int) -> torch.Tensor:
    pe = expand_params(p, gidx)
    err = (W - fmt.decode(fmt.encode(W, pe), pe)).abs()
    return _group_mean(err, gidx, n_groups, p["scale"].shape[0])


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, transposed: bool = False, iters: int = 20,
                    p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> QuantizedTensor:
    """HQQ of one weight in its own layout (asymmetric integer format with a float zero only)."""
    ws = getattr(scheme, "weights", scheme)
    if ws.format != "int":
        raise SchemeError(f"HQQ works on integer formats, not {ws.format!r}; use --format int --asym")
    if ws.symmetric:
        raise SchemeError("HQQ optimises the zero-point, which symmetric quantization lacks; pass --asym --zero-point float")
    if ws.zero_point != "float":
        raise SchemeError("HQQ needs a float zero-point (an integer one rounds back to RTN's); pass --zero-point float")
    fmt = ws.make_format()
    assert isinstance(fmt, IntFormat)
    W = to_matrix(w.detach(), transposed).float()
    g = resolve_group_size(ws.effective_group_size(), W.shape[1])
    gidx = make_group_index(W.shape[1], g).to(W.device)
    start = fit_groups(fmt, W, g, ws.observer, ws.percentile)  # min-max (observer) start, stored precision
    n_groups = start["scale"].shape[1]
    scale = start["scale"]
    z = hqq_optimize(W, scale, -start["min"] / scale, fmt.bits, gidx, iters=iters, p=p, beta=beta, kappa=kappa)
    cand = fmt.load_params(fmt.store_params({"scale": scale, "min": -z * scale}))
    # per group, keep HQQ unless the storage rounding made it worse than the start
    use = _group_error(fmt, W, cand, gidx, n_groups) <= _group_error(fmt, W, start, gidx, n_groups)
    params = {k: torch.where(use, cand[k], start[k]) for k in start}
    codes = fmt.encode(W, expand_params(params, gidx))
    return QuantizedTensor(codes, fmt.store_params(params), fmt, g, tuple(w.shape), transposed)


@dataclasses.dataclass(frozen=True)
class Options:
    iters: int = 20
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
