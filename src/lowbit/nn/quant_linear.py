"""QuantLinear: an nn.Linear replacement whose weight lives as a QuantizedTensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.tensor import QuantizedTensor


class QuantLinear(torch.nn.Module):
    """Holds codes + parameters; decodes the weight on first use and keeps it for speed."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None, cache: bool = True):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.cache = cache
        self._decoded: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self._decoded is not None:
            return self._decoded
        w = self.qweight.dequantize()
        if self.cache:
            self._decoded = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qweight.format.name}, {self.qweight.bits_per_weight:.3f} bpw"
