"""Round to nearest: fit each group's parameters with the scheme's observer, then round."""

from __future__ import annotations

import torch

from lowbit.scheme import WeightScheme
from lowbit.tensor import QuantizedTensor, quantize_tensor


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, transposed: bool = False,
                    importance: torch.Tensor | None = None) -> QuantizedTensor:
    """RTN of one weight in its own layout; `importance` (n_in,), e.g. an imatrix's mean squared
    input per column, weights each column's error where the format or observer searches."""
    return quantize_tensor(w, scheme, transposed, importance)
