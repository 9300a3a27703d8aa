"""AQLM-style additive quantization (Egiazarian et al. 2024) into the aqlm_MxB formats
(formats/codebook.py), per layer against its calibration Hessian H = XᵀX:

1. initialise: row scales (RMS), then residual k-means of the normalised 8-vectors with each
   column weighted by H's diagonal (its input energy);
2. alternate `rounds` times: codes by coordinate descent over the codebooks under H's diagonal
   (AQLM's beam search, width one, without the off-diagonal terms), then codebooks and row
   scales by `steps` Adam steps on the layer's output error tr((W - Ŵ) H (W - Ŵ)ᵀ) (AQLM's
   codebook update; its end-to-end fine-tuning of the whole model is not done here).

`--opt codebooks=M --opt codebook_bits=B` choose the format (2x8 and 1x16: 2 bits per weight)."""

from __future__ import annotations

import dataclasses

import torch

from lowbit.calib.runner import StatsRequest
from lowbit.errors import SchemeError
from lowbit.formats.codebook import DIM, _Additive, check_row, encode_vectors, residual_kmeans


@dataclasses.dataclass(frozen=True)
class Options:
    codebooks: int = 2
    codebook_bits: int = 8
    rounds: int = 2           # code / codebook alternations
    steps: int = 30           # Adam steps per codebook update
    lr: float = 1e-3
    damp: float = 0.01        # fraction of the mean Hessian diagonal added to it

    def __post_init__(self):
        if self.format_name() not in ("aqlm_2x8", "aqlm_1x16"):
            raise SchemeError(f"codebooks={self.codebooks}, codebook_bits={self.codebook_bits}: lowbit has the 2x8 "
                              "and 1x16 settings (2 bits per weight); pass --opt codebooks=2 --opt codebook_bits=8 "
                              "or codebooks=1 codebook_bits=16")

    def format_name(self) -> str:
        return f"aqlm_{self.codebooks}x{self.codebook_bits}"


STATS = StatsRequest(hessian=True, staged=True, channel_stats=False)


def _decode(codes: torch.Tensor, C: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return sum(C[m][codes[:, m]] for m in range(C.shape[0])).reshape(rows, cols) * scale


def quantize_matrix(W: torch.Tensor, H: torch.Tensor, fmt: _Additive, options: Options):
    """(per-weight codes, stored params) of W (rows, cols) under H (cols, cols)."""
    rows, cols = W.shape
    H = H.float().clone()
    H.diagonal().add_(options.damp * H.diagonal().mean().clamp_min(1e-12))
    diag = H.diagonal().clamp_min(1e-12)
    weight = (diag / diag.mean()).reshape(1, cols // DIM, DIM).expand(rows, -1, -1).reshape(-1, DIM)
    scale = W.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-8)
    X = (W / scale).reshape(-1, DIM)
    C = residual_kmeans(X, fmt.codebooks, fmt.entries, weight)
    codes = encode_vectors(X, C, weight)
    norm = max(float(torch.einsum("ij,jk,ik->", W, H, W)), 1e-12)   # the loss relative to the weights' own
    for _ in range(options.rounds):
        C = C.clone().requires_grad_(True)
        log_s = scale.log().clone().requires_grad_(True)
        opt = torch.optim.Adam([C, log_s], lr=options.lr)
        with torch.enable_grad():   # the calibration runner holds no_grad
            for _ in range(options.steps):
                E = W - _decode(codes, C, log_s.exp(), rows, cols)
                loss = (E @ H * E).sum() / norm
                opt.zero_grad()
                loss.backward()
                opt.step()
        C, scale = C.detach(), log_s.detach().exp()
        # what storage keeps: codes are chosen for the fp16 values decode will use
        C, scale = C.half().float(), scale.half().float()
        codes = encode_vectors((W / scale).reshape(-1, DIM), C, weight, codes=codes)
    return fmt.spread(codes, rows, cols), fmt.store_params({"scale": scale, "codebooks": C})


def quantize_layer(model, layer_targets, stats, scheme, options: Options):
    from lowbit.methods import weight_and_hessian
    from lowbit.scheme import scheme_of
    from lowbit.tensor import QuantizedTensor, resolve_group_size

    out = {}
    for t in layer_targets:
        ws = scheme_of(scheme, t.name)
        fmt = ws.make_format()
        if not isinstance(fmt, _Additive) or fmt.name != options.format_name():
            raise SchemeError(f"--method aqlm stores {options.format_name()} (from --opt codebooks/codebook_bits); "
                              f"{t.name} is planned as {ws.format}: pass --format {options.format_name()} or drop --format")
        w, W, H = weight_and_hessian(model, t, stats, "AQLM", "Hessian")
        check_row(W.shape[1], t.name)
        codes, params = quantize_matrix(W, H, fmt, options)
        g = resolve_group_size(ws.effective_group_size(), W.shape[1])
        out[t.name] = QuantizedTensor(codes, params, fmt, g, tuple(w.shape), t.transposed)
    return out, []
