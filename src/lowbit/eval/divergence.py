"""Perplexity, KL divergence and top-1 agreement of a candidate against a reference model,
both run on the same token windows."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclasses.dataclass
class ReferenceRun:
    """The reference's log-probabilities on the windows, computed once and reused for every
    candidate (a comparison of several schemes runs the reference a single time)."""

    windows: torch.Tensor            # (n, ctx)
    logprobs: list[torch.Tensor]     # per window: (ctx-1, vocab) float32
    nll: float                       # mean next-token negative log-likelihood


@dataclasses.dataclass
class EvalResult:
    ppl: float
    ref_ppl: float
    kld: float        # mean KL(reference || candidate) per token, nats
    kld_p99: float    # 99th percentile of per-token KL
    top1: float       # fraction of tokens where both models' argmax agree
    n_tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def _window_logprobs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    logits = model(window.unsqueeze(0)).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def run_reference(model: torch.nn.Module, windows: torch.Tensor, progress: bool = True) -> ReferenceRun:
    """Reference log-probabilities and NLL on each window."""
    lps, nll_sum, count = [], 0.0, 0
    for w in tqdm(windows, desc="reference", disable=not progress, unit="win"):
        lp = _window_logprobs(model, w)
        nll_sum += float(-lp.gather(1, w[1:, None]).sum())
        count += w.numel() - 1
        lps.append(lp)
    return ReferenceRun(windows, lps, nll_sum / count)


@torch.no_grad()
def compare(candidate: torch.nn.Module, reference: ReferenceRun, progress: bool = True) -> EvalResult:
    """Perplexity of the candidate and its divergence from the reference on the same windows."""
    nll_sum, count, agree = 0.0, 0, 0
    klds = []
    for w, ref_lp in tqdm(list(zip(reference.windows, reference.logprobs)), desc="candidate", disable=not progress, unit="win"):
        lp = _window_logprobs(candidate, w)
        nll_sum += float(-lp.gather(1, w[1:, None]).sum())
        count += w.numel() - 1
        klds.append((ref_lp.exp() * (ref_lp - lp)).sum(dim=-1).clamp_min(0))
        agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
    kl = torch.cat(klds)
    return EvalResult(ppl=math.exp(nll_sum / count), ref_ppl=math.exp(reference.nll),
                      kld=float(kl.mean()), kld_p99=float(torch.quantile(kl.double(), 0.99)),
                      top1=agree / count, n_tokens=count)
