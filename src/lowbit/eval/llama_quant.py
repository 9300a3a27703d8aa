"""llama.cpp's own quantizer, as an independent reference for lowbit's GGUF encoders: the same
weights and importance through ``ggml_quantize_chunk`` of the ggml library that llama-cpp-python
ships, decoded by gguf-py."""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import LowbitError


@lru_cache(maxsize=1)
def _ggml():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise LowbitError("llama.cpp's quantizer needs llama-cpp-python: pip install llama-cpp-python")
    lib = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def llama_cpp_quantize(W: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes (rows, row_bytes) of W (rows, cols) in GGML type `type_name` ("IQ2_XS"),
    each column's error weighted by `importance` (cols,) as llama-quantize --imatrix does."""
    t = GGMLQuantizationType[type_name]
    rows, cols = W.shape
    block, type_size = GGML_QUANT_SIZES[t]
    if cols % block:
        raise LowbitError(f"{type_name} needs rows whose length is a multiple of {block}, got {cols}")
    lib = _ggml()
    lib.ggml_quantize_init(int(t))
    x = np.ascontiguousarray(W, dtype=np.float32)
    out = np.zeros((rows, cols // block * type_size), dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if imp is not None and imp.shape != (cols,):
        raise LowbitError(f"importance has shape {imp.shape}, the weight has {cols} columns")
    lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, rows, cols, None if imp is None else imp.ctypes.data)
    return out
