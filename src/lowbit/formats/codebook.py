"""Additive vector codebooks (AQLM, Egiazarian et al. 2024): every 8 consecutive weights of a row
are stored as M codes of B bits, and decode to scale_row · (C_1[c_1] + ... + C_M[c_M]) with M
learned codebooks of 2^B vectors of dimension 8 shared by the tensor. M·B bits per 8 weights:
2x8 and 1x16 are 2 bits per weight, plus an fp16 scale per row and the codebooks (fp16).

Stored like any lowbit code tensor: the M·B-bit word of a vector is spread over its 8 weights,
M·B/8 bits each (weight k of the vector holds bits [k·b, (k+1)·b) of the word), so codes keep the
weight's shape and pack as b-bit codes. The codebooks are a tensor-level parameter (M, 2^B, 8).

Encoding here is the format's own: nearest sum by coordinate descent over the codebooks, codebooks
from residual k-means over the row-normalised vectors (what `rtn` gives). The `aqlm` method
(methods/aqlm.py) improves both against the layer's calibration Hessian. A row whose length is not
a multiple of 8 is refused."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from lowbit.errors import SchemeError
from lowbit.formats.base import Format, Params

DIM = 8
_CHUNK = 1 << 14      # vectors per distance block (bounded scratch: 16k x 2^B distances)


def check_row(cols: int, name: str = "the weight") -> None:
    if cols % DIM:
        raise SchemeError(f"{name} has {cols} input columns, not a multiple of {DIM}: additive codebooks encode "
                          f"vectors of {DIM} consecutive weights; exclude it or use another format")


def nearest(X: torch.Tensor, C: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the codebook row nearest to each row of X (N, d) under an optional per-row diagonal
    weighting (N, d); ties go to the lower index."""
    out = torch.empty(X.shape[0], dtype=torch.long)
    c2 = C.pow(2)
    for i in range(0, X.shape[0], _CHUNK):
        x = X[i: i + _CHUNK]
        if weight is None:
            d = c2.sum(1)[None, :] - 2 * x @ C.T
        else:
            w = weight[i: i + _CHUNK]
            d = w @ c2.T - 2 * (w * x) @ C.T
        out[i: i + _CHUNK] = d.argmin(1)
    return out


def kmeans(X: torch.Tensor, k: int, iters: int = 8, seed: int = 0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """k centroids (k, d) of X (N, d): seeded initial points, Lloyd steps (weighted means when
    `weight` is given); an empty cluster keeps its centroid."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=g)
    init = X[idx[: min(k, X.shape[0])]]
    if init.shape[0] < k:    # fewer vectors than entries: the rest start as jittered copies
        extra = init[torch.randint(0, init.shape[0], (k - init.shape[0],), generator=g)]
        init = torch.cat([init, extra + 1e-3 * torch.randn(extra.shape, generator=g)])
    C = init.clone()
    w = torch.ones_like(X) if weight is None else weight
    for _ in range(iters):
        a = nearest(X, C, weight)
        num = torch.zeros_like(C).index_add_(0, a, w * X)
        den = torch.zeros_like(C).index_add_(0, a, w)
        C = torch.where(den > 0, num / den.clamp_min(1e-12), C)
    return C


def residual_kmeans(X: torch.Tensor, M: int, k: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(M, k, d) codebooks, each the k-means of what the ones before it left of X (seeded by its index)."""
    C, residual = [], X
    for m in range(M):
        Cm = kmeans(residual, k, seed=m, weight=weight)
        C.append(Cm)
        residual = residual - Cm[nearest(residual, Cm, weight)]
    return torch.stack(C)


def encode_vectors(X: torch.Tensor, C: torch.Tensor, weight: torch.Tensor | None = None, rounds: int = 2,
                   codes: torch.Tensor | None = None) -> torch.Tensor:
    """(N, M) codes whose codebook sum approximates each row of X: coordinate descent, each
    codebook's code chosen for the residual of the others (a beam of width one)."""
    M = C.shape[0]
    codes = torch.zeros(X.shape[0], M, dtype=torch.long) if codes is None else codes.clone()
    for _ in range(rounds):
        for m in range(M):
            others = sum((C[j][codes[:, j]] for j in range(M) if j != m), torch.zeros_like(X))
            codes[:, m] = nearest(X - others, C[m], weight)
    return codes


def decode_vectors(codes: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return sum(C[m][codes[:, m]] for m in range(C.shape[0]))


@dataclasses.dataclass(frozen=True)
class _Additive(Format):
    range_kind: ClassVar[str] = "absmax"
    fixed_group_size: ClassVar[int | None] = -1     # one scale per row
    codebooks: ClassVar[int] = 2
    codebook_bits: ClassVar[int] = 8

    @property
    def code_bits(self) -> int:
        return self.codebooks * self.codebook_bits // DIM

    @property
    def entries(self) -> int:
        return 1 << self.codebook_bits

    @property
    def rows_independent(self) -> bool:
        return False   # the codebooks are learnt from every row

    # --- words <-> per-weight codes ----------------------------------------------------------
    def spread(self, vec_codes: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(rows·cols/8, M) codebook codes -> (rows, cols) per-weight codes."""
        word = torch.zeros(vec_codes.shape[0], dtype=torch.long)
        for m in range(self.codebooks):
            word |= vec_codes[:, m] << (m * self.codebook_bits)
        b = self.code_bits
        parts = [(word >> (k * b)) & ((1 << b) - 1) for k in range(DIM)]
        return torch.stack(parts, 1).reshape(rows, cols).to(torch.uint8)

    def gather(self, codes: torch.Tensor) -> torch.Tensor:
        """(rows, cols) per-weight codes -> (rows·cols/8, M) codebook codes."""
        b = self.code_bits
        v = codes.reshape(-1, DIM).long()
        word = sum(v[:, k] << (k * b) for k in range(DIM))
        return torch.stack([(word >> (m * self.codebook_bits)) & (self.entries - 1) for m in range(self.codebooks)], 1)

    # --- the format interface ------------------------------------------------------------------
    def tensor_params(self, W: torch.Tensor) -> Params:
        check_row(W.shape[-1])
        X = (W / _row_scale(W)).reshape(-1, DIM)
        return {"codebooks": residual_kmeans(X, self.codebooks, self.entries)}

    def params_from_blocks(self, blocks, tensor_params, importance=None) -> Params:
        return {"scale": blocks.pow(2).mean(-1).sqrt().clamp_min(1e-8)}

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        raise SchemeError(f"{self.name} fits its scales from the rows themselves; observers do not apply")

    def encode(self, W: torch.Tensor, p: Params) -> torch.Tensor:
        rows, cols = W.shape
        check_row(cols)
        X = (W / p["scale"]).reshape(-1, DIM)
        return self.spread(encode_vectors(X, p["codebooks"]), rows, cols)

    def decode(self, codes: torch.Tensor, p: Params) -> torch.Tensor:
        rows, cols = codes.shape
        return decode_vectors(self.gather(codes), p["codebooks"]).reshape(rows, cols) * p["scale"]

    def store_params(self, p: Params) -> Params:
        return {"scale": p["scale"].to(torch.float16), "codebooks": p["codebooks"].to(torch.float16)}


def _row_scale(W: torch.Tensor) -> torch.Tensor:
    """The fp16-exact RMS of each row (what params_from_blocks stores), (rows, 1)."""
    return W.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8).half().float()


@dataclasses.dataclass(frozen=True)
class AQLM_2x8(_Additive):
    name = "aqlm_2x8"
    codebooks = 2
    codebook_bits = 8


@dataclasses.dataclass(frozen=True)
class AQLM_1x16(_Additive):
    name = "aqlm_1x16"
    codebooks = 1
    codebook_bits = 16
