"""Round to nearest: fit each group's parameters with the scheme's observer, then round."""

from __future__ import annotations

import torch

from lowbit.errors import SchemeError
from lowbit.scheme import WeightScheme
from lowbit.tensor import QuantizedTensor, quantize_tensor


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, transposed: bool = False,
                    importance: torch.Tensor | None = None) -> QuantizedTensor:
    """RTN of one weight in its own layout; `importance` (n_in,), e.g. an imatrix's mean squared
    input per column, weights each column's error where the format or observer searches; for
    stacked experts (E, ...) it may be (E, n_in): each expert is fitted with its own row."""
    if importance is not None and importance.ndim == 2:
        return stack_experts([quantize_tensor(w[e], scheme, transposed, importance[e]) for e in range(w.shape[0])],
                             tuple(w.shape))
    return quantize_tensor(w, scheme, transposed, importance)


def stack_experts(parts: list[QuantizedTensor], shape: tuple[int, ...]) -> QuantizedTensor:
    """One QuantizedTensor of stacked experts from one per expert (rows in to_matrix's order);
    per-tensor parameters (a global scale, codebooks) must agree, or the experts cannot share one."""
    import dataclasses

    rows = [p.codes.shape[0] for p in parts]
    params = {}
    for k, v in parts[0].params.items():
        if v.ndim == 2 and v.shape[0] == rows[0]:
            params[k] = torch.cat([p.params[k] for p in parts])
        elif all(torch.equal(p.params[k], v) for p in parts):
            params[k] = v
        else:
            raise SchemeError(f"{parts[0].format.name} has a per-tensor {k!r} that differs between experts; fitting "
                              "each expert with its own importance needs a format without one (drop --imatrix or "
                              "choose another format)")
    return dataclasses.replace(parts[0], codes=torch.cat([p.codes for p in parts]), params=params, shape=shape)
