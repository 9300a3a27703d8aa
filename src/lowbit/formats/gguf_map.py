"""Which lowbit tensors are GGUF blocks already, and the nearest GGUF blocks for the others.

A symmetric b-bit integer group decodes as (code - 2^(b-1)) * scale with an fp16 scale; Q4_0,
Q5_0 and Q8_0 decode a 32-weight block as (q - offset) * d with an fp16 d. So a symmetric INT4
tensor whose groups are multiples of 32 *is* a run of Q4_0 blocks: the same codes, each group's
scale repeated over its blocks, the same float32 products. Likewise INT5 -> Q5_0, INT8 -> Q8_0,
a float-minimum INT4/INT5 (q * scale + min, both fp16) -> Q4_1/Q5_1, ternary -> TQ2_0, and
MXFP4 (E2M1 codes, an E8M0 byte per 32) -> llama.cpp's MXFP4.
Narrower integers widen exactly into those blocks (INT2/3 -> Q4_0 or Q4_1 with the codes shifted
to the wider offset, INT6/7 -> Q8_0): lossless, at the wider type's size.
An integer zero-point, (q - z) * s, is Q4_1/Q5_1 with min = -z * s up to that min's fp16
rounding: the codes are kept and the added error is measured. Everything else is re-fitted from
its decoded values into a GGUF type."""

from __future__ import annotations

import torch
from gguf.constants import QK_K

from lowbit.tensor import QuantizedTensor

# bits -> the narrowest GGUF block type holding them: (type, its code offset) / type
_SYM = {2: ("gguf_q4_0", 8), 3: ("gguf_q4_0", 8), 4: ("gguf_q4_0", 8), 5: ("gguf_q5_0", 16),
        6: ("gguf_q8_0", 128), 7: ("gguf_q8_0", 128), 8: ("gguf_q8_0", 128)}
_FMIN = {2: "gguf_q4_1", 3: "gguf_q4_1", 4: "gguf_q4_1", 5: "gguf_q5_1"}


def _per_block(p: torch.Tensor, qt: QuantizedTensor, block: int) -> torch.Tensor | None:
    """A per-group parameter (rows, n_groups) repeated for every block of `block` weights, or
    None when the groups do not split into whole blocks."""
    rows, cols = qt.codes.shape
    group = cols if qt.group_size in (0, -1) or qt.group_size >= cols else qt.group_size
    if cols % block or group % block:
        return None
    if qt.group_size == 0:   # one scale per tensor
        return p.reshape(1, 1).expand(rows, cols // block).contiguous()
    sizes = torch.full((p.shape[1],), group // block)
    sizes[-1] = (cols - group * (p.shape[1] - 1)) // block   # the last, shorter group
    if (cols - group * (p.shape[1] - 1)) % block:
        return None
    return p.repeat_interleave(sizes, dim=1).contiguous()


def _blocks(qt: QuantizedTensor, name: str, params: dict[str, torch.Tensor], shift: int = 0) -> QuantizedTensor | None:
    """qt's codes (+ shift) with params repeated per block, as GGUF type `name`."""
    from lowbit.formats import make_format

    fmt = make_format(name)
    block = QK_K if name in ("gguf_tq2_0", "gguf_tq1_0") else 32
    out = {}
    for k, v in params.items():
        rep = _per_block(v, qt, block)
        if rep is None:
            return None
        out[k] = rep
    codes = qt.codes if shift == 0 else (qt.codes.to(torch.int16) + shift).to(torch.uint8)
    return QuantizedTensor(codes, out, fmt, fmt.fixed_group_size, qt.shape, qt.transposed)


def _fp16_exactly(t: torch.Tensor) -> torch.Tensor | None:
    """t as fp16 when that loses nothing (bf16 or fp32 scales of imported checkpoints), else None."""
    h = t.to(torch.float16)
    return h if torch.equal(h.float(), t.float()) else None


def exact_blocks(qt: QuantizedTensor, ternary: str = "gguf_tq2_0") -> QuantizedTensor | None:
    """The same values, bit for bit, as GGUF blocks; qt itself if it is GGUF already; else None.
    `ternary`: the block type ternary weights become (gguf_tq2_0, or the smaller gguf_tq1_0)."""
    from lowbit.formats.gguf_blocks import GGUF_TYPES

    f, p = qt.format, qt.params
    if f.name in GGUF_TYPES:
        return qt
    if qt.input_quant is not None:
        return None   # llama.cpp has no activation spec to carry
    if f.name == "mxfp4":   # the same E2M1 codes and E8M0 exponent byte per 32
        return _blocks(qt, "gguf_mxfp4", {"e": p["scale"]})
    scale = _fp16_exactly(p["scale"]) if "scale" in p else None
    if scale is None:
        return None
    if f.name == "ternary":
        return _blocks(qt, ternary, {"scale": scale})
    if f.name != "int":
        return None
    if f.symmetric:
        name, offset = _SYM[f.bits]
        return _blocks(qt, name, {"scale": scale}, shift=offset - f.signed_offset)
    mn = _fp16_exactly(p["min"]) if f.zero_point == "float" else None
    if mn is not None and f.bits in _FMIN:
        return _blocks(qt, _FMIN[f.bits], {"scale": scale, "min": mn})
    return None


def nearest_blocks(qt: QuantizedTensor) -> QuantizedTensor | None:
    """An integer zero-point INT4/INT5 tensor as Q4_1/Q5_1 blocks with the same codes:
    min = -zero * scale rounded to fp16 (the one rounding added); else None."""
    f, p = qt.format, qt.params
    if f.name != "int" or f.symmetric or f.zero_point != "int" or f.bits not in _FMIN or qt.input_quant is not None:
        return None
    scale = _fp16_exactly(p["scale"])
    if scale is None:
        return None
    mn = (-(p["zero"].float()) * scale.float()).to(torch.float16)
    return _blocks(qt, _FMIN[f.bits], {"scale": scale, "min": mn})


def refit_type(qt: QuantizedTensor) -> str:
    """The GGUF type a tensor that maps onto no block is re-fitted into: the k-quant of its bits
    (4-bit floats and NF4: Q4_K; FP8 and wider: Q8_0)."""
    bits = getattr(qt.format, "bits", None) or qt.format.code_bits
    return {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K"}.get(int(bits), "Q8_0")


# GGUF block type -> (bits, symmetric) of the lowbit integer format decoding its blocks identically
_AS_INT = {"gguf_q4_0": (4, True), "gguf_q5_0": (5, True), "gguf_q8_0": (8, True),
           "gguf_q4_1": (4, False), "gguf_q5_1": (5, False)}


def integer_from_blocks(qt: QuantizedTensor) -> QuantizedTensor | None:
    """The inverse of exact_blocks for the 32-blocks with a linear grid: Q4_0/Q5_0/Q8_0 as
    symmetric INT4/5/8 g32 (the same codes, d as the group scale), Q4_1/Q5_1 as float-minimum
    INT4/5 g32; the same values bit for bit. None for any other tensor."""
    from lowbit.formats import make_format

    if qt.format.name not in _AS_INT:
        return None
    bits, sym = _AS_INT[qt.format.name]
    fmt = make_format("int", bits=bits, symmetric=sym, zero_point="int" if sym else "float")
    params = {"scale": qt.params["scale"]} if sym else {"scale": qt.params["scale"], "min": qt.params["min"]}
    return QuantizedTensor(qt.codes, params, fmt, 32, qt.shape, qt.transposed)
