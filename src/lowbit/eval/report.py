"""Evaluation of any candidate (lowbit folder, HF folder, GGUF file) against its reference."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from lowbit.data import read_text, token_windows
from lowbit.errors import DataError, SourceError
from lowbit.eval.divergence import CacheProtocol, EvalResult, ReferenceRun, compare, compare_streaming, run_reference
from lowbit.model.load import load_source, resolve_source


@dataclasses.dataclass
class Candidate:
    model: torch.nn.Module
    tokenizer: object
    path: str
    reference_source: str | None   # recorded source of a lowbit folder
    quantized: object | None       # QuantizedModel for lowbit folders
    size_bytes: int
    quantized_bpw: float | None


def disk_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file in a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def load_candidate(path: str | os.PathLike) -> Candidate:
    """Load what `lowbit eval` / `generate` compare: a lowbit folder, HF folder or GGUF file."""
    resolved, kind = resolve_source(path)
    if kind == "lowbit":
        from lowbit.export.native import load
        qm = load(resolved)
        return Candidate(qm.model, qm.tokenizer, str(resolved), qm.source, qm, disk_size(resolved), qm.bits_per_weight)
    loaded = load_source(resolved)
    return Candidate(loaded.model, loaded.tokenizer, loaded.source, None, None, disk_size(resolved), None)


def weight_count(model: torch.nn.Module) -> int:
    """Parameters of the model, each storage once (tied weights), quantized weights included."""
    seen, total = set(), 0
    for _, mod in model.named_modules():
        qw = getattr(mod, "qweight", None)
        if qw is not None:
            total += qw.numel
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def resolve_reference(candidate: Candidate, reference: str | None) -> str | None:
    if reference is not None:
        return reference
    if candidate.reference_source is None:
        raise SourceError(f"{candidate.path} records no source model; pass --reference SOURCE")
    return candidate.reference_source


def eval_windows(tokenizer, data: str | None, ctx: int, windows: int) -> torch.Tensor:
    text, _ = read_text(data, "eval")
    return token_windows(tokenizer, text, ctx, windows)


def source_candidate(loaded) -> Candidate:
    """A plain source as the candidate of its own evaluation (`lowbit eval --kv K` with no candidate)."""
    return Candidate(loaded.model, loaded.tokenizer, loaded.source, loaded.source, None, disk_size(loaded.source), None)


def check_context(model: torch.nn.Module, ctx: int, source: str) -> None:
    """Refuse windows longer than the model's position limit."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and ctx > limit:
        raise DataError(f"--ctx {ctx} is beyond the context limit of {source} ({limit} tokens, max_position_embeddings); "
                        f"pass --ctx {limit} or less")


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int, cache=None) -> str:
    """The greedy continuation of prompt, through `cache` (a KV cache) if given."""
    ids = tokenizer(prompt, return_tensors="pt")
    extra = {} if cache is None else {"cache": cache}
    gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate_candidate(candidate: Candidate, reference_model: torch.nn.Module, windows: torch.Tensor,
                       progress: bool = True, reference_run: ReferenceRun | None = None,
                       protocol: CacheProtocol | None = None) -> dict:
    """All the numbers `lowbit eval --json` prints. With a KV-cache `protocol`, the candidate runs
    through its quantized cache and the reference through a full-precision cache with the same
    forwards, window by window."""
    if protocol is not None:
        from lowbit.runtime.kv_cache import KVCacheSpec

        result = compare_streaming(candidate.model, reference_model, windows, protocol,
                                   protocol.with_spec(KVCacheSpec("none")), progress)
        extra = {"kv": protocol.spec.as_dict(), "kv_label": protocol.spec.label(),
                 "kv_protocol": {"prefill": protocol.prefill, "chunk": protocol.chunk, "tail": protocol.tail},
                 "kv_ratio_fp16": result.kv_cache_bytes / max(1, result.kv_cache_fp16_bytes)}
    else:
        ref = reference_run or run_reference(reference_model, windows, progress)
        result: EvalResult = compare(candidate.model, ref, progress)
        extra = {}
    n_weights = weight_count(candidate.model)
    return {**result.as_dict(), "bits_per_weight": candidate.quantized_bpw,
            "bits_per_weight_file": candidate.size_bytes * 8 / max(1, n_weights),
            "size_bytes": candidate.size_bytes, "candidate": candidate.path, **extra}


def gguf_plan(path: str | os.PathLike) -> dict:
    """method, scheme and recipe of a GGUF candidate: what lowbit recorded in the file (its plan,
    with the reason for each type), or else each tensor's type as the file stores it."""
    import json
    from collections import Counter

    from lowbit.info import describe

    info = describe(path)
    raw = info["metadata"].get("lowbit.recipe")
    recipe = json.loads(raw) if isinstance(raw, str) else {}
    types: dict[str, list[str]] = {}
    for t in info["tensors"]:
        types.setdefault(t["type"], []).append(t["name"])
    if not recipe.get("plan"):
        recipe["plan"] = [{"weights": f"GGUF {ty}", "activations": None, "reason": "its type in the file", "tensors": names}
                          for ty, names in types.items()]
    mix = ((recipe.get("recipe") or {}).get("gguf") or {}).get("mix")
    common = Counter({ty: len(n) for ty, n in types.items()}).most_common(1)[0][0]
    return {"method": recipe.get("method"), "scheme": f"GGUF {mix}" if mix else f"GGUF, mostly {common}", "recipe": recipe}


def candidate_record(candidate: Candidate, reference_model: torch.nn.Module, tokenizer, windows: torch.Tensor,
                     protocol: CacheProtocol | None = None, domains: bool = False, extra_domains: dict | None = None,
                     domain_windows: int = 16, seed: int = 0, progress: bool = True) -> dict:
    """What `lowbit eval --json` writes and `lowbit report` draws: the scores on `windows`, every
    quantized layer's error, the plan and recipe of a lowbit folder, and with `domains` the
    per-domain scores and generations."""
    from lowbit.eval.layers import dense_layer_errors, layer_errors

    record = evaluate_candidate(candidate, reference_model, windows, progress=progress, protocol=protocol)
    record["label"] = Path(candidate.path).name
    qm = candidate.quantized
    if qm is not None:
        record["layers"] = [vars(r) for r in layer_errors(reference_model, qm.tensors, qm.targets, windows[0])]
        record.update(method=qm.method, scheme=qm.scheme.label(), recipe=qm.recipe)
    elif candidate.model is not reference_model:
        record["layers"] = [vars(r) for r in dense_layer_errors(reference_model, candidate.model, windows[0])]
        if Path(candidate.path).suffix.lower() == ".gguf":
            record.update(gguf_plan(candidate.path))
    if domains:
        from lowbit.eval.domains import evaluate_domains

        record.update(evaluate_domains(candidate.model, reference_model, tokenizer, windows.shape[1], domain_windows,
                                       seed, extra_domains, progress=progress))
    return record
