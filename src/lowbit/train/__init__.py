"""Training with quantization in the loop: fake quantization (STE, LSQ), QAT with optional
distillation (qat.py)."""

from lowbit.train.fake_quant import InputFakeQuant, WeightFakeQuant, grad_scale, straight_through
from lowbit.train.qat import QATConfig, convert, prepare, run_qat

__all__ = ["InputFakeQuant", "QATConfig", "WeightFakeQuant", "convert", "grad_scale", "prepare", "run_qat",
           "straight_through"]
