"""Perplexity, KL divergence and top-1 agreement of a candidate against a reference model,
both run on the same token windows."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class CacheProtocol:
    """How a window's logits are produced through a KV cache, so that later tokens attend to what
    the cache stores: the first `prefill` tokens in one forward, then `chunk` tokens per forward,
    then the last `tail` tokens one per forward (single-token decode steps). Every position is
    scored. A plain single forward would never read a quantized cache back."""

    spec: object          # lowbit.runtime.kv_cache.KVCacheSpec
    prefill: int
    chunk: int = 32
    tail: int = 16

    def __post_init__(self):
        from lowbit.errors import DataError

        if self.chunk < 1 or self.tail < 0 or self.prefill < 0:
            raise DataError(f"KV-cache protocol needs chunk >= 1, tail >= 0, prefill >= 0 tokens; got chunk "
                            f"{self.chunk}, tail {self.tail}, prefill {self.prefill} (see --kv-chunk)")

    @classmethod
    def for_window(cls, spec, ctx: int, chunk: int = 32, tail: int = 16) -> "CacheProtocol":
        """lowbit's default: prefill the first half of each window, decode the rest."""
        return cls(spec, prefill=ctx // 2, chunk=chunk, tail=tail)

    def bounds(self, n: int) -> list[int]:
        """Start of every forward over a window of n tokens, and n."""
        prefill = max(1, min(self.prefill, n))
        tail_start = max(prefill, n - self.tail)
        starts = [0, *range(prefill, tail_start, max(1, self.chunk)), *range(tail_start, n)]
        return [*starts, n]

    def with_spec(self, spec) -> "CacheProtocol":
        return dataclasses.replace(self, spec=spec)


@dataclasses.dataclass
class ReferenceRun:
    """The reference's log-probabilities on the windows, computed once and reused for every
    candidate (a comparison of several schemes runs the reference a single time)."""

    windows: torch.Tensor            # (n, ctx)
    logprobs: list[torch.Tensor]     # per window: (ctx-1, vocab) float32
    nll: float                       # mean next-token negative log-likelihood
    protocol: CacheProtocol | None = None   # the reference's cache protocol (None: one forward)


@dataclasses.dataclass
class EvalResult:
    ppl: float
    ref_ppl: float
    kld: float        # mean KL(reference || candidate) per token, nats
    kld_p99: float    # 99th percentile of per-token KL
    top1: float       # fraction of tokens where both models' argmax agree
    n_tokens: int
    kv_cache_bytes: int | None = None       # measured, the last window's cache at full length
    kv_cache_fp16_bytes: int | None = None  # a 16-bit cache of the same tokens

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def logits_through_cache(model: torch.nn.Module, ids: torch.Tensor, protocol: CacheProtocol):
    """(logits (batch, n, vocab) float32, the filled cache) of ids (batch, n) run as the protocol says."""
    from lowbit.runtime.kv_cache import QuantizedKVCache

    cache = QuantizedKVCache(protocol.spec, model.config)
    b = protocol.bounds(ids.shape[1])
    pieces = [model(ids[:, a:e], cache=cache, use_cache=True).logits.float() for a, e in zip(b[:-1], b[1:])]
    return torch.cat(pieces, dim=1), cache


@torch.no_grad()
def _window_logprobs(model: torch.nn.Module, window: torch.Tensor, protocol: CacheProtocol | None = None):
    """(log-probabilities (ctx-1, vocab), the cache or None)."""
    if protocol is None:
        logits, cache = model(window.unsqueeze(0)).logits.float(), None
    else:
        logits, cache = logits_through_cache(model, window.unsqueeze(0), protocol)
    return F.log_softmax(logits[0, :-1], dim=-1), cache


@torch.no_grad()
def run_reference(model: torch.nn.Module, windows: torch.Tensor, progress: bool = True,
                  protocol: CacheProtocol | None = None) -> ReferenceRun:
    """Reference log-probabilities and NLL on each window (through `protocol`'s cache if given)."""
    lps, nll_sum, count = [], 0.0, 0
    for w in tqdm(windows, desc="reference", disable=not progress, unit="win"):
        lp, _ = _window_logprobs(model, w, protocol)
        nll_sum += float(-lp.gather(1, w[1:, None]).sum())
        count += w.numel() - 1
        lps.append(lp)
    return ReferenceRun(windows, lps, nll_sum / count, protocol)


def _tally(triples, ref_nll: float | None = None) -> EvalResult:
    """EvalResult from (window, reference log-probs, candidate log-probs, candidate cache) triples;
    the reference NLL comes from the triples when not given."""
    nll_sum, ref_sum, count, agree = 0.0, 0.0, 0, 0
    klds, cache = [], None
    for w, ref_lp, lp, cache in triples:
        target = w[1:, None]
        nll_sum += float(-lp.gather(1, target).sum())
        ref_sum += float(-ref_lp.gather(1, target).sum())
        count += w.numel() - 1
        klds.append((ref_lp.exp() * (ref_lp - lp)).sum(dim=-1).clamp_min(0))
        agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
    kl = torch.cat(klds)
    return EvalResult(ppl=math.exp(nll_sum / count), ref_ppl=math.exp(ref_sum / count if ref_nll is None else ref_nll),
                      kld=float(kl.mean()), kld_p99=float(torch.quantile(kl.double(), 0.99)),
                      top1=agree / count, n_tokens=count,
                      kv_cache_bytes=None if cache is None else cache.nbytes(),
                      kv_cache_fp16_bytes=None if cache is None else cache.fp16_bytes())


@torch.no_grad()
def compare(candidate: torch.nn.Module, reference: ReferenceRun, progress: bool = True,
            protocol: CacheProtocol | None = None) -> EvalResult:
    """Perplexity of the candidate and its divergence from the reference on the same windows;
    with `protocol`, the candidate's logits come through its (quantized) KV cache."""
    def triples():
        for w, ref_lp in tqdm(list(zip(reference.windows, reference.logprobs)), desc="candidate",
                              disable=not progress, unit="win"):
            yield (w, ref_lp, *_window_logprobs(candidate, w, protocol))
    return _tally(triples(), reference.nll)


@torch.no_grad()
def compare_streaming(candidate: torch.nn.Module, reference: torch.nn.Module, windows: torch.Tensor,
                      protocol: CacheProtocol | None, reference_protocol: CacheProtocol | None,
                      progress: bool = True) -> EvalResult:
    """As compare, with the reference run window by window beside the candidate: nothing but
    one window's log-probabilities is held (long contexts: 2048 x vocab floats per window)."""
    def triples():
        for w in tqdm(windows, desc="reference+candidate", disable=not progress, unit="win"):
            ref_lp, _ = _window_logprobs(reference, w, reference_protocol)
            yield (w, ref_lp, *_window_logprobs(candidate, w, protocol))
    return _tally(triples())
