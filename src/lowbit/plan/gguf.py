"""GGUF planning: which llama.cpp type each tensor gets under a named mix (Q4_K_M, ...), and
what a row length the type's blocks do not fit falls back to. The rules themselves are data in
``lowbit.plan.gguf_mixes``; names and shapes come from the GGUF container (``export.gguf``)."""

from __future__ import annotations

import re

import torch

from lowbit.errors import SchemeError
from lowbit.export.gguf import _arch, _gguf_name
from lowbit.plan.gguf_mixes import SMALL_BLOCK_TYPES, bits_per_weight, lowbit_format, tensor_type_for
from lowbit.scheme import WeightScheme
from lowbit.tensor import quantize_tensor, to_matrix


def gguf_name_map(config):
    """gguf-py's HF -> GGUF tensor name map for this model's architecture."""
    import gguf

    spec = _arch(config)
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch.upper()], int(config.num_hidden_layers))


def measured_fallback(W: torch.Tensor, intended: str, llama_cpp_choice: str) -> tuple[str, str]:
    """Among block-32 types no larger (in bits per weight) than llama.cpp's fallback, the one
    whose round-to-nearest error ||W - Ŵ|| / ||W|| on this very weight is smallest.

    llama.cpp always maps Q4_K -> Q5_0, Q3_K -> Q4_0, ...; measuring per tensor can only match
    or beat that at equal or smaller size, and the errors are recorded as the proof."""
    budget = bits_per_weight(llama_cpp_choice)
    errors = {}
    for t in SMALL_BLOCK_TYPES:
        if bits_per_weight(t) <= budget + 1e-9 and W.shape[1] % 32 == 0:
            qt = quantize_tensor(W, WeightScheme(lowbit_format(t), None, -1))
            errors[t] = float((qt.dequantize() - W).norm() / W.norm().clamp_min(1e-30))
    if not errors:
        return llama_cpp_choice, f"{W.shape[1]} columns not divisible by 256 ({intended}) -> {llama_cpp_choice}"
    # least error; ties (e.g. both exact) go to the smaller type
    best = min(errors, key=lambda t: (round(errors[t], 6), bits_per_weight(t)))
    detail = ", ".join(f"{t} {e:.4f}" for t, e in errors.items())
    return best, (f"{W.shape[1]} columns not divisible by 256 ({intended}) -> {best} "
                  f"(llama.cpp: {llama_cpp_choice}; relative RTN error {detail})")


def mix_schemes(model: torch.nn.Module, mix: str, fallbacks: dict[str, str] | None = None,
                fallback_policy: str = "measured", imatrix: bool = False, read=None):
    """The per-weight schemes of a llama.cpp mix (Q4_K_M, ...) for this model.

    fallback_policy: "llama.cpp" keeps llama.cpp's fixed fallback table for rows that do not
    fit 256-blocks; "measured" picks, per tensor, the most accurate block-32 type no larger
    than llama.cpp's choice (see measured_fallback). imatrix: the weights will be fitted with an
    importance matrix (llama.cpp's mixes choose some tensors differently then).
    Returns (schemes by HF parameter name, [(name, gguf name, type, fallback reason or None)]).
    token_embd is included: llama.cpp quantizes it (as the output too when embeddings are tied).
    read(target): a weight's values (default: its parameter; a lazily loaded model reads its
    checkpoint), needed only where a fallback is measured."""
    from lowbit.model.targets import all_weights

    config = model.config
    n_layers = int(config.num_hidden_layers)
    name_map = gguf_name_map(config)
    n_head = config.num_attention_heads
    n_gqa = n_head // (getattr(config, "num_key_value_heads", None) or n_head)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    from lowbit.export.gguf import num_experts

    n_expert = num_experts(config)
    schemes, plan = {}, []
    for t in all_weights(model):
        gname = _gguf_name(name_map, t.name)
        if gname is None:
            continue
        m = re.match(r"blk\.(\d+)\.", gname)
        n_cols = to_matrix(t.parameter(model).data, t.transposed).shape[1]
        type_name, reason = tensor_type_for(mix, gname, int(m.group(1)) if m else None, n_layers, n_cols,
                                            n_gqa=n_gqa, tied_embeddings=tied, fallbacks=fallbacks, imatrix=imatrix,
                                            n_expert=n_expert)
        if reason is not None and fallback_policy == "measured" and type_name != "F16":
            intended = reason.split("(")[1].split(")")[0]
            values = read(t) if read is not None else t.parameter(model).data
            type_name, reason = measured_fallback(to_matrix(values, t.transposed).float(), intended, type_name)
            del values
        elif fallback_policy not in ("measured", "llama.cpp"):
            raise SchemeError(f"unknown fallback policy {fallback_policy!r}; use 'measured' or 'llama.cpp'")
        fmt = lowbit_format(type_name)
        plan.append((t.name, gname, type_name, reason))
        if fmt is not None:
            schemes[t.name] = WeightScheme(fmt, None, -1)
    return schemes, plan
