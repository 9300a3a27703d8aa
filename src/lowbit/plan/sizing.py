"""Stored bytes of one weight in a scheme, per output container, without quantizing it.

lowbit's own layout (native, and the bits per weight every report prints): packed codes plus
the format's stored parameters, measured once per (scheme, row length) on a two-row proxy, so
every format's parameter layout (fp16 scales, E8M0 / E4M3 block scales, double-quantized NF4,
k-quant super-blocks) is counted by the format itself. GGUF: gguf-py's block-size table.
compressed-tensors: its int32 word packing and scale dtypes (see export.compressed_tensors);
the writers' files are checked against a --max-size after writing, so an estimate that is
off cannot leave an over-budget output behind.
"""

from __future__ import annotations

import functools

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.scheme import WeightScheme

CONTAINERS = ("native", "compressed-tensors", "gptq", "awq", "gguf")


@functools.lru_cache(maxsize=4096)
def _param_bytes(ws: WeightScheme, cols: int) -> tuple[int, int]:
    """(bytes per row, bytes per tensor) of the stored parameters of scheme `ws` on rows of `cols`."""
    from lowbit.tensor import quantize_tensor

    gen = torch.Generator().manual_seed(0)
    sizes = []
    for rows in (1, 2):
        qt = quantize_tensor(torch.randn(rows, cols, generator=gen), ws)
        sizes.append(sum(v.numel() * v.element_size() for v in qt.params.values()))
    per_row = sizes[1] - sizes[0]
    return per_row, sizes[0] - per_row


def lowbit_nbytes(ws: WeightScheme, rows: int, cols: int) -> int:
    """Bytes lowbit stores for a (rows, cols) weight: packed codes + parameters."""
    per_row, per_tensor = _param_bytes(ws, cols)
    return ws.make_format().packed_nbytes(rows * cols) + rows * per_row + per_tensor


def gguf_type_of(ws: WeightScheme) -> str | None:
    """The GGML type name of a gguf_* scheme ("gguf_q4_k" -> "Q4_K"); None for other formats."""
    return ws.format.removeprefix("gguf_").upper() if ws.format.startswith("gguf_") else None


def gguf_nbytes(type_name: str, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) weight in a GGML type (cols a multiple of its block)."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return rows * (cols // block) * nbytes


def compressed_tensors_nbytes(ws: WeightScheme, rows: int, cols: int, scale_bytes: int,
                              quantized_inputs: bool = False) -> int:
    """Bytes of a weight as export.compressed_tensors writes it (scale_bytes: 2 for fp16 models,
    else 4). Integer weights of a Linear whose inputs are quantized are stored one int8 per
    weight (compressed-tensors' int-quantized, what vLLM's W8A8/W4A8 kernels read)."""
    g = ws.effective_group_size()
    groups = 1 if g in (-1, 0) else -(-cols // g)
    if ws.format == "int" and quantized_inputs:
        return rows * cols + rows * groups * scale_bytes
    if ws.format == "int":
        words = -(-cols * ws.bits // 32) * 4
        zero = 0 if ws.symmetric else -(-rows * ws.bits // 32) * 4 * groups
        return rows * words + rows * groups * scale_bytes + zero + 16   # + weight_shape (2 x int64)
    if ws.format == "fp8_e4m3":
        return rows * cols + (4 if g == 0 else rows * groups * 4)
    if ws.format == "nvfp4":
        return rows * cols // 2 + rows * cols // 16 + 4
    return lowbit_nbytes(ws, rows, cols)


def tensor_nbytes(container: str, ws: WeightScheme, rows: int, cols: int, scale_bytes: int = 4,
                  quantized_inputs: bool = False) -> int:
    """Stored bytes of one weight in `container`."""
    if container == "gguf" and gguf_type_of(ws) is not None:
        return gguf_nbytes(gguf_type_of(ws), rows, cols)
    if container == "compressed-tensors":
        return compressed_tensors_nbytes(ws, rows, cols, scale_bytes, quantized_inputs)
    return lowbit_nbytes(ws, rows, cols)


def container_fits(container: str, ws: WeightScheme, cols: int) -> bool:
    """Whether `container` can hold rows of `cols` in scheme `ws` (block and group divisibility)."""
    t = gguf_type_of(ws)
    if t is not None:
        return cols % GGML_QUANT_SIZES[GGMLQuantizationType[t]][0] == 0
    if container == "gguf":
        return False
    g = ws.effective_group_size()
    if g > cols:
        return False
    if container == "compressed-tensors":
        if ws.format not in ("int", "fp8_e4m3", "nvfp4") or (ws.format == "int" and not ws.symmetric and ws.zero_point != "int"):
            return False
        if ws.format == "int" and g == 0:
            return False   # the exporter writes group or channel INT strategies only
        return g in (-1, 0) or cols % g == 0
    return True
