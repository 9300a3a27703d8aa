"""llama.cpp's lattice-grid GGUF types below 4 bits: IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS,
IQ1_M and IQ1_S.

Each stores a 256-weight super-block as vectors of 8 (IQ2, IQ1) or 4 (IQ3) weights, each vector an
index into a fixed grid of points (the published tables, which gguf-py ships as data), a scale per
sub-block of 16 or 32 weights (a 3- or 4-bit integer relative to an fp16 ``d`` per super-block),
and either sign bits (IQ2/IQ3: the grids are non-negative) or, for IQ1, a shift of the ternary grid
by ±1/8. IQ2_XXS, IQ2_XS and IQ3_XXS store 7 sign bits per 8 weights: the eighth is whatever makes
the number of negative signs even.

Decoding is gguf-py's (and llama.cpp's) bit for bit: ``w = sub_scale * grid[index] * sign`` or,
for IQ1, ``sub_scale * (grid[index] + delta)``, with sub_scale exactly the float32 llama.cpp
computes from ``d`` and the integer.

Codes keep the weight's shape, like lowbit's other vector formats: a vector's index is spread over
its weights (``index_chunk`` bits each), and each weight's code also holds its sign bit and, for
IQ1, its vector's delta bit. Stored (``pack_codes``), only the bits llama.cpp stores remain: the
index per vector, 7 or 8 sign bits per 8 weights, the delta bits; so lowbit's size is the GGUF size.

Fitting is lowbit's own, with llama.cpp's error weights (importance × sqrt(σ² + w²), σ² the mean
square of the super-block): each sub-block tries 9 scales, projects every vector on the grid by an
exact weighted nearest-point search (llama.cpp searches a neighbour list), refits the scale by
weighted least squares and keeps the best; then the scales are stored and every vector is
projected again on the stored scale, so the codes fit the values a runtime will decode.
These formats encode vectors, not columns: GPTQ quantizes 8 columns (IQ1_S: 32) at a time and
feeds their joint error forward through the block of the inverse Hessian's Cholesky factor
(QuIP#'s BlockLDLQ), see methods/gptq.py."""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
from gguf.constants import QK_K

from lowbit.errors import SchemeError
from lowbit.formats.base import Params
from lowbit.formats.gguf_blocks import GGUFFormat, _keep_best_lsq, _safe_div

_CHUNK = 512                # vectors per distance block: the scratch stays in cache (4x faster than 8k)
# candidate scales: largest |w| / (grid top x t); t > 1 clips the largest weights, which pays at
# these bit widths (IQ1_S's weighted error on Gaussian rows: 0.227 with t in [0.5, 1.1], 0.195 here)
_SEARCH = torch.linspace(0.6, 1.8, 9).tolist()


@lru_cache(maxsize=None)
def grid_points(class_name: str) -> torch.Tensor:
    """(entries, dim) float32 grid of a gguf-py i-quant class, from the table it ships."""
    import gguf.quants as gq

    cls = getattr(gq, class_name)
    cls.init_grid()
    return torch.from_numpy(np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32))


def _nearest_with_distance(V: torch.Tensor, G: torch.Tensor, Wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weighted squared distance minus sum w v^2) of the grid row nearest each row of V;
    ties go to the lower index."""
    idx = torch.empty(V.shape[0], dtype=torch.long)
    dist = torch.empty(V.shape[0])
    # sum w (v - g)^2 - sum w v^2 = [w, -2 w v] . [g^2, g]: one product with an inner size of 2 dim
    B = torch.cat([G.pow(2), G], 1).T.contiguous()
    A = torch.cat([Wt, -2 * Wt * V], 1)
    for i in range(0, V.shape[0], _CHUNK):
        dist[i: i + _CHUNK], idx[i: i + _CHUNK] = (A[i: i + _CHUNK] @ B).min(1)
    return idx, dist


@dataclasses.dataclass(frozen=True)
class _IQGrid(GGUFFormat):
    range_kind = "absmax"
    grid_class: ClassVar[str] = ""
    vector_dim: ClassVar[int] = 8
    index_bits: ClassVar[int] = 8
    signs: ClassVar[str] = "parity"       # "parity" (7 stored bits per 8), "explicit" (8), "none"
    delta: ClassVar[float] = 0.0          # IQ1: the grid is shifted by ±delta
    delta_per_sub: ClassVar[bool] = False  # IQ1_S: one delta sign per sub-block, else per vector
    scale_bits: ClassVar[int] = 4
    # sub-block scale = d * (l + scale_offset) * scale_mult (exact in float32: mult is 2^k)
    scale_offset: ClassVar[float] = 0.5
    scale_mult: ClassVar[float] = 0.25

    # --- layout of a weight's code ------------------------------------------------------------
    @property
    def index_chunk(self) -> int:
        return math.ceil(self.index_bits / self.vector_dim)

    @property
    def code_bits(self) -> int:
        return self.index_chunk + (self.signs != "none") + (self.delta != 0)

    @property
    def qbits(self) -> int:      # GGUFFormat.qmax reads it
        return self.code_bits

    @property
    def grid(self) -> torch.Tensor:
        return grid_points(self.grid_class)

    @property
    def per_super(self) -> int:
        return QK_K // self.fixed_group_size

    def _sign_bit(self) -> int:
        return self.index_chunk

    def _delta_bit(self) -> int:
        return self.index_chunk + (self.signs != "none")

    def join(self, idx: torch.Tensor, neg: torch.Tensor | None, dneg: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
        """Per-weight codes (rows, cols) from vector indices (rows, cols/dim), sign bits (rows,
        cols) and per-vector delta bits (rows, cols/dim)."""
        D, b = self.vector_dim, self.index_chunk
        parts = torch.stack([(idx >> (k * b)) & ((1 << b) - 1) for k in range(D)], -1).reshape(rows, cols)
        if neg is not None:
            parts = parts | (neg.long() << self._sign_bit())
        if dneg is not None:
            parts = parts | (dneg.long().repeat_interleave(D, dim=-1) << self._delta_bit())
        return parts.to(torch.uint8)

    def split(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Inverse of join: (indices, sign bits or None, delta bits or None)."""
        rows, cols = codes.shape
        D, b = self.vector_dim, self.index_chunk
        c = codes.long()
        chunks = (c & ((1 << b) - 1)).reshape(rows, cols // D, D)
        idx = sum(chunks[..., k] << (k * b) for k in range(D))
        neg = ((c >> self._sign_bit()) & 1).bool() if self.signs != "none" else None
        dneg = ((c[:, ::D] >> self._delta_bit()) & 1).bool() if self.delta else None
        return idx, neg, dneg

    # --- values -------------------------------------------------------------------------------
    def _values(self, idx: torch.Tensor, neg, dneg) -> torch.Tensor:
        g = self.grid[idx]                                   # (rows, vectors, dim)
        if dneg is not None:
            g = g + torch.where(dneg, -self.delta, self.delta).unsqueeze(-1)
        g = g.reshape(idx.shape[0], -1)
        return torch.where(neg, -g, g) if neg is not None else g

    def decode(self, codes, p):
        return p["scale"] * self._values(*self.split(codes))

    # --- fitting ------------------------------------------------------------------------------
    def _weights(self, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """llama.cpp's error weights for x (rows, cols), cols a multiple of 256."""
        rows, cols = x.shape
        sigma2 = x.reshape(rows, cols // QK_K, QK_K).pow(2).mean(-1).repeat_interleave(QK_K, dim=1)
        w = (sigma2 + x * x).sqrt()
        return w if importance is None else w * importance.reshape(1, -1).float()

    def _fold(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(targets for the grid, sign bits): |x| and x < 0 for signed grids; with parity signs,
        a group of 8 with an odd count of negatives flips its least important weight's sign
        (its target becomes -|x|), as llama.cpp does."""
        if self.signs == "none":
            return x, None
        neg = x < 0
        A = x.abs()
        if self.signs == "parity":
            rows, cols = x.shape
            odd = (neg.reshape(rows, -1, 8).sum(-1) % 2).bool()
            imin = (w * x * x).reshape(rows, -1, 8).argmin(-1)
            flip = torch.zeros(rows, cols // 8, 8, dtype=torch.bool)
            flip.scatter_(-1, imin.unsqueeze(-1), odd.unsqueeze(-1))
            flip = flip.reshape(rows, cols)
            neg = neg ^ flip
            A = torch.where(flip, -A, A)
        return A, neg

    def _project(self, A: torch.Tensor, w: torch.Tensor, s: torch.Tensor):
        """Nearest grid points for targets A (rows, cols) at per-vector scales s (rows, cols/dim):
        (indices, delta bits or None, grid values incl. delta, shape of A)."""
        rows, cols = A.shape
        D = self.vector_dim
        V = _safe_div(A.reshape(rows, -1, D), s.unsqueeze(-1)).reshape(-1, D)
        Wt = w.reshape(-1, D)
        G = self.grid
        if not self.delta:
            idx, _ = _nearest_with_distance(V, G, Wt)
            idx = idx.reshape(rows, -1)
            return idx, None, G[idx].reshape(rows, cols)
        ip, dp = _nearest_with_distance(V, G + self.delta, Wt)
        im, dm = _nearest_with_distance(V, G - self.delta, Wt)
        if self.delta_per_sub:   # one delta per sub-block: the sign with the smaller summed error
            per = self.fixed_group_size // D
            dneg = (dm.reshape(-1, per).sum(-1) < dp.reshape(-1, per).sum(-1)).repeat_interleave(per)
        else:
            dneg = dm < dp
        idx = torch.where(dneg, im, ip).reshape(rows, -1)
        dneg = dneg.reshape(rows, -1)
        q = G[idx] + torch.where(dneg, -self.delta, self.delta).unsqueeze(-1)
        return idx, dneg, q.reshape(rows, cols)

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        raise SchemeError(f"{self.name} fits its scales with a grid search; observers do not apply")

    def params_from_blocks(self, blocks, tensor_params, importance=None) -> Params:
        rows, n, sub = blocks.shape
        x = blocks.float().reshape(rows, n * sub)
        imp = None if importance is None else importance.float().reshape(-1)
        w = self._weights(x, imp)
        A, _ = self._fold(x, w)
        top = float(self.grid.abs().max()) + self.delta
        amax = A.abs().reshape(rows, n, sub).amax(-1)
        per_vec = sub // self.vector_dim
        Ab, wb = A.reshape(rows, n, sub), w.reshape(rows, n, sub)
        best_score, best_scale = torch.full((rows, n), -1.0), torch.zeros(rows, n)
        for t in _SEARCH:
            s = amax / (top * t)
            _, _, q = self._project(A, w, s.repeat_interleave(per_vec, dim=1))
            best_score, best_scale = _keep_best_lsq(Ab, wb, q.reshape(rows, n, sub), best_score, best_scale)
        return {"scale": best_scale.clamp_min(0)}

    @property
    def encode_unit(self) -> int:
        """Columns that must be encoded together: a sign-parity group of 8, or IQ1_S's sub-block
        (one delta sign)."""
        return self.fixed_group_size if self.delta_per_sub else 8

    def encode(self, W, p, importance: torch.Tensor | None = None):
        rows, cols = W.shape
        self.check_cols(cols)
        x = W.float()
        return self.encode_weighted(x, p["scale"].reshape(rows, -1, self.vector_dim)[..., 0], self._weights(x, importance))

    def encode_weighted(self, x: torch.Tensor, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Codes of x (rows, cols), cols a multiple of encode_unit, at per-vector scales s
        (rows, cols/dim), each weight's squared error weighted by w (rows, cols)."""
        rows, cols = x.shape
        A, neg = self._fold(x, w)
        idx, dneg, _ = self._project(A, w, s)
        return self.join(idx, neg, dneg, rows, cols)

    # --- stored scales ------------------------------------------------------------------------
    def _lmax(self) -> int:
        return (1 << self.scale_bits) - 1

    def _mult(self, l: torch.Tensor) -> torch.Tensor:
        return (l.float() + self.scale_offset) * self.scale_mult

    def store_params(self, p):
        s = p["scale"].float()
        rows, n_sub = s.shape
        if n_sub % self.per_super:
            raise SchemeError(f"{self.name} stores {QK_K}-weight super-blocks, got {n_sub * self.fixed_group_size} "
                              f"columns; the row length must be a multiple of {QK_K}: choose gguf_iq4_nl for this tensor")
        sb = s.reshape(rows, -1, self.per_super)
        d = (sb.amax(-1).clamp_min(0) / float(self._mult(torch.tensor(self._lmax())))).to(torch.float16)
        l = torch.round(_safe_div(sb, d.float().unsqueeze(-1)) / self.scale_mult - self.scale_offset)
        return {"d": d, "scales": self.pack_scales(l.clamp(0, self._lmax()).reshape(rows, n_sub))}

    def pack_scales(self, l: torch.Tensor) -> torch.Tensor:
        """(rows, n_sub) integers -> (rows, n_sub * scale_bits / 8) bytes, a little-endian bit
        stream (a super-block's scales end on a byte boundary)."""
        from lowbit.formats.packing import pack

        return pack(l.to(torch.uint8), self.scale_bits).reshape(l.shape[0], -1)

    def unpack_scales(self, packed: torch.Tensor) -> torch.Tensor:
        from lowbit.formats.packing import unpack

        rows = packed.shape[0]
        n = packed.shape[1] * 8 // self.scale_bits
        return unpack(packed.reshape(-1), self.scale_bits, rows * n).reshape(rows, n)

    def load_params(self, stored):
        d = stored["d"].float().repeat_interleave(self.per_super, dim=1)
        return {"scale": d * self._mult(self.unpack_scales(stored["scales"]))}

    # --- storage of codes: only the bits llama.cpp keeps -------------------------------------
    def _field_bits(self, n_codes: int) -> list[tuple[int, int]]:
        """(count, bits) of each stored field for n_codes weights."""
        vecs = n_codes // self.vector_dim
        fields = [(vecs, 8)]
        if self.index_bits > 8:
            fields.append((vecs, self.index_bits - 8))
        if self.signs != "none":
            fields.append((n_codes // 8, 7 if self.signs == "parity" else 8))
        if self.delta:
            fields.append((n_codes // self.fixed_group_size if self.delta_per_sub else vecs, 1))
        return fields

    def packed_nbytes(self, n_codes: int) -> int:
        if n_codes % QK_K:
            raise SchemeError(f"{self.name} packs whole blocks of {QK_K} codes, got {n_codes}")
        return sum((n * b + 7) // 8 for n, b in self._field_bits(n_codes))

    def _vector_fields(self, codes: torch.Tensor) -> list[torch.Tensor]:
        idx, neg, dneg = self.split(codes.reshape(-1, QK_K))
        out = [idx & 0xFF]
        if self.index_bits > 8:
            out.append(idx >> 8)
        if neg is not None:
            byte = (neg.reshape(-1, 8).long() << torch.arange(8)).sum(-1)
            out.append(byte & 0x7F if self.signs == "parity" else byte)
        if dneg is not None:
            per = self.fixed_group_size // self.vector_dim
            out.append(dneg.reshape(-1, per)[:, 0] if self.delta_per_sub else dneg)
        return out

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        from lowbit.formats.packing import pack

        fields = self._vector_fields(codes)
        return torch.cat([pack(f.reshape(-1), b) for f, (_, b) in zip(fields, self._field_bits(codes.numel()))])

    def unpack_codes(self, packed: torch.Tensor, n_codes: int) -> torch.Tensor:
        from lowbit.formats.packing import unpack

        flat, vals, off = packed.reshape(-1), [], 0
        for n, b in self._field_bits(n_codes):
            nb = (n * b + 7) // 8
            vals.append(unpack(flat[off: off + nb], b, n).long())
            off += nb
        idx = vals.pop(0)
        if self.index_bits > 8:
            idx = idx | (vals.pop(0) << 8)
        rows = n_codes // QK_K
        neg = dneg = None
        if self.signs != "none":
            byte = vals.pop(0)
            if self.signs == "parity":
                byte = complete_parity(byte)
            neg = ((byte.unsqueeze(-1) >> torch.arange(8)) & 1).bool().reshape(rows, QK_K)
        if self.delta:
            dneg = vals.pop(0).bool()
            if self.delta_per_sub:
                dneg = dneg.repeat_interleave(self.fixed_group_size // self.vector_dim)
            dneg = dneg.reshape(rows, -1)
        return self.join(idx.reshape(rows, -1), neg, dneg, rows, QK_K).reshape(-1)


def complete_parity(s7: torch.Tensor) -> torch.Tensor:
    """7 stored sign bits -> the 8-bit sign byte with an even number of ones (llama.cpp's ksigns)."""
    ones = sum((s7 >> k) & 1 for k in range(7))
    return s7 | ((ones & 1) << 7)


@dataclasses.dataclass(frozen=True)
class IQ2_XXS(_IQGrid):
    """2.06 bits: 256-point grid of 8-vectors, 7 sign bits per 8, a 4-bit scale per 32."""

    name = "gguf_iq2_xxs"
    grid_class = "IQ2_XXS"
    fixed_group_size: ClassVar[int | None] = 32


@dataclasses.dataclass(frozen=True)
class IQ2_XS(_IQGrid):
    """2.31 bits: 512-point grid of 8-vectors, 7 sign bits per 8, a 4-bit scale per 16."""

    name = "gguf_iq2_xs"
    grid_class = "IQ2_XS"
    index_bits = 9
    fixed_group_size: ClassVar[int | None] = 16


@dataclasses.dataclass(frozen=True)
class IQ2_S(_IQGrid):
    """2.5 bits: 1024-point grid of 8-vectors, a sign bit per weight, a 4-bit scale per 16."""

    name = "gguf_iq2_s"
    grid_class = "IQ2_S"
    index_bits = 10
    signs = "explicit"
    fixed_group_size: ClassVar[int | None] = 16


@dataclasses.dataclass(frozen=True)
class IQ3_XXS(_IQGrid):
    """3.06 bits: 256-point grid of 4-vectors, 7 sign bits per 8, a 4-bit scale per 32."""

    name = "gguf_iq3_xxs"
    grid_class = "IQ3_XXS"
    vector_dim = 4
    scale_mult = 0.5
    fixed_group_size: ClassVar[int | None] = 32


@dataclasses.dataclass(frozen=True)
class IQ3_S(_IQGrid):
    """3.44 bits: 512-point grid of 4-vectors, a sign bit per weight, a 4-bit scale (odd
    multiples of d) per 32."""

    name = "gguf_iq3_s"
    grid_class = "IQ3_S"
    vector_dim = 4
    index_bits = 9
    signs = "explicit"
    scale_mult = 2.0
    fixed_group_size: ClassVar[int | None] = 32


@dataclasses.dataclass(frozen=True)
class IQ1_S(_IQGrid):
    """1.56 bits: 2048-point ternary grid of 8-vectors shifted by ±1/8 per sub-block of 32, a
    3-bit scale (odd multiples of d) per 32."""

    name = "gguf_iq1_s"
    grid_class = "IQ1_S"
    index_bits = 11
    signs = "none"
    delta = 0.125
    delta_per_sub = True
    scale_bits = 3
    scale_mult = 2.0
    fixed_group_size: ClassVar[int | None] = 32


@dataclasses.dataclass(frozen=True)
class IQ1_M(IQ1_S):
    """1.75 bits: IQ1_S's grid, the ±1/8 shift per 8-vector, a 3-bit scale per 16."""

    name = "gguf_iq1_m"
    delta_per_sub = False
    fixed_group_size: ClassVar[int | None] = 16


IQ_GRID_FORMATS = ("gguf_iq2_xxs", "gguf_iq2_xs", "gguf_iq2_s", "gguf_iq3_xxs", "gguf_iq3_s", "gguf_iq1_s", "gguf_iq1_m")


# --- llama.cpp's block bytes ------------------------------------------------------------------
def _le(v: np.ndarray, nbytes: int) -> np.ndarray:
    """(B, k) unsigned ints -> (B, k * nbytes) little-endian bytes."""
    v = v.astype(np.uint64)
    return np.stack([(v >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(nbytes)], -1).reshape(v.shape[0], -1).astype(np.uint8)


def _from_le(b: np.ndarray, nbytes: int) -> np.ndarray:
    b = np.ascontiguousarray(b).astype(np.uint64).reshape(b.shape[0], -1, nbytes)
    return sum(b[..., i] << np.uint64(8 * i) for i in range(nbytes))


def _nibbles(v: np.ndarray) -> np.ndarray:
    return (v[:, 0::2] & 0xF) | ((v[:, 1::2] & 0xF) << 4)


def _from_nibbles(b: np.ndarray) -> np.ndarray:
    return np.stack([b & 0xF, b >> 4], -1).reshape(b.shape[0], -1)


def encode_iq_blocks(name: str, q: np.ndarray, p: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Byte fields, in llama.cpp's order, of blocks: q (B, 256) lowbit codes, p the stored params."""
    from lowbit.formats.base import make_format

    fmt = make_format(name)
    idx, neg, dneg = (None if t is None else t.numpy().astype(np.int64)
                      for t in fmt.split(torch.from_numpy(q.astype(np.uint8))))
    B = q.shape[0]
    d16 = np.ascontiguousarray(p["d"].astype(np.float16).reshape(B, 1)).view(np.uint16).astype(np.int64)
    sc = fmt.unpack_scales(torch.from_numpy(np.ascontiguousarray(p["scales"]).reshape(B, -1))).numpy().astype(np.int64)
    signs = None if neg is None else (neg.reshape(B, -1, 8) << np.arange(8)).sum(-1)
    if name in ("gguf_iq2_xxs", "gguf_iq3_xxs"):
        s7 = (signs & 0x7F).reshape(B, 8, 4)
        aux = (s7 << (7 * np.arange(4))).sum(-1) | (sc << 28)
        if name == "gguf_iq2_xxs":
            words = np.stack([(idx.reshape(B, 8, 4) << (8 * np.arange(4))).sum(-1), aux], -1).reshape(B, 16)
            return [_le(d16, 2), _le(words, 4)]
        return [_le(d16, 2), idx.astype(np.uint8), _le(aux, 4)]
    if name == "gguf_iq2_xs":
        return [_le(d16, 2), _le(idx | ((signs & 0x7F) << 9), 2), _nibbles(sc).astype(np.uint8)]
    if name == "gguf_iq2_s":
        qh = ((idx >> 8).reshape(B, 8, 4) << (2 * np.arange(4))).sum(-1)
        return [_le(d16, 2), (idx & 0xFF).astype(np.uint8), signs.astype(np.uint8), qh.astype(np.uint8),
                _nibbles(sc).astype(np.uint8)]
    if name == "gguf_iq3_s":
        qh = ((idx >> 8).reshape(B, 8, 8) << np.arange(8)).sum(-1)
        return [_le(d16, 2), (idx & 0xFF).astype(np.uint8), qh.astype(np.uint8), signs.astype(np.uint8),
                _nibbles(sc).astype(np.uint8)]
    if name == "gguf_iq1_s":
        qh = ((idx >> 8).reshape(B, 8, 4) << (3 * np.arange(4))).sum(-1) | (sc << 12) | (dneg[:, ::4] << 15)
        return [_le(d16, 2), (idx & 0xFF).astype(np.uint8), _le(qh, 2)]
    if name == "gguf_iq1_m":
        nib = ((idx >> 8) & 7) | (dneg << 3)
        dparts = (d16 >> (4 * np.arange(4))) & 0xF                      # d's nibbles, low first
        words = (sc.reshape(B, 4, 4) << (3 * np.arange(4))).sum(-1) | (dparts << 12)
        return [(idx & 0xFF).astype(np.uint8), _nibbles(nib).astype(np.uint8), _le(words, 2)]
    raise SchemeError(f"{name!r} is not an i-quant grid type")


def decode_iq_blocks(name: str, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Inverse of encode_iq_blocks: lowbit codes (B, 256) and stored params."""
    from lowbit.formats.base import make_format

    fmt = make_format(name)
    B = blocks.shape[0]

    def split(*sizes):
        return np.split(blocks, np.cumsum(sizes)[:-1], axis=1)

    def d_of(b):
        return np.ascontiguousarray(b).view(np.float16).reshape(B, 1)

    dneg = None
    if name in ("gguf_iq2_xxs", "gguf_iq3_xxs"):
        if name == "gguf_iq2_xxs":
            d, rest = split(2, 64)
            words = _from_le(rest, 4).reshape(B, 8, 2)
            idx = ((words[..., :1] >> (8 * np.arange(4, dtype=np.uint64))) & 0xFF).reshape(B, 32)
            aux = words[..., 1]
        else:
            d, qs, rest = split(2, 64, 32)
            idx, aux = qs.astype(np.int64), _from_le(rest, 4)
        s7 = ((aux[..., None] >> (7 * np.arange(4, dtype=np.uint64))) & 0x7F).reshape(B, 32)
        signs = complete_parity(torch.from_numpy(s7.astype(np.int64))).numpy()
        sc = (aux >> np.uint64(28)).astype(np.uint8)
    elif name == "gguf_iq2_xs":
        d, qs, scb = split(2, 64, 8)
        w = _from_le(qs, 2).astype(np.int64)
        idx, signs, sc = w & 511, complete_parity(torch.from_numpy(w >> 9)).numpy(), _from_nibbles(scb)
    elif name == "gguf_iq2_s":
        d, qs, sg, qh, scb = split(2, 32, 32, 8, 8)
        hi = (qh.astype(np.int64)[..., None] >> (2 * np.arange(4))) & 3
        idx, signs, sc = qs.astype(np.int64) | (hi.reshape(B, 32) << 8), sg.astype(np.int64), _from_nibbles(scb)
    elif name == "gguf_iq3_s":
        d, qs, qh, sg, scb = split(2, 64, 8, 32, 4)
        hi = (qh.astype(np.int64)[..., None] >> np.arange(8)) & 1
        idx, signs, sc = qs.astype(np.int64) | (hi.reshape(B, 64) << 8), sg.astype(np.int64), _from_nibbles(scb)
    elif name == "gguf_iq1_s":
        d, qs, qhb = split(2, 32, 16)
        qh = _from_le(qhb, 2).astype(np.int64)
        hi = (qh[..., None] >> (3 * np.arange(4))) & 7
        idx, signs = qs.astype(np.int64) | (hi.reshape(B, 32) << 8), None
        sc, dneg = (qh >> 12) & 7, np.repeat((qh >> 15) & 1, 4, axis=1)
    elif name == "gguf_iq1_m":
        qs, qhb, scb = split(32, 16, 8)
        nib = _from_nibbles(qhb).astype(np.int64)
        words = _from_le(scb, 2).astype(np.int64)
        dbits = (((words >> 12) & 0xF) << (4 * np.arange(4))).sum(-1).astype(np.uint16)
        d = dbits.reshape(B, 1).view(np.uint8)
        idx, signs, dneg = qs.astype(np.int64) | ((nib & 7) << 8), None, nib >> 3
        sc = ((words[..., None] >> (3 * np.arange(4))) & 7).reshape(B, 16)
    else:
        raise SchemeError(f"{name!r} is not an i-quant grid type")
    neg = None if signs is None else torch.from_numpy(((np.asarray(signs, dtype=np.int64)[..., None] >> np.arange(8)) & 1).reshape(B, QK_K).astype(bool))
    codes = fmt.join(torch.from_numpy(np.asarray(idx, dtype=np.int64).reshape(B, -1)), neg,
                     None if dneg is None else torch.from_numpy(np.asarray(dneg).astype(bool).reshape(B, -1)), B, QK_K)
    return codes.numpy(), {"d": d_of(d) if name != "gguf_iq1_m" else d.view(np.float16).reshape(B, 1),
                           "scales": fmt.pack_scales(torch.from_numpy(np.asarray(sc).astype(np.uint8).reshape(B, -1))).numpy()}
