"""Hadamard matrices of the sizes models have, and the seeded orthogonal rotations built on them.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I. Powers of two come from
Sylvester's doubling; Paley's constructions give orders q + 1 (q prime, q ≡ 3 mod 4) and
2(q + 1) (q prime, q ≡ 1 mod 4); Kronecker products multiply orders. That covers the widths of
real models that are not powers of two: 576 = 16 · 36 (Paley II, q = 17), 1536 = 128 · 12
(Paley I, q = 11), 4864 = 64 · 76 (Paley II, q = 37). An order such as 100 = 4 · 25 (25 is
a prime power, not a prime) takes the fallback below.

Where no Hadamard of order n is constructible here, the rotation is the Hadamard of the largest
power-of-two factor ⊗ a seeded random orthogonal matrix of the remaining order (QuaRot's answer
for such sizes): still orthogonal, and still spreading an outlier over the whole row.
"""

from __future__ import annotations

import functools

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    f = 2
    while f * f <= q:
        if q % f == 0:
            return False
        f += 1
    return True


def _legendre(a: int, q: int) -> int:
    """χ(a) for prime q: 0 if q | a, 1 if a is a square mod q, else -1."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    idx = torch.arange(q)
    table = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.int64)
    return table[(idx[None, :] - idx[:, None]) % q]


def _paley(n: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order n (int64), or None when n is not a Paley order."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:   # Paley I: H = I + [[0, 1ᵀ], [-1, Q]]
        S = torch.zeros(n, n, dtype=torch.int64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = _jacobsthal(q)
        return torch.eye(n, dtype=torch.int64) + S
    if n % 2 == 0:
        q = n // 2 - 1
        if _is_prime(q) and q % 4 == 1:   # Paley II: C = [[0, 1ᵀ], [1, Q]], 0 -> A, ±1 -> ±B
            C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
            C[0, 1:] = 1
            C[1:, 0] = 1
            C[1:, 1:] = _jacobsthal(q)
            A = torch.tensor([[1, -1], [-1, -1]])
            B = torch.tensor([[1, 1], [1, -1]])
            return torch.kron(C, B) + torch.kron((C == 0).long(), A)
    return None


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _split(n: int) -> tuple[int, int]:
    """n = 2^k · m with m odd."""
    p = 1
    while n % (2 * p) == 0:
        p *= 2
    return p, n // p


@functools.lru_cache(maxsize=32)
def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (int64), or None if none is constructible here:
    2^k ⊗ (a Paley matrix of order m), trying every split of n's power of two."""
    if n < 1:
        raise ValueError(f"order {n} < 1")
    p2, _ = _split(n)
    k = p2
    while k >= 1:
        m = n // k
        base = torch.ones(1, 1, dtype=torch.int64) if m == 1 else _paley(m)
        if base is not None:
            return torch.kron(_sylvester(k), base)
        k //= 2
    return None


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix (float64): QR of a Gaussian, signs fixed by R's diagonal."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))[None, :]).contiguous()


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).double()


def rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(Q, how it was built): an n x n orthogonal float64 matrix, diag(random ±1) · H / √n where a
    Hadamard of order n exists, else that for n's power-of-two factor ⊗ a random orthogonal."""
    H = hadamard(n)
    if H is not None:
        return random_signs(n, seed)[:, None] * H.double() / n ** 0.5, f"randomized Hadamard {n}"
    p2, m = _split(n)
    Hp = random_signs(p2, seed)[:, None] * _sylvester(p2).double() / p2 ** 0.5
    return torch.kron(Hp, random_orthogonal(m, seed + 1)), f"randomized Hadamard {p2} ⊗ random orthogonal {m}"
