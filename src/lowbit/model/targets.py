"""Which weights get quantized: every 2-D Linear/Conv1D weight and every stacked 3-D expert
weight, filtered by include/exclude regular expressions on the parameter name."""

from __future__ import annotations

import dataclasses
import re

import torch

# Seeds' advice: keep the output head, embeddings, norms and MoE routers in full precision.
DEFAULT_EXCLUDE = (r"lm_head", r"embed", r"\bwte\b", r"\bwpe\b", r"norm", r"\.gate\.weight$", r"router", r"\bscore\b")


@dataclasses.dataclass(frozen=True)
class WeightTarget:
    """One quantizable weight: module path, parameter attribute and its storage layout."""

    name: str            # full parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    module_name: str
    param_name: str
    kind: str            # "linear" | "conv1d" | "experts" | "embedding"
    transposed: bool     # stored as (..., in, out)

    def parameter(self, model: torch.nn.Module) -> torch.nn.Parameter:
        return getattr(model.get_submodule(self.module_name), self.param_name)


def _is_conv1d(module: torch.nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight (in, out), y = x @ W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def all_weights(model: torch.nn.Module) -> list[WeightTarget]:
    """Every weight lowbit knows how to quantize, before filtering (tied weights once)."""
    found, seen = [], set()
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, torch.nn.Linear):
            found.append(WeightTarget(prefix + "weight", mname, "weight", "linear", False))
        elif isinstance(module, torch.nn.Embedding):
            # rows are tokens: quantized row by row like a Linear (GGUF quantizes token_embd)
            found.append(WeightTarget(prefix + "weight", mname, "weight", "embedding", False))
        elif _is_conv1d(module):
            found.append(WeightTarget(prefix + "weight", mname, "weight", "conv1d", True))
        else:
            # stacked experts (transformers 5): (E, out, in) used with F.linear, unless the
            # module says its experts are stored transposed (E, in, out)
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim == 3:
                    found.append(WeightTarget(prefix + pname, mname, pname, "experts", bool(getattr(module, "is_transposed", False))))
    unique = []
    for t in found:  # a tied lm_head is the embedding's Parameter: keep the first name
        ptr = id(t.parameter(model))
        if ptr not in seen:
            seen.add(ptr)
            unique.append(t)
    return unique


def select_targets(model: torch.nn.Module, include: list[str] | None = None, exclude: list[str] | None = None) -> list[WeightTarget]:
    """Weights matching any include pattern (all if none) and no exclude pattern."""
    excl = [re.compile(p) for p in (DEFAULT_EXCLUDE if exclude is None else exclude)]
    incl = [re.compile(p) for p in include] if include else None
    chosen = []
    for t in all_weights(model):
        if incl is not None and not any(p.search(t.name) for p in incl):
            continue
        if any(p.search(t.name) for p in excl):
            continue
        chosen.append(t)
    return chosen


def set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Replace the submodule at dotted `name` with `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
