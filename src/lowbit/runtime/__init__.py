"""Run-time forms of a quantized model: packed weight modules and a quantized KV cache."""
