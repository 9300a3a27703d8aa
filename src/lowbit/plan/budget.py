"""A scheme per tensor under a size budget, by measured sensitivity (every exporter).

llama.cpp's named mixes fix the type of each tensor by its role (attn_v and ffn_down get more
bits, ...). Given a size (a file size, or bits per weight) instead, lowbit chooses: for every
weight and every candidate scheme its container can hold (GGUF types whose blocks fit the rows,
integer group sizes compressed-tensors accepts, ...), it measures the round-to-nearest error δ and prices it with the diagonal
Fisher information of that weight (``lowbit.calib.fisher``): ½ Σ F δ², an estimate of the KL
divergence the error alone adds. Then it picks one type per tensor minimising the summed
estimate subject to the bytes (a multiple-choice knapsack: Lagrangian relaxation, then a greedy
fill of what the relaxation leaves unused). Embeddings and the output head are priced like any
other weight: their Fisher says how much they matter.

The estimate ignores interactions between weights and the later GPTQ error compensation; it is a
ranking, and every report compares it with the KL divergence measured afterwards.
"""

from __future__ import annotations

import dataclasses

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import SchemeError
from lowbit.scheme import WeightScheme

# types lowbit writes, cheapest first; F16 is not offered (a budget this loose needs no search)
BUDGET_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")


def tensor_bytes(type_name: str, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) weight in a GGML type (cols must be a multiple of its block)."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return rows * (cols // block) * nbytes


@dataclasses.dataclass(frozen=True)
class Choice:
    label: str       # the candidate's label (a GGUF type name for GGUF budgets)
    nbytes: int
    cost: float      # estimated KL divergence added by this tensor in this scheme


def allocate(options: dict[str, list[Choice]], budget: int) -> dict[str, Choice]:
    """One choice per tensor, total bytes <= budget, minimising the summed cost.

    Lagrangian relaxation: for a price λ per byte every tensor takes argmin cost + λ·bytes; a
    bisection finds the smallest λ that fits; then upgrades with the best cost saved per extra
    byte are taken while they fit. Deterministic (ties by name and type order)."""
    names = sorted(options)
    if not names:
        return {}
    cheapest = {n: min(options[n], key=lambda c: (c.nbytes, c.cost)) for n in names}
    floor = sum(c.nbytes for c in cheapest.values())
    if floor > budget:
        raise SchemeError(f"the size budget is too small: even the smallest types need {floor / 1e6:.2f} MB of tensor "
                          f"data and the budget leaves {budget / 1e6:.2f} MB; raise --max-size or allow smaller types")

    def pick(lam: float) -> dict[str, Choice]:
        return {n: min(options[n], key=lambda c: (c.cost + lam * c.nbytes, c.nbytes)) for n in names}

    def total(sel):
        return sum(c.nbytes for c in sel.values())

    lo, hi = 0.0, 1.0
    if total(pick(lo)) <= budget:
        chosen = pick(lo)
    else:
        while total(pick(hi)) > budget:
            hi *= 4.0
            if hi > 1e30:  # costs all zero at the floor: the cheapest types fit
                break
        for _ in range(100):
            mid = (lo + hi) / 2
            if total(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        chosen = pick(hi)
        if total(chosen) > budget:
            chosen = dict(cheapest)
    left = budget - total(chosen)
    while True:  # greedy fill: best cost saved per extra byte, while it fits
        best, best_rate = None, 0.0
        for n in names:
            cur = chosen[n]
            for c in options[n]:
                extra = c.nbytes - cur.nbytes
                saved = cur.cost - c.cost
                if saved > 0 and 0 < extra <= left and saved / extra > best_rate:
                    best, best_rate = (n, c), saved / extra
        if best is None:
            break
        n, c = best
        left -= c.nbytes - chosen[n].nbytes
        chosen[n] = c
    return chosen


def parse_size(text: str) -> int:
    """'91.7MB', '87.5MiB', '2GB', '123456' -> bytes (MB = 10^6, MiB = 2^20)."""
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    t = text.strip().lower().replace(" ", "")
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            t, mult = t[: -len(u)], units[u]
            break
    else:
        mult = 1
    try:
        value = float(t)
    except ValueError:
        raise SchemeError(f"cannot read the size {text!r}; write it like 91.7MB, 87MiB or 2GB") from None
    if value <= 0:
        raise SchemeError(f"the size must be positive, got {text!r}")
    return int(value * mult)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One scheme a budget may give a tensor: its label (a GGUF type name, a preset or a short
    spelling like int4_g64) and the weight scheme."""

    label: str
    scheme: WeightScheme


def price_candidates(model: torch.nn.Module, fisher: dict[str, torch.Tensor], targets: list,
                     candidates: list[Candidate], nbytes, fits, progress: bool = True) -> dict[str, list[Choice]]:
    """Choices (label, bytes, estimated KL of round-to-nearest) for every weight target.

    nbytes(candidate, rows, cols) -> stored bytes in the output container; fits(candidate, cols)
    -> whether the container can hold rows of `cols` in that candidate."""
    from tqdm.auto import tqdm

    return {t.name: price_tensor(t, t.parameter(model).data, fisher[t.name], candidates, nbytes, fits)
            for t in tqdm(targets, desc="pricing schemes", disable=not progress, unit="tensor")}


def price_tensor(t, weight: torch.Tensor, fisher: torch.Tensor, candidates: list[Candidate], nbytes, fits) -> list[Choice]:
    """One target's choices, from its weight and its diagonal Fisher (both in the parameter's layout)."""
    from lowbit.calib.fisher import predicted_kld
    from lowbit.tensor import quantize_tensor, to_matrix

    W = to_matrix(weight, t.transposed).float()
    F = to_matrix(fisher, t.transposed)
    rows, cols = W.shape
    choices = []
    for c in candidates:
        if not fits(c, cols):
            continue
        qt = quantize_tensor(W, c.scheme)
        choices.append(Choice(c.label, nbytes(c, rows, cols), predicted_kld(F, qt.dequantize_matrix() - W)))
    if not choices:
        raise SchemeError(f"{t.name}: no candidate scheme fits rows of {cols} columns; add one whose group "
                          f"divides {cols} (e.g. a block-32 type or a per-channel scheme)")
    return choices
