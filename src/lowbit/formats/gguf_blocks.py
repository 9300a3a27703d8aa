"""llama.cpp GGUF block types as formats: legacy Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, k-quants Q2_K..Q6_K,
the non-linear IQ4_NL/IQ4_XS, MXFP4 and the ternary TQ2_0 and TQ1_0.

Decoding is bit-for-bit llama.cpp's (and gguf-py's) dequantization, so a QuantizedTensor of one
of these formats written with ``to_gguf_bytes`` decodes in llama.cpp to exactly
``qt.dequantize()``.

Legacy types: one group = one 32-weight block with an fp16 scale ``scale`` (and an fp16 ``min``
for the _1 types); codes are the unsigned q stored in the block (Q8_0: q + 128).

k-quants: one group = one SUB-block (16 weights for Q2_K/Q3_K/Q6_K, 32 for Q4_K/Q5_K), and
``params_from_range`` gives a float scale (and min) per sub-block. ``store_params`` then quantizes
those, per 256-weight super-block, as llama.cpp does: integers (4-bit for Q2_K, 6-bit for
Q3_K/Q4_K/Q5_K, 8-bit signed for Q6_K) relative to an fp16 ``d`` (and ``dmin``) per super-block.
The stored form is the block's own bytes where llama.cpp packs them (the 12-byte 6-bit scale
fields of Q3_K/Q4_K/Q5_K, Q2_K's scale|min<<4 bytes, Q6_K's int8 scales), so ``nbytes`` is the
GGUF size. ``load_params`` returns the effective per-sub-block float scale ``d * sc`` (and min
``-dmin * m``), exactly the float32 values llama.cpp's dequantizer computes. Rows of k-quant
tensors must be a multiple of 256 columns (SchemeError otherwise; the exporter picks a fallback).
Fitting: by default (``search=True``) k-quants fit each sub-block with llama.cpp's scale/min grid
search (``params_from_blocks``, uniform weights), so observers do not apply to them; with
``search=False`` they use the observer's range (min-max: llama.cpp's simple reference). Legacy
types always use the observer's range (min-max reproduces llama.cpp's reference quantizers).

``to_gguf_bytes`` / ``from_gguf_bytes`` convert to and from llama.cpp's block layout; sizes come
from ``gguf.constants.GGML_QUANT_SIZES``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from lowbit.errors import SchemeError
from lowbit.formats.base import Format, Params

# lowbit format name -> GGML type; block and type sizes are always read from GGML_QUANT_SIZES.
GGUF_TYPES: dict[str, GGMLQuantizationType] = {
    "gguf_q8_0": GGMLQuantizationType.Q8_0,
    "gguf_q4_0": GGMLQuantizationType.Q4_0,
    "gguf_q4_1": GGMLQuantizationType.Q4_1,
    "gguf_q5_0": GGMLQuantizationType.Q5_0,
    "gguf_q5_1": GGMLQuantizationType.Q5_1,
    "gguf_q2_k": GGMLQuantizationType.Q2_K,
    "gguf_q3_k": GGMLQuantizationType.Q3_K,
    "gguf_q4_k": GGMLQuantizationType.Q4_K,
    "gguf_q5_k": GGMLQuantizationType.Q5_K,
    "gguf_q6_k": GGMLQuantizationType.Q6_K,
    "gguf_tq2_0": GGMLQuantizationType.TQ2_0,
    "gguf_tq1_0": GGMLQuantizationType.TQ1_0,
    "gguf_iq4_nl": GGMLQuantizationType.IQ4_NL,
    "gguf_iq4_xs": GGMLQuantizationType.IQ4_XS,
    "gguf_mxfp4": GGMLQuantizationType.MXFP4,
    # lattice-grid i-quants (formats/gguf_iq.py)
    "gguf_iq3_s": GGMLQuantizationType.IQ3_S,
    "gguf_iq3_xxs": GGMLQuantizationType.IQ3_XXS,
    "gguf_iq2_s": GGMLQuantizationType.IQ2_S,
    "gguf_iq2_xs": GGMLQuantizationType.IQ2_XS,
    "gguf_iq2_xxs": GGMLQuantizationType.IQ2_XXS,
    "gguf_iq1_m": GGMLQuantizationType.IQ1_M,
    "gguf_iq1_s": GGMLQuantizationType.IQ1_S,
}


def gguf_block_size(name: str) -> int:
    """Weights per GGUF block (32 or 256)."""
    return GGML_QUANT_SIZES[GGUF_TYPES[name]][0]


def gguf_type_size(name: str) -> int:
    """Bytes per GGUF block."""
    return GGML_QUANT_SIZES[GGUF_TYPES[name]][1]


def _safe_div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x / d, and 0 where d is 0 (an all-zero block, or a scale that underflowed fp16)."""
    return torch.where(d != 0, x / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(x))


def _signed_max(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The range end of largest magnitude, with its sign (llama.cpp's "max" of Q4_0/Q3_K/Q6_K)."""
    return torch.where(lo.abs() > hi.abs(), lo, hi)


@dataclasses.dataclass(frozen=True)
class GGUFFormat(Format):
    """Common part of all GGUF block formats (no options: everything is fixed by the type)."""

    qbits: ClassVar[int] = 4
    range_kind: ClassVar[str] = "minmax"

    @property
    def code_bits(self) -> int:
        return self.qbits

    @property
    def qmax(self) -> int:
        return (1 << self.qbits) - 1

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGUF_TYPES[self.name]

    @property
    def block_size(self) -> int:
        return gguf_block_size(self.name)

    def check_cols(self, cols: int) -> None:
        if cols % self.block_size:
            raise SchemeError(
                f"{self.name} needs rows whose length is a multiple of {self.block_size}, got {cols} columns; "
                f"choose another GGUF type (e.g. gguf_q8_0 / gguf_q4_0 for multiples of 32) for this tensor")

    def tensor_params(self, W: torch.Tensor) -> Params:
        self.check_cols(W.shape[-1])
        return {}


class _Fp16Scale:
    """Stored params: one fp16 ``scale`` per block."""

    def store_params(self, p):
        return {"scale": p["scale"].to(torch.float16)}

    def load_params(self, stored):
        return {"scale": stored["scale"].float()}


@dataclasses.dataclass(frozen=True)
class TQ2_0(_Fp16Scale, GGUFFormat):
    """llama.cpp's ternary type: 256-weight blocks, w = (code - 1) * d, codes {0, 1, 2} in 2
    bits (the Q2_K bit order), one fp16 d per block. Fitted with BitNet b1.58's absmean, as
    lowbit's `ternary` format is (llama.cpp's own quantizer takes d = absmax)."""

    name = "gguf_tq2_0"
    qbits = 2
    range_kind = "absmax"
    fixed_group_size: ClassVar[int | None] = QK_K

    def params_from_blocks(self, blocks, tensor_params, importance=None) -> Params:
        return {"scale": blocks.abs().mean(dim=-1).clamp_min(1e-8)}

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        return {"scale": (torch.maximum(lo.abs(), hi.abs()) / 2).clamp_min(1e-8)}

    def encode(self, W, p):
        return (torch.round(_safe_div(W, p["scale"])).clamp(-1, 1) + 1).to(torch.uint8)

    def decode(self, codes, p):
        return (codes.float() - 1) * p["scale"]


# TQ1_0's trit fields per 256-block: (first element, end, bytes, trits per byte). Trit t of byte
# l is element first + t * bytes + l, most significant first; the last field holds four trits
# in the top positions of five.
_TQ1_FIELDS = ((0, 160, 32, 5), (160, 240, 16, 5), (240, 256, 4, 4))
_TQ1_BYTES = sum(f[2] for f in _TQ1_FIELDS)   # 52


def _pack_tq1(q: np.ndarray) -> np.ndarray:
    """(B, 256) codes {0, 1, 2} -> (B, 52) bytes: each byte is ceil(256 · v / 243) for v the
    trits read as a base-3 number in [0, 242], so trit t comes back as ((byte · 3^t) mod 256) · 3 >> 8."""
    out = []
    for a, b, L, n in _TQ1_FIELDS:
        v = q[:, a:b].reshape(q.shape[0], n, L).astype(np.uint16)
        byte = np.zeros((q.shape[0], L), dtype=np.uint16)
        for t in range(5):
            byte = byte * 3 + (v[:, t, :] if t < n else 0)
        out.append(((byte * 256 + 242) // 243).astype(np.uint8))
    return np.concatenate(out, axis=1)


def _unpack_tq1(data: np.ndarray) -> np.ndarray:
    out, off = [], 0
    for _, _, L, n in _TQ1_FIELDS:
        byte = data[:, off: off + L].astype(np.uint16)
        off += L
        trits = [(((byte * 3 ** t) & 0xFF) * 3) >> 8 for t in range(n)]
        out.append(np.stack(trits, axis=1).reshape(data.shape[0], -1))
    return np.concatenate(out, axis=1).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class TQ1_0(TQ2_0):
    """llama.cpp's 1.6875-bit ternary type: TQ2_0's codes and fp16 d per 256, the codes packed as
    base-3 digits, five per byte (3^5 = 243 ≤ 256). lowbit stores the same 52 bytes per block."""

    name = "gguf_tq1_0"

    def packed_nbytes(self, n_codes: int) -> int:
        if n_codes % QK_K:
            raise SchemeError(f"{self.name} packs whole blocks of {QK_K} codes, got {n_codes}")
        return n_codes // QK_K * _TQ1_BYTES

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        q = codes.reshape(-1, QK_K).numpy().astype(np.uint8)
        return torch.from_numpy(_pack_tq1(q).reshape(-1).copy())

    def unpack_codes(self, packed: torch.Tensor, n_codes: int) -> torch.Tensor:
        data = packed.reshape(-1).numpy().astype(np.uint8)[: self.packed_nbytes(n_codes)]
        return torch.from_numpy(_unpack_tq1(data.reshape(-1, _TQ1_BYTES)).reshape(-1).copy())


# --- legacy 32-weight blocks ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _LegacyFormat(GGUFFormat):
    """w = (code - offset) * scale (symmetric types) or w = code * scale + min (the _1 types)."""

    fixed_group_size: ClassVar[int | None] = 32
    has_min: ClassVar[bool] = False
    offset: ClassVar[int] = 0

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        if self.has_min:  # llama.cpp: d = (max - min) / qmax, m = min
            return {"scale": (hi - lo) / self.qmax, "min": lo}
        # llama.cpp: d = max / -offset with max the value of largest magnitude, so it maps to q = 0
        return {"scale": _signed_max(lo, hi) / -self.offset}

    def encode(self, W, p):
        if self.has_min:
            q = torch.round(_safe_div(W - p["min"], p["scale"]))
        else:
            q = torch.round(_safe_div(W, p["scale"])) + self.offset
        return q.clamp(0, self.qmax).to(torch.uint8)

    def decode(self, codes, p):
        q = codes.float()
        if self.has_min:
            return q * p["scale"] + p["min"]
        return (q - self.offset) * p["scale"]

    def store_params(self, p):
        out = {"scale": p["scale"].to(torch.float16)}
        if self.has_min:
            out["min"] = p["min"].to(torch.float16)
        return out

    def load_params(self, stored):
        return {k: v.float() for k, v in stored.items()}


@dataclasses.dataclass(frozen=True)
class Q8_0(_LegacyFormat):
    """8-bit, d = absmax / 127; codes are q + 128."""

    name = "gguf_q8_0"
    qbits = 8
    offset = 128
    range_kind = "absmax"

    def params_from_range(self, lo, hi, tensor_params):
        return {"scale": torch.maximum(lo.abs(), hi.abs()) / 127}


@dataclasses.dataclass(frozen=True)
class Q4_0(_LegacyFormat):
    name = "gguf_q4_0"
    qbits = 4
    offset = 8


@dataclasses.dataclass(frozen=True)
class Q4_1(_LegacyFormat):
    name = "gguf_q4_1"
    qbits = 4
    has_min = True


@dataclasses.dataclass(frozen=True)
class Q5_0(_LegacyFormat):
    name = "gguf_q5_0"
    qbits = 5
    offset = 16


@dataclasses.dataclass(frozen=True)
class Q5_1(_LegacyFormat):
    name = "gguf_q5_1"
    qbits = 5
    has_min = True


# --- k-quants: 256-weight super-blocks of 16- or 32-weight sub-blocks -----------------------------
def _quantize_sub_scales(s: torch.Tensor, per_super: int, qlo: int, qhi: int, signed: bool):
    """Quantize per-sub-block floats s (rows, n_sub) to integers in [qlo, qhi] relative to an fp16
    d per super-block, as llama.cpp does. Unsigned (Q2_K/Q4_K/Q5_K): d = max / qhi. Signed
    (Q3_K/Q6_K): d = max / qlo with max the value of largest magnitude (it maps to qlo).
    Rounding divides by the fp16 d itself, so re-storing loaded parameters gives the same bytes."""
    rows, n_sub = s.shape
    sb = s.reshape(rows, n_sub // per_super, per_super)
    if signed:
        idx = sb.abs().argmax(dim=-1, keepdim=True)
        ref = sb.gather(-1, idx).squeeze(-1) / qlo
    else:
        ref = sb.amax(dim=-1).clamp_min(0) / qhi
    d = ref.to(torch.float16)
    q = torch.round(_safe_div(sb, d.float().unsqueeze(-1))).clamp(qlo, qhi)
    return d, q.reshape(rows, n_sub).to(torch.int32)


def _expand_super(d: torch.Tensor, per_super: int) -> torch.Tensor:
    return d.float().repeat_interleave(per_super, dim=1)


def _pack_scales_12(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins per super-block -> 12 bytes (llama.cpp order)."""
    rows = sc.shape[0]
    sc = sc.reshape(rows, -1, 8)
    mn = mn.reshape(rows, -1, 8)
    b0 = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    b1 = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    b2 = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], dim=-1).reshape(rows, -1).to(torch.uint8)


def _unpack_scales_12(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = packed.shape[0]
    b = packed.to(torch.int32).reshape(rows, -1, 3, 4)
    b0, b1, b2 = b[:, :, 0], b[:, :, 1], b[:, :, 2]
    sc = torch.cat([b0 & 0x3F, (b2 & 0xF) | ((b0 >> 2) & 0x30)], dim=-1)
    mn = torch.cat([b1 & 0x3F, (b2 >> 4) | ((b1 >> 2) & 0x30)], dim=-1)
    return sc.reshape(rows, -1), mn.reshape(rows, -1)


def _pack_scales_q3(u: torch.Tensor) -> torch.Tensor:
    """Q3_K: 16 six-bit (scale + 32) values per super-block -> 12 bytes (llama.cpp order)."""
    rows = u.shape[0]
    u = u.reshape(rows, -1, 16)
    low = (u[..., :8] & 0xF) | ((u[..., 8:] & 0xF) << 4)
    hi2 = (u >> 4) & 3
    high = hi2[..., 0:4] | (hi2[..., 4:8] << 2) | (hi2[..., 8:12] << 4) | (hi2[..., 12:16] << 6)
    return torch.cat([low, high], dim=-1).reshape(rows, -1).to(torch.uint8)


def _unpack_scales_q3(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    b = packed.to(torch.int32).reshape(rows, -1, 12)
    low = torch.cat([b[..., :8] & 0xF, b[..., :8] >> 4], dim=-1)
    high = torch.cat([(b[..., 8:12] >> (2 * s)) & 3 for s in range(4)], dim=-1)
    return (low | (high << 4)).reshape(rows, -1)


def _search_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's weighted scale/min search for x = scale * L + min (L in 0..nmax, min <= 0), per
    group on the last dim: start from min-max, try nstep+1 stretched grids, refit scale and min by
    weighted least squares for each, keep the least weighted error (|.| when use_mad)."""
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    rng = mx - mn
    valid = rng > 0
    rng = torch.where(valid, rng, torch.ones_like(rng))
    xm = x - mn.unsqueeze(-1)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)

    def err_of(scale, m, L):
        diff = scale.unsqueeze(-1) * L + m.unsqueeze(-1) - x
        return (w * (diff.abs() if use_mad else diff * diff)).sum(-1)

    iscale = nmax / rng
    L = torch.round(iscale.unsqueeze(-1) * xm).clamp(0, nmax)
    best_scale, best_min = 1 / iscale, mn
    best_err = err_of(best_scale, best_min, L)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / rng
        L = torch.round(iscale.unsqueeze(-1) * xm).clamp(0, nmax)
        sum_l = (w * L).sum(-1)
        sum_l2 = (w * L * L).sum(-1)
        sum_xl = (w * L * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        m = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        positive = m > 0  # the min must stay <= 0: refit the scale alone
        scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), scale)
        m = torch.where(positive, torch.zeros_like(m), m)
        err = err_of(scale, m, L)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, m, best_min)
    return torch.where(valid, best_scale, torch.zeros_like(best_scale)).clamp_min(0), best_min


def _search_scale_sym(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """llama.cpp's make_qx_quants search for x = scale * L, L in -nmax..nmax-1: try iscales
    -(nmax + 0.1*k)/max for k in -9..9 (max = the value of largest magnitude, signed), refit the
    scale by weighted least squares, keep the best weighted fit."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    valid = mx != 0
    mx = torch.where(valid, mx, torch.ones_like(mx))
    best_scale = mx / -nmax
    best_score = torch.full_like(mx, -1.0)
    for k in range(-9, 10):
        iscale = -(nmax + 0.1 * k) / mx
        L = torch.round(iscale.unsqueeze(-1) * x).clamp(-nmax, nmax - 1)
        best_score, best_scale = _keep_best_lsq(x, w, L, best_score, best_scale)
    return torch.where(valid, best_scale, torch.zeros_like(best_scale))


def _keep_best_lsq(x, w, q, best_score, best_scale):
    """The least-squares scale of x ~ scale * q (weights w) per group, kept where it fits better
    than the best so far: score = (sum w q x)^2 / sum w q^2 (weighted error = sum w x^2 - score)."""
    sum_qx, sum_q2 = (w * q * x).sum(-1), (w * q * q).sum(-1)
    ok = sum_q2 > 0
    sum_q2 = torch.where(ok, sum_q2, torch.ones_like(sum_q2))
    score = sum_qx * sum_qx / sum_q2
    better = ok & (score > best_score)
    return torch.where(better, score, best_score), torch.where(better, sum_qx / sum_q2, best_scale)



@dataclasses.dataclass(frozen=True)
class _KQuantFormat(GGUFFormat):
    """Per-sub-block float params, stored as llama.cpp's super-block integers (see module doc)."""

    has_min: ClassVar[bool] = True
    offset: ClassVar[int] = 0  # symmetric types: w = (code - offset) * scale
    # llama.cpp's weighted search per sub-block (params_from_blocks); False: fit from the range
    # the observer chose (min-max by default), so observers such as mse/percentile apply.
    search: bool = True

    @property
    def per_super(self) -> int:
        return QK_K // self.fixed_group_size

    def _check_n_sub(self, n_sub: int) -> None:
        if n_sub % self.per_super:
            raise SchemeError(
                f"{self.name} stores {QK_K}-weight super-blocks of {self.per_super} groups of {self.fixed_group_size}, "
                f"got {n_sub} groups ({n_sub * self.fixed_group_size} columns); the row length must be a multiple of "
                f"{QK_K}: choose a legacy GGUF type (gguf_q8_0, gguf_q4_0, ...) for this tensor")

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        if self.has_min:  # llama.cpp keeps the min <= 0 and stores -min as an unsigned integer
            mn = lo.clamp(max=0)
            return {"scale": (hi.clamp(min=0) - mn) / self.qmax, "min": mn}
        return {"scale": _signed_max(lo, hi) / -self.offset}

    def params_from_blocks(self, blocks, tensor_params, importance=None) -> Params | None:
        """llama.cpp's scale(/min) search per sub-block, with its grids per type. Weights: the
        calibration importance of each column (diag X^T X, as llama.cpp's imatrix) when given,
        else uniform: on plain weight MSE uniform beat llama.cpp's |x| / x^2 / rms+|x|
        weightings for every k-quant, and beat the min-max and mse observers."""
        if not self.search:
            return None
        x = blocks.float()
        w = torch.ones_like(x) if importance is None else importance.float().expand_as(x).clamp_min(1e-12)
        if not self.has_min:  # Q3_K / Q6_K
            return {"scale": _search_scale_sym(x, w, self.offset)}
        rmin, nstep = (-1.0, 20) if self.name == "gguf_q4_k" else (-0.5, 15)
        scale, mn = _search_scale_min(x, w, self.qmax, rmin, 0.1, nstep, use_mad=False)
        return {"scale": scale, "min": mn}

    def encode(self, W, p):
        if self.has_min:
            q = torch.round(_safe_div(W - p["min"], p["scale"]))
        else:
            q = torch.round(_safe_div(W, p["scale"])) + self.offset
        return q.clamp(0, self.qmax).to(torch.uint8)

    def decode(self, codes, p):
        q = codes.float()
        if self.has_min:
            return q * p["scale"] + p["min"]  # == llama.cpp's (d*sc)*q - (dmin*m), bit for bit
        return (q - self.offset) * p["scale"]


@dataclasses.dataclass(frozen=True)
class _KQuantMin(_KQuantFormat):
    """Q2_K (4-bit scales/mins), Q4_K and Q5_K (6-bit scales/mins packed in 12 bytes)."""

    sc_bits: ClassVar[int] = 6

    def store_params(self, p):
        s, mn = p["scale"].float(), p["min"].float()
        self._check_n_sub(s.shape[1])
        qhi = (1 << self.sc_bits) - 1
        d, sc = _quantize_sub_scales(s, self.per_super, 0, qhi, signed=False)
        dmin, m = _quantize_sub_scales(-mn, self.per_super, 0, qhi, signed=False)
        packed = (sc | (m << 4)).to(torch.uint8) if self.sc_bits == 4 else _pack_scales_12(sc, m)
        return {"d": d, "dmin": dmin, "scales": packed}

    def load_params(self, stored):
        packed = stored["scales"]
        if self.sc_bits == 4:
            sc, m = packed.to(torch.int32) & 0xF, packed.to(torch.int32) >> 4
        else:
            sc, m = _unpack_scales_12(packed)
        scale = _expand_super(stored["d"], self.per_super) * sc.float()
        mn = -(_expand_super(stored["dmin"], self.per_super) * m.float())
        return {"scale": scale, "min": mn}


@dataclasses.dataclass(frozen=True)
class Q2_K(_KQuantMin):
    name = "gguf_q2_k"
    qbits = 2
    fixed_group_size: ClassVar[int | None] = 16
    sc_bits = 4


@dataclasses.dataclass(frozen=True)
class Q4_K(_KQuantMin):
    name = "gguf_q4_k"
    qbits = 4
    fixed_group_size: ClassVar[int | None] = 32


@dataclasses.dataclass(frozen=True)
class Q5_K(_KQuantMin):
    name = "gguf_q5_k"
    qbits = 5
    fixed_group_size: ClassVar[int | None] = 32


@dataclasses.dataclass(frozen=True)
class Q3_K(_KQuantFormat):
    """3-bit, q = code - 4 in -4..3; 6-bit signed sub-block scales (stored + 32), fp16 d."""

    name = "gguf_q3_k"
    qbits = 3
    fixed_group_size: ClassVar[int | None] = 16
    has_min = False
    offset = 4

    def store_params(self, p):
        s = p["scale"].float()
        self._check_n_sub(s.shape[1])
        d, sc = _quantize_sub_scales(s, self.per_super, -32, 31, signed=True)
        return {"d": d, "scales": _pack_scales_q3(sc + 32)}

    def load_params(self, stored):
        sc = _unpack_scales_q3(stored["scales"]) - 32
        return {"scale": _expand_super(stored["d"], self.per_super) * sc.float()}


@dataclasses.dataclass(frozen=True)
class Q6_K(_KQuantFormat):
    """6-bit, q = code - 32 in -32..31; int8 sub-block scales, fp16 d."""

    name = "gguf_q6_k"
    qbits = 6
    fixed_group_size: ClassVar[int | None] = 16
    has_min = False
    offset = 32

    def store_params(self, p):
        s = p["scale"].float()
        self._check_n_sub(s.shape[1])
        d, sc = _quantize_sub_scales(s, self.per_super, -128, 127, signed=True)
        return {"d": d, "scales": sc.to(torch.int8)}

    def load_params(self, stored):
        return {"scale": _expand_super(stored["d"], self.per_super) * stored["scales"].float()}


# --- IQ4: a non-linear 4-bit grid ------------------------------------------------------------------
# llama.cpp's kvalues_iq4nl (published in ggml-common.h; gguf-py ships it as IQ4_NL.kvalues)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_index(y: torch.Tensor) -> torch.Tensor:
    """Index of the nearest IQ4 level to y (a tie goes up, as llama.cpp's best_index_int8)."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32)
    return torch.bucketize(y, (levels[1:] + levels[:-1]) / 2, right=True)


def _search_scale_iq4(x: torch.Tensor, w: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """llama.cpp's IQ4 scale search per group: start at d = max / -127 (max the value of largest
    magnitude), try the inverse scales (k - 127) / max for k in -ntry..ntry, refit d by weighted
    least squares for each, keep the largest (sum w q x)^2 / sum w q^2."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32)
    idx = x.abs().argmax(dim=-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    valid = mx != 0
    mx = torch.where(valid, mx, torch.ones_like(mx))
    best_d, best_score = torch.zeros_like(mx), torch.full_like(mx, -1.0)
    for k in [None, *range(-ntry, ntry + 1)]:
        iscale = -IQ4_LEVELS[0] / mx if k is None else (k + IQ4_LEVELS[0]) / mx
        q = levels[_iq4_index(iscale.unsqueeze(-1) * x)]
        best_score, best_d = _keep_best_lsq(x, w, q, best_score, best_d)
    return torch.where(valid, best_d, torch.zeros_like(best_d))


@dataclasses.dataclass(frozen=True)
class _IQ4Format(GGUFFormat):
    """w = IQ4_LEVELS[code] * scale. Fitted with llama.cpp's scale search (uniform weights, or the
    calibration importance of each column when given); observers do not apply."""

    qbits = 4
    range_kind = "absmax"

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        return {"scale": _signed_max(lo, hi) / IQ4_LEVELS[0]}

    def params_from_blocks(self, blocks, tensor_params, importance=None) -> Params:
        x = blocks.float()
        w = torch.ones_like(x) if importance is None else importance.float().expand_as(x).clamp_min(1e-12)
        return {"scale": _search_scale_iq4(x, w)}

    def encode(self, W, p):
        return _iq4_index(_safe_div(W, p["scale"])).to(torch.uint8)

    def decode(self, codes, p):
        return torch.tensor(IQ4_LEVELS, dtype=torch.float32)[codes.long()] * p["scale"]


@dataclasses.dataclass(frozen=True)
class IQ4_NL(_Fp16Scale, _IQ4Format):
    """32-weight blocks, one fp16 scale each."""

    name = "gguf_iq4_nl"
    fixed_group_size: ClassVar[int | None] = 32


@dataclasses.dataclass(frozen=True)
class IQ4_XS(_IQ4Format):
    """256-weight super-blocks of eight 32-weight sub-blocks: an fp16 d per super-block and a
    6-bit signed integer per sub-block (stored + 32), so a sub-block's scale is d * (ls - 32)."""

    name = "gguf_iq4_xs"
    fixed_group_size: ClassVar[int | None] = 32

    @property
    def per_super(self) -> int:
        return QK_K // self.fixed_group_size

    def store_params(self, p):
        s = p["scale"].float()
        if s.shape[1] % self.per_super:
            raise SchemeError(f"{self.name} stores {QK_K}-weight super-blocks, got {s.shape[1] * 32} columns; the row "
                              f"length must be a multiple of {QK_K}: choose gguf_iq4_nl (blocks of 32) for this tensor")
        d, ls = _quantize_sub_scales(s, self.per_super, -32, 31, signed=True)
        return {"d": d, "scales": _pack_scales_iq4xs(ls + 32)}

    def load_params(self, stored):
        ls = _unpack_scales_iq4xs(stored["scales"])
        return {"scale": _expand_super(stored["d"], self.per_super) * (ls.float() - 32)}


def _pack_scales_iq4xs(u: torch.Tensor) -> torch.Tensor:
    """IQ4_XS: 8 six-bit (scale + 32) values per super-block -> 6 bytes (llama.cpp order): a
    little-endian uint16 of the top 2 bits (sub-block i at bit 2i), then 4 bytes of low nibbles
    (sub-block 2j in byte j's low half, 2j+1 in its high half)."""
    rows = u.shape[0]
    u = u.to(torch.int32).reshape(rows, -1, 8)
    high = (((u >> 4) & 3) << (2 * torch.arange(8))).sum(-1)
    low = (u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4)
    return torch.cat([(high & 0xFF)[..., None], (high >> 8)[..., None], low], dim=-1).reshape(rows, -1).to(torch.uint8)


def _unpack_scales_iq4xs(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    b = packed.to(torch.int32).reshape(rows, -1, 6)
    high = b[..., 0] | (b[..., 1] << 8)
    low = torch.stack([b[..., 2:] & 0xF, b[..., 2:] >> 4], dim=-1).reshape(rows, -1, 8)
    return (low | (((high[..., None] >> (2 * torch.arange(8))) & 3) << 4)).reshape(rows, -1)


# --- MXFP4 --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MXFP4(GGUFFormat):
    """llama.cpp's MXFP4: OCP MX v1.0 blocks of 32 E2M1 elements and one E8M0 byte ``e``, the
    values lowbit's `mxfp4` format holds (same element codes, same scale exponent)."""

    name = "gguf_mxfp4"
    qbits = 4
    range_kind = "absmax"
    fixed_group_size: ClassVar[int | None] = 32

    @staticmethod
    def _mx():
        from lowbit.formats.mx import MXFP4Format

        return MXFP4Format()

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        return self._mx().params_from_range(lo, hi, tensor_params)

    def encode(self, W, p):
        return self._mx().encode(W, p)

    def decode(self, codes, p):
        return self._mx().decode(codes, p)

    def store_params(self, p):
        return {"e": self._mx().store_params(p)["scale"]}

    def load_params(self, stored):
        return self._mx().load_params({"scale": stored["e"]})


# --- byte layout ---------------------------------------------------------------------------------
def _pack_fields(v: np.ndarray, L: int, b: int) -> np.ndarray:
    """(B, E) values of b bits -> (B, E*b/8) bytes: within each run of L*8/b values, value s*L + l
    sits in byte l at bit b*s (the llama.cpp order of qs/qh/hmask arrays)."""
    per = 8 // b
    B, E = v.shape
    v = v.astype(np.uint8).reshape(B, E // (L * per), per, L)
    out = np.zeros((B, E // (L * per), L), dtype=np.uint8)
    for s in range(per):
        out |= ((v[:, :, s, :] & ((1 << b) - 1)) << (b * s)).astype(np.uint8)
    return out.reshape(B, -1)


def _unpack_fields(data: np.ndarray, L: int, b: int) -> np.ndarray:
    per = 8 // b
    B = data.shape[0]
    shifts = (np.arange(per, dtype=np.uint8) * b).reshape(1, 1, per, 1)
    return ((data.reshape(B, -1, 1, L) >> shifts) & ((1 << b) - 1)).reshape(B, -1).astype(np.uint8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16).reshape(-1, 1)).view(np.uint8)


def _f16_from(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.float16).reshape(-1)


def _encode_blocks(name: str, q: np.ndarray, p: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Byte fields, in order, of blocks: q (B, block) codes, p stored params, one row per block."""
    if name.startswith(("gguf_iq1", "gguf_iq2", "gguf_iq3")):
        from lowbit.formats.gguf_iq import encode_iq_blocks

        return encode_iq_blocks(name, q, p)
    if name == "gguf_q8_0":
        return [_f16_bytes(p["scale"]), q ^ np.uint8(0x80)]
    if name in ("gguf_q4_0", "gguf_q4_1"):
        head = [_f16_bytes(p["scale"])] + ([_f16_bytes(p["min"])] if "min" in p else [])
        return head + [_pack_fields(q, 16, 4)]
    if name in ("gguf_q5_0", "gguf_q5_1"):
        head = [_f16_bytes(p["scale"])] + ([_f16_bytes(p["min"])] if "min" in p else [])
        qh = np.packbits(q >> 4, axis=-1, bitorder="little")  # bit i of a little-endian uint32
        return head + [qh, _pack_fields(q & 0xF, 16, 4)]
    if name == "gguf_q2_k":
        return [p["scales"], _pack_fields(q, 32, 2), _f16_bytes(p["d"]), _f16_bytes(p["dmin"])]
    if name == "gguf_q3_k":
        return [_pack_fields(q >> 2, 32, 1), _pack_fields(q & 3, 32, 2), p["scales"], _f16_bytes(p["d"])]
    if name == "gguf_q4_k":
        return [_f16_bytes(p["d"]), _f16_bytes(p["dmin"]), p["scales"], _pack_fields(q, 32, 4)]
    if name == "gguf_q5_k":
        return [_f16_bytes(p["d"]), _f16_bytes(p["dmin"]), p["scales"], _pack_fields(q >> 4, 32, 1),
                _pack_fields(q & 0xF, 32, 4)]
    if name == "gguf_q6_k":
        return [_pack_fields(q & 0xF, 64, 4), _pack_fields(q >> 4, 32, 2), p["scales"].view(np.uint8),
                _f16_bytes(p["d"])]
    if name == "gguf_tq2_0":
        return [_pack_fields(q, 32, 2), _f16_bytes(p["scale"])]
    if name == "gguf_tq1_0":
        return [_pack_tq1(q), _f16_bytes(p["scale"])]
    if name == "gguf_iq4_nl":
        return [_f16_bytes(p["scale"]), _pack_fields(q, 16, 4)]
    if name == "gguf_mxfp4":
        return [p["e"].reshape(-1, 1).astype(np.uint8), _pack_fields(q, 16, 4)]
    if name == "gguf_iq4_xs":
        return [_f16_bytes(p["d"]), p["scales"], _pack_fields(q, 16, 4)]
    raise SchemeError(f"{name!r} is not a GGUF block format; choose one of: {', '.join(GGUF_TYPES)}")


def _decode_blocks(name: str, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Inverse of _encode_blocks: codes (B, block) and stored params (one row per block)."""
    if name.startswith(("gguf_iq1", "gguf_iq2", "gguf_iq3")):
        from lowbit.formats.gguf_iq import decode_iq_blocks

        return decode_iq_blocks(name, blocks)

    def split(*sizes):
        return np.split(blocks, np.cumsum(sizes)[:-1], axis=1)

    if name == "gguf_q8_0":
        d, qs = split(2, 32)
        return qs ^ np.uint8(0x80), {"scale": _f16_from(d)}
    if name in ("gguf_q4_0", "gguf_q4_1"):
        if name == "gguf_q4_1":
            d, m, qs = split(2, 2, 16)
            p = {"scale": _f16_from(d), "min": _f16_from(m)}
        else:
            d, qs = split(2, 16)
            p = {"scale": _f16_from(d)}
        return _unpack_fields(qs, 16, 4), p
    if name in ("gguf_q5_0", "gguf_q5_1"):
        if name == "gguf_q5_1":
            d, m, qh, qs = split(2, 2, 4, 16)
            p = {"scale": _f16_from(d), "min": _f16_from(m)}
        else:
            d, qh, qs = split(2, 4, 16)
            p = {"scale": _f16_from(d)}
        high = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
        return _unpack_fields(qs, 16, 4) | (high << 4), p
    if name == "gguf_q2_k":
        sc, qs, d, dmin = split(QK_K // 16, QK_K // 4, 2, 2)
        return _unpack_fields(qs, 32, 2), {"scales": sc, "d": _f16_from(d), "dmin": _f16_from(dmin)}
    if name == "gguf_q3_k":
        hm, qs, sc, d = split(QK_K // 8, QK_K // 4, 12, 2)
        q = _unpack_fields(qs, 32, 2) | (_unpack_fields(hm, 32, 1) << 2)
        return q, {"scales": sc, "d": _f16_from(d)}
    if name == "gguf_q4_k":
        d, dmin, sc, qs = split(2, 2, 12, QK_K // 2)
        return _unpack_fields(qs, 32, 4), {"d": _f16_from(d), "dmin": _f16_from(dmin), "scales": sc}
    if name == "gguf_q5_k":
        d, dmin, sc, qh, qs = split(2, 2, 12, QK_K // 8, QK_K // 2)
        q = _unpack_fields(qs, 32, 4) | (_unpack_fields(qh, 32, 1) << 4)
        return q, {"d": _f16_from(d), "dmin": _f16_from(dmin), "scales": sc}
    if name == "gguf_tq2_0":
        qs, d = split(QK_K // 4, 2)
        return _unpack_fields(qs, 32, 2), {"scale": _f16_from(d)}
    if name == "gguf_tq1_0":
        qs, d = split(_TQ1_BYTES, 2)
        return _unpack_tq1(np.ascontiguousarray(qs)), {"scale": _f16_from(d)}
    if name == "gguf_iq4_nl":
        d, qs = split(2, 16)
        return _unpack_fields(qs, 16, 4), {"scale": _f16_from(d)}
    if name == "gguf_mxfp4":
        e, qs = split(1, 16)
        return _unpack_fields(qs, 16, 4), {"e": np.ascontiguousarray(e).reshape(-1)}
    if name == "gguf_iq4_xs":
        d, sc, qs = split(2, 2 + QK_K // 64, QK_K // 2)
        return _unpack_fields(qs, 16, 4), {"d": _f16_from(d), "scales": sc}
    if name == "gguf_q6_k":
        ql, qh, sc, d = split(QK_K // 2, QK_K // 4, QK_K // 16, 2)
        q = _unpack_fields(ql, 64, 4) | (_unpack_fields(qh, 32, 2) << 4)
        return q, {"scales": np.ascontiguousarray(sc).view(np.int8), "d": _f16_from(d)}
    raise SchemeError(f"{name!r} is not a GGUF block format; choose one of: {', '.join(GGUF_TYPES)}")


def to_gguf_bytes(qt) -> np.ndarray:
    """llama.cpp's bytes for a QuantizedTensor of a GGUF block format: uint8 (rows, row_bytes) for
    its (rows, cols) matrix view (cols = input dimension, as GGUF stores weights)."""
    name = qt.format.name
    if name not in GGUF_TYPES:
        raise SchemeError(f"format {name!r} has no GGUF block layout; choose one of: {', '.join(GGUF_TYPES)}")
    rows, cols = qt.codes.shape
    qt.format.check_cols(cols)
    block, type_size = GGML_QUANT_SIZES[GGUF_TYPES[name]]
    n_blocks = rows * (cols // block)
    q = qt.codes.numpy().astype(np.uint8).reshape(n_blocks, block)
    p = {k: v.numpy().reshape(n_blocks, -1) for k, v in qt.params.items()}
    out = np.concatenate(_encode_blocks(name, q, p), axis=1)
    assert out.shape == (n_blocks, type_size), (name, out.shape)
    return out.reshape(rows, (cols // block) * type_size)


_PARAM_DTYPES = {"scale": torch.float16, "min": torch.float16, "d": torch.float16, "dmin": torch.float16}


def from_gguf_bytes(data: np.ndarray, type_name: str, shape) -> "QuantizedTensor":  # noqa: F821
    """QuantizedTensor from llama.cpp bytes of type `type_name` (a lowbit name such as "gguf_q4_k",
    or a GGML type name such as "Q4_K") for a tensor of logical `shape` (last dim = row length)."""
    from lowbit.formats.base import make_format
    from lowbit.tensor import QuantizedTensor

    name = type_name if type_name in GGUF_TYPES else f"gguf_{str(type_name).lower()}"
    if name not in GGUF_TYPES:
        raise SchemeError(f"unsupported GGUF type {type_name!r}; supported: {', '.join(GGUF_TYPES)}")
    fmt = make_format(name)
    shape = tuple(int(s) for s in shape)
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    fmt.check_cols(cols)
    block, type_size = GGML_QUANT_SIZES[GGUF_TYPES[name]]
    nb = cols // block
    raw = np.ascontiguousarray(np.asarray(data).view(np.uint8)).reshape(-1)
    if raw.size != rows * nb * type_size:
        raise SchemeError(f"{name} data for shape {shape} must be {rows * nb * type_size} bytes, got {raw.size}")
    codes, p = _decode_blocks(name, raw.reshape(rows * nb, type_size))
    params = {}
    for k, v in p.items():
        t = torch.from_numpy(np.ascontiguousarray(v).reshape(rows, -1).copy())
        params[k] = t.to(_PARAM_DTYPES[k]) if k in _PARAM_DTYPES else t
    codes_t = torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols).copy())
    return QuantizedTensor(codes_t, params, fmt, fmt.fixed_group_size, shape, False)
