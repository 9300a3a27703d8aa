"""Torch modules holding low-bit weights."""

from lowbit.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
