"""Diagonal Fisher information of the weights: how much the output distribution moves per unit
of weight error, in KL-divergence units, for every weight at once.

For a perturbation δ of the weights, KL(p_θ || p_θ+δ) ≈ ½ δᵀ F δ with F the Fisher information
of the model's *own* predictive distribution. We keep its diagonal:

    F_i = E_windows[ (∂/∂θ_i Σ_t log p(y_t | x_<t)) ² ],   y_t sampled from p_θ( · | x_<t)

With labels sampled from the model, the score of each position has zero mean given its context,
so the cross terms between positions vanish in expectation and one backward pass per window
gives the sum over its positions. Divided by the tokens per window, ½ Σ_i F_i δ_i² estimates the
mean per-token KL divergence that lowbit's evaluation reports. Cross-weight terms are ignored,
the usual diagonal approximation; it ranks tensors and types (what bit allocation needs), it
does not replace measuring.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lowbit.model.targets import WeightTarget


def diagonal_fisher(model: torch.nn.Module, windows: torch.Tensor, targets: list[WeightTarget], seed: int = 0,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """F per target parameter name (same shape as the parameter, float32), per token.

    One forward and backward per window; only the targets get gradients. Deterministic for a
    seed (labels are drawn from a seeded generator)."""
    params = {t.name: t.parameter(model) for t in targets}
    wanted = {id(p) for p in params.values()}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        with torch.enable_grad():
            for w in tqdm(windows, desc="fisher", disable=not progress, unit="window"):
                model.zero_grad(set_to_none=True)
                logits = model(w[None], use_cache=False).logits[0, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                logp.gather(-1, y).sum().backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name].addcmul_(p.grad, p.grad)
        n_tokens = windows.shape[0] * max(1, windows.shape[1] - 1)
        for f in fisher.values():
            f.div_(n_tokens)
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)
    return fisher


def predicted_kld(fisher: torch.Tensor, error: torch.Tensor) -> float:
    """½ Σ F δ²: the diagonal-Fisher estimate of the mean per-token KL caused by weight error δ."""
    return 0.5 * float((fisher * error.float().square()).sum())
