"""Round to nearest: fit each group's parameters with the scheme's observer, then round."""

from __future__ import annotations

import torch

from lowbit.scheme import WeightScheme
from lowbit.tensor import QuantizedTensor, quantize_tensor


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, transposed: bool = False) -> QuantizedTensor:
    """RTN of one weight in its own layout."""
    return quantize_tensor(w, scheme, transposed)
