"""Wanda (Sun et al. 2023): drop the weights with the least |W_ij| · ‖X_j‖₂ (weight magnitude
times its input column's norm over the calibration tokens) per row, within each N:M group or
over the row, with no weight update; then round the survivors to the scheme's format (RTN),
the dropped weights to its exact-zero code. The cheap baseline SparseGPT is measured against."""

from __future__ import annotations

import dataclasses

import torch

from lowbit.calib.runner import StatsRequest
from lowbit.errors import SchemeError
from lowbit.sparsity import check_shape, follows, parse_pattern, prune_mask


@dataclasses.dataclass(frozen=True)
class Options:
    sparsity: str = "2:4"

    def __post_init__(self):
        parse_pattern(self.sparsity)


# ‖X_j‖² is the diagonal of XᵀX; staged: inputs come from the already pruned layers before
STATS = StatsRequest(hessian=True, staged=True, channel_stats=False)


def quantize_layer(model, layer_targets, stats, scheme, options: Options):
    from lowbit.methods import rtn, weight_and_hessian
    from lowbit.scheme import scheme_of
    from lowbit.tensor import from_matrix

    pattern = parse_pattern(options.sparsity)
    out = {}
    for t in layer_targets:
        w, W, H = weight_and_hessian(model, t, stats, "Wanda", "input norms")
        check_shape(pattern, W.shape[1], t.name)
        norms = torch.diag(H).float().clamp_min(0).sqrt()
        pruned = W.masked_fill(prune_mask(W.abs() * norms[None, :], pattern), 0.0)
        qt = rtn.quantize_weight(from_matrix(pruned, tuple(w.shape), t.transposed), scheme_of(scheme, t.name), t.transposed)
        if not follows(qt.dequantize_matrix(), pattern):
            raise SchemeError(f"{qt.format.name} does not store the pruned weights of {t.name} as exact zeros (a "
                              "float minimum shifts every code): use a symmetric or integer-zero-point format")
        out[t.name] = qt
    return out, []
