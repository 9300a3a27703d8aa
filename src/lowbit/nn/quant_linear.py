"""QuantLinear: an nn.Linear replacement whose weight lives as a QuantizedTensor; when the
tensor carries ``input_quant`` settings (W8A8), the input is fake-quantized at run time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.nn.act_quant import fake_quantize_input, validate_spec
from lowbit.tensor import QuantizedTensor


class QuantLinear(torch.nn.Module):
    """Holds codes + parameters; decodes the weight on first use and keeps it for speed."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None, cache: bool = True):
        super().__init__()
        self.qweight = qweight
        # the (out, in) matrix view: a GPT-2 Conv1D stores (in, out) and is marked transposed
        self.out_features, self.in_features = qweight.codes.shape
        self.input_quant = dict(qweight.input_quant) if qweight.input_quant is not None else None
        if self.input_quant is not None:
            validate_spec(self.input_quant)
        self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.cache = cache
        self._decoded: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self._decoded is not None:
            return self._decoded
        w = self.qweight.dequantize_matrix()
        if self.cache:
            self._decoded = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = fake_quantize_input(x, self.input_quant)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        act = ""
        if self.input_quant is not None:
            q = self.input_quant
            act = f", input {q['format']}{q['bits'] if q['format'] == 'int' else ''} {'dynamic' if q['dynamic'] else 'static'}"
            if q.get("outlier_threshold") is not None:
                act += f", outlier columns >= {q['outlier_threshold']:g} in float"
        return f"in={self.in_features}, out={self.out_features}, {self.qweight.format.name}, {self.qweight.bits_per_weight:.3f} bpw{act}"
