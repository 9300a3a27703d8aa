"""QuIP#-style 2-bit quantization (Tseng et al. 2024) into the e8p format (formats/e8p.py), per
layer against its calibration Hessian H = XᵀX:

1. incoherence: W̃ = Uᵀ W V and H̃ = Vᵀ H V with seeded random-sign Hadamard rotations U, V
   (outliers spread over whole rows and columns, so an 8-dimensional lattice fits every block);
2. a scale per row of W̃: its RMS / 1.03 (the scale at which E8P's codewords best fit a unit
   Gaussian, measured by QuIP# and by `tests/test_e8p.py`), stored in fp16;
3. BlockLDLQ: the 8-column blocks of W̃ are rounded in order to their nearest E8P codewords,
   each block's error fed forward to the blocks not yet rounded through the upper Cholesky
   factor U_H of H̃⁻¹ (GPTQ's update, a block at a time): W̃[:, rest] -= E · U_H[J,J]⁻¹ · U_H[J, rest].

The rotation seeds are derived from `seed` and the tensor's name, so runs are reproducible and
tensors get different rotations. Not done here: QuIP#'s fine-tuning of the rotated model.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from lowbit.calib.runner import StatsRequest
from lowbit.errors import SchemeError
from lowbit.formats.e8p import (DIM, E8P, OPT_SCALE, check_row, decode_words, incoherent, nearest_words, rotation_matrix,
                                seed_params)


@dataclasses.dataclass(frozen=True)
class Options:
    damp: float = 0.01        # fraction of the mean Hessian diagonal added to it
    seed: int = 0             # mixed with each tensor's name into its rotation seeds


STATS = StatsRequest(hessian=True, staged=True, channel_stats=False)
SOLVES_EACH_WEIGHT = True


def seeds_for(name: str, seed: int) -> tuple[int, int]:
    """Two rotation seeds below 2^23 (exact in the float32 a reader may cast them to)."""
    k = (zlib.crc32(name.encode()) + 7919 * seed) % (1 << 22)
    return 2 * k, 2 * k + 1


def block_ldlq(Wt: torch.Tensor, Ht: torch.Tensor, scale: torch.Tensor, damp: float) -> torch.Tensor:
    """(N,) 16-bit words of Wt (rows, cols) / scale, row-major by 8-vector, rounded block by block
    with the error fed forward through H̃ (float64 throughout: the matrices are small)."""
    from lowbit.methods.gptq import prepare_hessian_inverse

    rows, cols = Wt.shape
    W = Wt.double().clone()
    U = prepare_hessian_inverse(Ht.float(), damp).double()       # upper: H̃⁻¹ = Uᵀ U
    s = scale.double()
    words = torch.empty(rows, cols // DIM, dtype=torch.long)
    for b in range(0, cols, DIM):
        J = slice(b, b + DIM)
        w = nearest_words((W[:, J] / s).float())
        words[:, b // DIM] = w
        E = W[:, J] - decode_words(w).double() * s
        if b + DIM < cols:
            err = torch.linalg.solve_triangular(U[J, J], E, upper=True, left=False)
            W[:, b + DIM:] -= err @ U[J, b + DIM:]
    return words.reshape(-1)


def quantize_matrix(W: torch.Tensor, H: torch.Tensor, name: str, options: Options):
    """(per-weight codes, stored params) of W (rows, cols) under H (cols, cols)."""
    rows, cols = W.shape
    check_row(cols, name)
    seeds = seeds_for(name, options.seed)
    Wt = incoherent(W, seeds)
    V = rotation_matrix(cols, seeds[1])
    Ht = V.T @ H.double() @ V
    scale = (Wt.pow(2).mean(1, keepdim=True).sqrt() / OPT_SCALE).clamp_min(1e-8).half().float()
    words = block_ldlq(Wt, Ht, scale, options.damp)
    fmt = E8P()
    params = fmt.store_params({"scale": scale, **seed_params(seeds)})
    return fmt.spread(words, rows, cols), params


def quantize_layer(model, layer_targets, stats, scheme, options: Options):
    from lowbit.methods import weight_and_hessian
    from lowbit.scheme import scheme_of
    from lowbit.tensor import QuantizedTensor, resolve_group_size

    out = {}
    for t in layer_targets:
        ws = scheme_of(scheme, t.name)
        fmt = ws.make_format()
        if not isinstance(fmt, E8P):
            raise SchemeError(f"--method quip stores e8p (2 bits per weight); {t.name} is planned as {ws.format}: "
                              "pass --format e8p or drop --format")
        w, W, H = weight_and_hessian(model, t, stats, "QuIP#", "Hessian")
        codes, params = quantize_matrix(W, H, t.name, options)
        g = resolve_group_size(ws.effective_group_size(), W.shape[1])
        out[t.name] = QuantizedTensor(codes, params, fmt, g, tuple(w.shape), t.transposed)
    return out, []
