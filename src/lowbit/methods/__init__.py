"""Quantization methods. Each decides which values to store; formats decide how."""

METHODS = ("rtn", "gptq")
CALIBRATED = ("gptq",)
