"""lowbit: quantize LLMs to low bit-widths and measure what it cost."""

from lowbit.errors import LowbitError
from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme, preset
from lowbit.tensor import QuantizedTensor, quantize_tensor

__all__ = ["LowbitError", "ActivationScheme", "QuantScheme", "WeightScheme", "preset",
           "QuantizedTensor", "quantize_tensor"]
