"""GGUF type per tensor under a file-size budget, by measured sensitivity.

llama.cpp's named mixes fix the type of each tensor by its role (attn_v and ffn_down get more
bits, ...). Given a size instead, lowbit chooses: for every weight and every GGUF type whose
blocks fit its rows, it measures the round-to-nearest error δ and prices it with the diagonal
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

# types lowbit writes, cheapest first; F16 is not offered (a budget this loose needs no search)
BUDGET_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")


def tensor_bytes(type_name: str, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) weight in a GGML type (cols must be a multiple of its block)."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return rows * (cols // block) * nbytes


@dataclasses.dataclass(frozen=True)
class Choice:
    type_name: str
    nbytes: int
    cost: float      # estimated KL divergence added by this tensor in this type


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


def budget_options(model: torch.nn.Module, fisher: dict[str, torch.Tensor], targets: list,
                   candidates: tuple[str, ...] = BUDGET_TYPES, progress: bool = True) -> dict[str, list[Choice]]:
    """Choices (type, bytes, estimated KL) for every weight target (lowbit.model.targets.WeightTarget)."""
    from tqdm.auto import tqdm

    from lowbit.calib.fisher import predicted_kld
    from lowbit.export.gguf_mixes import lowbit_format
    from lowbit.scheme import WeightScheme
    from lowbit.tensor import quantize_tensor, to_matrix

    unknown = [t for t in candidates if t not in BUDGET_TYPES]
    if unknown:
        raise SchemeError(f"unknown GGUF type(s) {', '.join(unknown)} for a size budget; choose from {', '.join(BUDGET_TYPES)}")
    options: dict[str, list[Choice]] = {}
    for t in tqdm(targets, desc="pricing types", disable=not progress, unit="tensor"):
        W = to_matrix(t.parameter(model).data, t.transposed).float()
        F = to_matrix(fisher[t.name], t.transposed)
        rows, cols = W.shape
        choices = []
        for type_name in candidates:
            block = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
            if cols % block:
                continue
            qt = quantize_tensor(W, WeightScheme(lowbit_format(type_name), None, -1))
            choices.append(Choice(type_name, tensor_bytes(type_name, rows, cols), predicted_kld(F, qt.dequantize_matrix() - W)))
        if not choices:
            raise SchemeError(f"{t.name}: no allowed GGUF type fits rows of {cols} columns; allow a block-32 type (Q4_0, Q8_0, ...)")
        options[t.name] = choices
    return options


def budget_schemes(loaded, max_size: int, windows: torch.Tensor, candidates: tuple[str, ...] = BUDGET_TYPES,
                   seed: int = 0, progress: bool = True):
    """Per-weight GGUF schemes whose file fits `max_size` bytes, chosen by Fisher-priced error.

    windows: token windows for the Fisher (a few suffice: 16 x 512 tokens here).
    Returns (schemes by HF name, plan [(HF name, GGUF name, type, reason)], report dict)."""
    import gguf

    from lowbit.calib.fisher import diagonal_fisher
    from lowbit.export.gguf import _arch, _gguf_name, _plan_tensors, _unpack, metadata_bytes
    from lowbit.export.gguf_mixes import lowbit_format
    from lowbit.model.targets import all_weights
    from lowbit.scheme import WeightScheme

    model = loaded.model
    config = model.config
    spec = _arch(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch.upper()], int(config.num_hidden_layers))
    every = _plan_tensors(_unpack(loaded), spec, {}, "F32", name_map)   # all tensors of the file, as F32
    weights = [t for t in all_weights(model) if _gguf_name(name_map, t.name) is not None]
    targets = {t.name: _gguf_name(name_map, t.name) for t in weights}
    quantized = set(targets.values())
    fixed = sum(int(v.numel()) * 4 for g, _, v in every if g not in quantized)
    overhead = metadata_bytes(loaded, {g: tuple(v.shape) for g, _, v in every})
    data_budget = max_size - overhead - fixed
    if data_budget <= 0:
        raise SchemeError(f"--max-size {max_size / 1e6:.2f} MB does not even hold the metadata and float tensors "
                          f"({(overhead + fixed) / 1e6:.2f} MB); raise it")
    fisher = diagonal_fisher(model, windows, weights, seed, progress)
    options = budget_options(model, fisher, weights, candidates, progress)
    del fisher
    chosen = allocate(options, data_budget)
    schemes, plan = {}, []
    for hf, c in chosen.items():
        schemes[hf] = WeightScheme(lowbit_format(c.type_name), None, -1)
        plan.append((hf, targets[hf], c.type_name, None))
    data = sum(c.nbytes for c in chosen.values())
    counts: dict[str, int] = {}
    for c in chosen.values():
        counts[c.type_name] = counts.get(c.type_name, 0) + 1
    report = {"max_bytes": max_size, "estimated_file_bytes": overhead + fixed + data, "tensor_data_bytes": data,
              "predicted_kld_rtn": sum(c.cost for c in chosen.values()), "fisher_windows": int(windows.shape[0]),
              "candidates": list(candidates), "type_counts": dict(sorted(counts.items())),
              "types": {targets[hf]: c.type_name for hf, c in sorted(chosen.items())}}
    return schemes, plan, report
