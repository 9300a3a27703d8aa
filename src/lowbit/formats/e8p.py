"""E8P: QuIP#'s 2-bit lattice codebook (Tseng et al. 2024, "QuIP#", section 4 and appendix),
behind a random-sign Hadamard incoherence transform, for lowbit's own format.

The codebook. D̂8 = {y ∈ (Z + 1/2)^8 : Σ y even} is the half-integer coset of E8. Its points of
squared norm ≤ 10 have 227 distinct absolute-value patterns (coordinates in {1/2, 3/2, 5/2});
QuIP# adds 29 patterns of squared norm 12 (five 3/2 and three 1/2, listed in `NORM12`) to make
256. A codeword is a pattern a, signs s with Σ s·a even (7 free signs, the 8th fixed by that
parity), and a shift of ±1/4: s·a ± 1/4 lies in E8 + 1/4. 256 · 2^7 · 2 = 2^16 codewords, so
one 16-bit word per 8 weights: 2 bits per weight. Word layout (lowbit's own): bits 0-7 the
pattern index (the 227 in lexicographic order, then `NORM12` in its order), bits 8-14 the signs
of coordinates 0-6 (1 = negative), bit 15 the shift (1 = +1/4).

Nearest codeword without enumerating 2^16: for each shift and pattern, the best signs are those
of the target; if their parity is odd, flipping the coordinate with the least a_i·|y_i| costs
the least (4·a_i·|y_i|). So 2 · 256 candidates per vector, scored with one matmul.

The weight. W (rows, cols) is stored as W̃ = Uᵀ W V with U, V seeded random-sign Hadamard
rotations (`hadamard.rotation`: diag(±1)·H/√n, so Uᵀ applies the signs first, as QuIP#'s
incoherence processing does), each row of W̃ as scale_row · (codewords of its 8-vectors).
Decoding applies W = U W̃ Vᵀ: it needs the whole matrix (U mixes rows). The words are spread
over the 8 weights of their vector, 2 bits each, so codes keep the weight's shape. Parameters:
an fp16 scale per row and the two seeds. `rtn` rounds each vector to its nearest codeword;
`--method quip` (methods/quip.py) rounds with BlockLDLQ against the layer's Hessian.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch

from lowbit.errors import SchemeError
from lowbit.formats.base import Format, Params

DIM = 8
OPT_SCALE = 1.03  # codeword units per RMS of incoherent weights: E8P's best fit to a unit Gaussian
_CHUNK = 4096     # vectors per scoring block: 4096 x 256 x 8 floats of scratch

# QuIP#'s 29 patterns of squared norm 12 (in units of 1/2: 3 = 3/2, 1 = 1/2), published data, as
# the reference implementation's later releases list them (its first release repeated
# (1,3,3,3,1,1,3,3) where (1,1,3,3,1,3,3,3) now stands, leaving 65280 distinct codewords)
NORM12 = (
    (3, 1, 1, 1, 3, 3, 3, 3), (1, 3, 1, 1, 3, 3, 3, 3), (1, 1, 3, 1, 3, 3, 3, 3), (1, 1, 1, 3, 3, 3, 3, 3),
    (3, 3, 3, 1, 3, 3, 1, 1), (3, 3, 3, 1, 3, 1, 3, 1), (3, 3, 3, 1, 1, 3, 3, 1), (3, 3, 3, 1, 3, 1, 1, 3),
    (3, 3, 3, 1, 1, 3, 1, 3), (3, 3, 3, 1, 1, 1, 3, 3), (3, 3, 1, 3, 3, 3, 1, 1), (3, 3, 1, 3, 3, 1, 3, 1),
    (3, 3, 1, 3, 1, 3, 3, 1), (3, 3, 1, 3, 3, 1, 1, 3), (3, 3, 1, 3, 1, 3, 1, 3), (3, 3, 1, 3, 1, 1, 3, 3),
    (3, 1, 3, 3, 3, 3, 1, 1), (3, 1, 3, 3, 3, 1, 3, 1), (3, 1, 3, 3, 1, 3, 3, 1), (3, 1, 3, 3, 3, 1, 1, 3),
    (3, 1, 3, 3, 1, 3, 1, 3), (1, 3, 3, 3, 1, 1, 3, 3), (1, 3, 3, 3, 3, 3, 1, 1), (1, 3, 3, 3, 3, 1, 3, 1),
    (1, 3, 3, 3, 1, 3, 3, 1), (1, 3, 3, 3, 3, 1, 1, 3), (1, 3, 3, 3, 1, 3, 1, 3), (1, 1, 3, 3, 1, 3, 3, 3),
    (3, 3, 1, 1, 3, 3, 3, 1),
)


@functools.cache
def abs_grid() -> torch.Tensor:
    """The 256 absolute-value patterns (256, 8), float32: every pattern over {1/2, 3/2, 5/2} of
    squared norm ≤ 10 in lexicographic order (227), then NORM12 (29)."""
    import itertools

    small = [p for p in itertools.product((0.5, 1.5, 2.5), repeat=DIM) if sum(v * v for v in p) <= 10]
    grid = torch.tensor(small + [tuple(v / 2 for v in p) for p in NORM12], dtype=torch.float32)
    assert grid.shape == (256, DIM)
    return grid


def decode_words(words: torch.Tensor) -> torch.Tensor:
    """(N,) 16-bit words -> (N, 8) float32 codewords."""
    w = words.long()
    a = abs_grid()[w & 255]
    bits = (w[:, None] >> (8 + torch.arange(DIM - 1))) & 1
    s = torch.ones(w.shape[0], DIM)
    s[:, : DIM - 1] = 1 - 2 * bits.float()
    odd = torch.remainder((s * a).sum(1).round(), 2) != 0   # the 8th sign makes Σ s·a even
    s[:, DIM - 1] = torch.where(odd, -1.0, 1.0)
    return s * a + torch.where((w >> 15).bool(), 0.25, -0.25)[:, None]


def nearest_words(X: torch.Tensor) -> torch.Tensor:
    """(N,) 16-bit words of the codewords nearest to each row of X (N, 8) (ties: the -1/4 shift,
    then the lower pattern)."""
    A = abs_grid()
    a2 = A.pow(2).sum(1)
    out = torch.empty(X.shape[0], dtype=torch.long)
    for i in range(0, X.shape[0], _CHUNK):
        x = X[i: i + _CHUNK].float()
        y = torch.stack([x + 0.25, x - 0.25])                       # shift bit 0 (-1/4), 1 (+1/4)
        ay, s = y.abs(), 1 - 2 * (y < 0).float()                    # (2, n, 8): the target's signs
        d = ay.pow(2).sum(-1, keepdim=True) - 2 * ay @ A.T + a2      # (2, n, 256)
        odd = torch.remainder((s @ A.T).round(), 2) != 0             # parity of Σ s·a
        flip_cost, flip_at = (ay[..., None, :] * A).min(-1)          # cheapest sign to flip
        d = d + torch.where(odd, 4 * flip_cost, torch.zeros_like(flip_cost))
        best = d.permute(1, 0, 2).reshape(x.shape[0], -1).argmin(1)  # over (shift, pattern)
        shift_bit, idx = best // 256, best % 256
        n = torch.arange(x.shape[0])
        signs = s[shift_bit, n].clone()
        flip = odd[shift_bit, n, idx]
        signs[n[flip], flip_at[shift_bit, n, idx][flip]] *= -1
        sign_bits = ((signs[:, : DIM - 1] < 0).long() << torch.arange(DIM - 1)).sum(1)
        out[i: i + _CHUNK] = idx | (sign_bits << 8) | (shift_bit << 15)
    return out


def check_row(cols: int, name: str = "the weight") -> None:
    if cols % DIM:
        raise SchemeError(f"{name} has {cols} input columns, not a multiple of {DIM}: E8P encodes vectors of "
                          f"{DIM} weights; exclude it or use another format")


@functools.lru_cache(maxsize=16)
def rotation_matrix(n: int, seed: int) -> torch.Tensor:
    """The n x n orthogonal float64 rotation a seed names (`hadamard.rotation`)."""
    from lowbit.hadamard import rotation

    return rotation(n, seed)[0]


def incoherent(W: torch.Tensor, seeds: tuple[int, int]) -> torch.Tensor:
    """W̃ = Uᵀ W V (float64) for the rotations the seeds name."""
    U, V = rotation_matrix(W.shape[0], seeds[0]), rotation_matrix(W.shape[1], seeds[1])
    return U.T @ W.double() @ V


def coherent(Wt: torch.Tensor, seeds: tuple[int, int]) -> torch.Tensor:
    """W = U W̃ Vᵀ (float64): the inverse of `incoherent`."""
    U, V = rotation_matrix(Wt.shape[0], seeds[0]), rotation_matrix(Wt.shape[1], seeds[1])
    return U @ Wt.double() @ V.T


@dataclasses.dataclass(frozen=True)
class E8P(Format):
    name: ClassVar[str] = "e8p"
    fixed_group_size: ClassVar[int | None] = -1     # one scale per row (of W̃)

    @property
    def code_bits(self) -> int:
        return 2

    @property
    def rows_independent(self) -> bool:
        return False

    @property
    def decodes_row_blocks(self) -> bool:
        return False

    # words <-> per-weight 2-bit codes: weight k of a vector holds bits [2k, 2k + 2) of its word
    @staticmethod
    def spread(words: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return torch.stack([(words >> (2 * k)) & 3 for k in range(DIM)], 1).reshape(rows, cols).to(torch.uint8)

    @staticmethod
    def gather(codes: torch.Tensor) -> torch.Tensor:
        v = codes.reshape(-1, DIM).long()
        return sum(v[:, k] << (2 * k) for k in range(DIM))

    # round-to-nearest (`rtn`): rotation seeds 0 and 1, each row of W̃ scaled to its RMS / OPT_SCALE;
    # `--method quip` chooses per-tensor seeds and rounds with BlockLDLQ instead
    def tensor_params(self, W: torch.Tensor) -> Params:
        check_row(W.shape[-1])
        seeds = (0, 1)
        rms = incoherent(W, seeds).pow(2).mean(1, keepdim=True).sqrt()
        return {"scale": (rms / OPT_SCALE).clamp_min(1e-8).float(), **seed_params(seeds)}

    def params_from_blocks(self, blocks, tensor_params, importance=None) -> Params:
        return {}

    def params_from_range(self, lo, hi, tensor_params) -> Params:
        raise SchemeError("e8p fits its scales from the rotated rows themselves; observers do not apply")

    def encode(self, W: torch.Tensor, p: Params) -> torch.Tensor:
        """Nearest codewords of the incoherent W̃ / scale (what BlockLDLQ does with H = I)."""
        rows, cols = W.shape
        check_row(cols)
        X = (incoherent(W, _seeds(p)) / p["scale"][:, :1].double()).float().reshape(-1, DIM)
        return self.spread(nearest_words(X), rows, cols)

    def decode(self, codes: torch.Tensor, p: Params) -> torch.Tensor:
        rows, cols = codes.shape
        Wt = decode_words(self.gather(codes)).reshape(rows, cols) * p["scale"][:, :1]
        return coherent(Wt, _seeds(p)).float()

    def store_params(self, p: Params) -> Params:
        return {"scale": p["scale"].to(torch.float16), "row_seed": p["row_seed"].to(torch.int64),
                "col_seed": p["col_seed"].to(torch.int64)}

    def load_params(self, stored: Params) -> Params:
        return {"scale": stored["scale"].float(), "row_seed": stored["row_seed"].to(torch.int64),
                "col_seed": stored["col_seed"].to(torch.int64)}


def seed_params(seeds: tuple[int, int]) -> Params:
    """The rotation seeds as tensor-level (0-d) parameters."""
    return {"row_seed": torch.tensor(seeds[0], dtype=torch.int64), "col_seed": torch.tensor(seeds[1], dtype=torch.int64)}


def _seeds(p: Params) -> tuple[int, int]:
    return int(p["row_seed"]), int(p["col_seed"])
