"""Sparsity patterns as small pure functions: parse a pattern, choose which weights to drop from
a score (lowest first), and check a matrix against a pattern.

A pattern is N:M (N of every M consecutive input columns are zero, per row: "2:4" is what
sparse tensor cores run) or a fraction (that share of every row, unstructured)."""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError


@dataclasses.dataclass(frozen=True)
class Pattern:
    n: int = 0          # N:M: zeros per group
    m: int = 0          # N:M: group length along the input dimension
    fraction: float = 0.0   # unstructured: share of each row set to zero

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def density(self) -> float:
        return 1.0 - (self.n / self.m if self.structured else self.fraction)

    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g} unstructured"


def parse_pattern(text) -> Pattern:
    """'2:4' -> N:M; '0.5' -> half of every row."""
    s = str(text).strip()
    if ":" in s:
        try:
            n, m = (int(x) for x in s.split(":"))
        except ValueError:
            raise SchemeError(f"sparsity {s!r} is not N:M (e.g. 2:4) or a fraction (e.g. 0.5)") from None
        if not 0 < n < m:
            raise SchemeError(f"sparsity {s}: N:M needs 0 < N < M (2:4 zeroes two of every four)")
        return Pattern(n, m)
    try:
        f = float(s)
    except ValueError:
        raise SchemeError(f"sparsity {s!r} is not N:M (e.g. 2:4) or a fraction (e.g. 0.5)") from None
    if not 0.0 < f < 1.0:
        raise SchemeError(f"sparsity fraction {f} must lie strictly between 0 and 1")
    return Pattern(fraction=f)


def check_shape(pattern: Pattern, cols: int, name: str) -> None:
    if pattern.structured and cols % pattern.m:
        raise SchemeError(f"{name} has {cols} input columns, not a multiple of {pattern.m}: {pattern.label()} "
                          "sparsity cannot group them; exclude it or choose another pattern")


def prune_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """True where a weight is dropped: per row, the N lowest-scoring of each M consecutive columns
    (N:M), or the lowest `fraction` of the row (ties broken by column order: deterministic)."""
    rows, cols = scores.shape
    if pattern.structured:
        g = scores.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.argsort(g, dim=-1, stable=True)[..., : pattern.n]
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    k = int(round(cols * pattern.fraction))
    idx = torch.argsort(scores, dim=-1, stable=True)[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def follows(W: torch.Tensor, pattern: Pattern) -> bool:
    """Whether the (rows, cols) matrix has at least the pattern's zeros (every N:M group, or every row)."""
    rows, cols = W.shape
    zeros = W == 0
    if pattern.structured:
        return bool((zeros.reshape(rows, cols // pattern.m, pattern.m).sum(-1) >= pattern.n).all())
    return bool((zeros.sum(-1) >= int(round(cols * pattern.fraction))).all())


def exact_zero_codes(fmt, params, rows: int) -> torch.Tensor:
    """The codes that decode to exactly 0 under per-row `params` (rows,); SchemeError for a format
    that has none (a float minimum shifts every code)."""
    z = torch.zeros(rows)
    codes = fmt.encode(z, params)
    if not torch.equal(fmt.decode(codes, params), z):
        raise SchemeError(f"{fmt.name} with these parameters cannot store an exact zero (a float minimum shifts "
                          "every code), so pruned weights would not be zero: use a symmetric or integer-zero-point "
                          "format with sparsity")
    return codes
