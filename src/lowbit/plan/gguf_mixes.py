"""llama.cpp's named quantization mixes (Q4_K_M, Q3_K_S, ...) as data: which GGUF type each
tensor gets, and what happens when a row length does not fit the type's block.

The per-tensor choice belongs to the quantizer (it decides the format of every weight before any
method runs); the GGUF exporter only serialises what it was given. This module is the policy the
quantizer asks: ``tensor_type_for(mix, gguf_name, layer, n_layers, n_cols)``.

The rules reproduce ``llama_tensor_get_type`` of llama.cpp's ``src/llama-quant.cpp`` (read at
commit 007dbbf3, 2025, and again in the llama.cpp that llama-cpp-python 0.3.36 vendors, which
added the i-quant and ternary mixes here) for dense and MoE models (not Falcon, not a 70B),
for the mixes below. Tensor categories are matched by name as llama.cpp does (``attn_v.weight``,
``ffn_down``, ...). Types are GGML names ("Q4_K", "Q6_K", "F32"); ``lowbit_format(type)`` gives
the lowbit format name ("gguf_q4_k").

Fallback when a row length is not a multiple of the type's block (SmolLM2's 576 columns vs
256-weight k-quant super-blocks): lowbit uses llama.cpp's own table (``LLAMA_CPP_FALLBACK``):
Q2_K/Q3_K/TQ* -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ1-IQ3 and IQ4_XS -> IQ4_NL; F16 if even 32
does not divide the row. We considered "same bits" alternatives (Q4_K -> Q4_1 at 5.0 bpw instead
of Q5_0 at 5.5; Q2_K -> Q4_0 is already among the cheapest 32-block types lowbit has):
the fallback tensors are few and usually the most sensitive (attn/ffn rows of models with odd
widths, token_embd/output), so spending llama.cpp's extra half bit there is the better trade, and
keeping the table identical makes lowbit's files comparable to llama-quantize's. The table is a
parameter (``fallbacks=``) for callers that want another policy; the reason string returned is
meant to be logged and recorded in the output's metadata.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import SchemeError

# mix name -> (base type of every quantized weight, llama.cpp's LLAMA_FTYPE_MOSTLY_* value)
MIXES: dict[str, tuple[str, int]] = {
    "Q4_0": ("Q4_0", 2),
    "Q4_1": ("Q4_1", 3),
    "Q8_0": ("Q8_0", 7),
    "Q5_0": ("Q5_0", 8),
    "Q5_1": ("Q5_1", 9),
    "Q2_K": ("Q2_K", 10),
    "Q3_K_S": ("Q3_K", 11),
    "Q3_K_M": ("Q3_K", 12),
    "Q3_K_L": ("Q3_K", 13),
    "Q4_K_S": ("Q4_K", 14),
    "Q4_K_M": ("Q4_K", 15),
    "Q5_K_S": ("Q5_K", 16),
    "Q5_K_M": ("Q5_K", 17),
    "Q6_K": ("Q6_K", 18),
    "IQ4_NL": ("IQ4_NL", 25),
    "IQ4_XS": ("IQ4_XS", 30),
    # i-quant mixes (llama_ftype_get_default_type: IQ2_S's base is IQ2_XS, IQ2_M's IQ2_S, IQ3_*'s IQ3_S)
    "IQ3_M": ("IQ3_S", 27),
    "IQ3_S": ("IQ3_S", 26),
    "IQ3_XS": ("IQ3_S", 22),
    "IQ3_XXS": ("IQ3_XXS", 23),
    "IQ2_M": ("IQ2_S", 29),
    "IQ2_S": ("IQ2_XS", 28),
    "IQ2_XS": ("IQ2_XS", 20),
    "IQ2_XXS": ("IQ2_XXS", 19),
    "IQ1_M": ("IQ1_M", 31),
    "IQ1_S": ("IQ1_S", 24),
    "TQ2_0": ("TQ2_0", 37),
    "TQ1_0": ("TQ1_0", 36),
}

# The output (and a tied token_embd) when the row fits the base type's block: Q6_K, except these
# (Q8_0 mixes keep Q8_0). An untied token_embd keeps the base type, except these.
_OUTPUT_TYPE: dict[str, str] = {m: "Q5_K" for m in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")}
_TOKEN_EMBD_TYPE: dict[str, str] = {
    **{m: "Q2_K" for m in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M")},
    **{m: "IQ3_S" for m in ("IQ2_S", "IQ2_M", "IQ3_XXS")},
    "TQ1_0": "Q4_K", "TQ2_0": "Q4_K",
}

# llama.cpp's tensor_type_fallback (block-256 type -> block-32 type)
LLAMA_CPP_FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")},
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
}

# Per-category overrides: mix -> category -> rule. A rule is a type name, or a tuple of
# (condition, type) tried in order, conditions being names in _CONDITIONS below.
# Categories: attn_v, attn_output, ffn_down (others keep the base type). Output and token_embd
# are handled in tensor_type_for (they depend on tying and the row length).
_RULES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "Q2_K": {
        "attn_v": (("gqa_ge_4", "Q4_K"), ("always", "Q3_K")),
        "ffn_down": (("always", "Q3_K"),),
        "attn_output": (("always", "Q3_K"),),
    },
    "Q3_K_M": {
        "attn_v": (("first_2", "Q5_K"), ("always", "Q4_K")),
        # llama.cpp: first n/16 layers Q5_K, else Q4_K (Q3_K only for Falcon's non-"more bits" layers)
        "ffn_down": (("first_sixteenth", "Q5_K"), ("always", "Q4_K")),
        "attn_output": (("always", "Q4_K"),),
    },
    "Q3_K_L": {
        "attn_v": (("always", "Q5_K"),),
        "ffn_down": (("always", "Q5_K"),),
        "attn_output": (("always", "Q5_K"),),
    },
    "Q4_K_S": {
        "attn_v": (("first_4", "Q5_K"),),
        "ffn_down": (("first_eighth", "Q5_K"),),
    },
    "Q4_K_M": {
        "attn_v": (("more_bits", "Q6_K"),),
        "ffn_down": (("more_bits", "Q6_K"),),
    },
    "Q5_K_M": {
        "attn_v": (("more_bits", "Q6_K"),),
        "ffn_down": (("more_bits", "Q6_K"),),
    },
    "IQ4_NL": {
        "attn_v": (("gqa_ge_4", "Q5_K"),),
        "ffn_down": (("first_eighth_no_imatrix", "Q5_K"),),
    },
    "IQ4_XS": {
        "attn_v": (("gqa_ge_4", "Q5_K"),),
        "ffn_down": (("first_eighth_no_imatrix", "Q5_K"),),
    },
    # with an importance matrix llama.cpp guards the first ffn_down layers of Q4_0/Q5_0
    "Q4_0": {"ffn_down": (("first_eighth_imatrix", "Q4_1"),)},
    "Q5_0": {"ffn_down": (("first_eighth_imatrix", "Q5_1"),)},
    **{m: {
        "attn_v": (("gqa_ge_4", "Q4_K"), ("always", "Q2_K")),
        "ffn_down": (("first_eighth", "Q2_K"),),
        **({"attn_output": (("always", "IQ2_XXS"),)} if m.startswith("IQ1") else {}),
    } for m in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M")},
    **{m: {
        "attn_v": (("gqa_ge_4", "Q4_K"), ("always", "IQ3_S")),
        "ffn_down": (("first_eighth", "IQ3_S"),),
        "attn_output": (("always", "IQ3_S"),),
    } for m in ("IQ2_S", "IQ2_M")},
    "IQ3_XXS": {
        "attn_v": (("gqa_ge_4", "Q4_K"), ("no_imatrix", "IQ3_S")),
        "attn_k": (("always", "IQ2_S"),),
        "attn_q": (("always", "IQ2_S"),),
        "ffn_down": (("first_eighth_no_imatrix", "Q4_K"), ("no_imatrix", "Q3_K")),
        "attn_output": (("always", "IQ3_S"),),
    },
    "IQ3_XS": {
        "attn_v": (("gqa_ge_4", "Q4_K"),),
        "attn_k": (("always", "IQ3_XXS"),),
        "attn_q": (("always", "IQ3_XXS"),),
        "ffn_gate": (("middle", "IQ3_XXS"),),
        "ffn_up": (("middle", "IQ3_XXS"),),
    },
    "IQ3_S": {"attn_v": (("gqa_ge_4", "Q4_K"),)},
    "IQ3_M": {
        "attn_v": (("always", "Q4_K"),),
        "ffn_down": (("first_eighth", "Q4_K"),),
        "attn_output": (("always", "Q4_K"),),
    },
}


# MoE models (llama.cpp's n_expert rules): these mixes use IQ2-style attention rules, and with 8
# experts these others give attn_output Q5_K
_IQ2_FAMILY = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_MOE8_ATTN_OUTPUT_Q5K = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                         "IQ3_M", "IQ4_XS")


def _moe_rules(mix: str, cat: str, t: str, base: str, i: int, n: int, n_expert: int) -> str:
    """llama.cpp's changes for MoE models, after the dense rules chose t."""
    if cat == "attn_v" and mix in _IQ2_FAMILY and n_expert >= 4:
        t = "Q4_K"
    if n_expert != 8:
        return t
    if cat == "attn_v" and mix not in _IQ2_FAMILY:
        return "Q8_0"
    if cat == "attn_k":
        return "Q4_K" if mix in _IQ2_FAMILY else "Q8_0"
    if cat == "attn_output":   # replaces the dense rules
        return "Q5_K" if mix in _IQ2_FAMILY or mix in _MOE8_ATTN_OUTPUT_Q5K else base
    if cat == "ffn_down" and mix == "IQ3_M" and use_more_bits(i, n):
        return "Q4_K"
    return t


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# condition name -> f(layer, n_layers, heads per KV head, whether an importance matrix is used)
_CONDITIONS = {
    "always": lambda i, n, gqa, im: True,
    "more_bits": lambda i, n, gqa, im: use_more_bits(i, n),
    "first_2": lambda i, n, gqa, im: i < 2,
    "first_4": lambda i, n, gqa, im: i < 4,
    "first_eighth": lambda i, n, gqa, im: i < n // 8,
    "first_eighth_no_imatrix": lambda i, n, gqa, im: i < n // 8 and not im,
    "first_eighth_imatrix": lambda i, n, gqa, im: i < n // 8 and im,
    "no_imatrix": lambda i, n, gqa, im: not im,
    "middle": lambda i, n, gqa, im: n // 8 <= i < 7 * n // 8,
    "first_sixteenth": lambda i, n, gqa, im: i < n // 16,
    "gqa_ge_4": lambda i, n, gqa, im: gqa >= 4,
}


def _category(name: str) -> str:
    """llama.cpp's tensor category, matched on the GGUF tensor name."""
    if name == "output.weight":
        return "output"
    if "ffn_gate_inp" in name:     # MoE routers (and a shared expert's gate): never quantized
        return "router"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def bits_per_weight(type_name: str) -> float:
    """Bits per weight of a GGML type, from gguf's size table."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return nbytes * 8 / block


# block-32 types lowbit can write, candidates for a measured fallback
SMALL_BLOCK_TYPES = ("Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0")


def block_size(type_name: str) -> int:
    """Weights per block of a GGML type (1 for float types)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]


def lowbit_format(type_name: str) -> str | None:
    """lowbit format name of a GGML type ("Q4_K" -> "gguf_q4_k"); None for float types."""
    if type_name in ("F32", "F16", "BF16"):
        return None
    return f"gguf_{type_name.lower()}"


def fallback_type(type_name: str, n_cols: int, fallbacks: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(type, reason or None): type itself when n_cols fits its blocks, else the fallback."""
    if n_cols % block_size(type_name) == 0:
        return type_name, None
    table = LLAMA_CPP_FALLBACK if fallbacks is None else fallbacks
    if type_name not in table:
        raise SchemeError(f"GGUF type {type_name} cannot hold rows of {n_cols} columns and has no fallback; "
                          f"choose a type whose block divides {n_cols}")
    new = table[type_name]
    if n_cols % block_size(new):
        new = "F16"  # llama.cpp does the same when not even a 32-block fits
    reason = f"{n_cols} columns not divisible by {block_size(type_name)} ({type_name}) -> {new}"
    return new, reason


def tensor_type_for(mix_name: str, gguf_tensor_name: str, layer_index: int | None, n_layers: int, n_cols: int,
                    *, n_gqa: int = 1, tied_embeddings: bool = False,
                    fallbacks: dict[str, str] | None = None, imatrix: bool = False,
                    n_expert: int = 0) -> tuple[str, str | None]:
    """GGML type (and fallback reason or None) llama.cpp's mix `mix_name` gives one tensor.

    gguf_tensor_name: e.g. "blk.3.attn_v.weight"; layer_index: its block (None for non-block
    tensors); n_cols: its row length; n_gqa: heads per KV head; tied_embeddings: the model has no
    output.weight, so token_embd is treated as the output (llama.cpp's has_tied_embeddings);
    imatrix: the weights are fitted with an importance matrix (some mixes then choose otherwise);
    n_expert: routed experts per layer of a MoE model (0: dense).
    Norms and other 1-D tensors are F32 (llama.cpp never quantizes them)."""
    if mix_name not in MIXES:
        raise SchemeError(f"unknown GGUF mix {mix_name!r}; choose one of: {', '.join(MIXES)}")
    base, _ = MIXES[mix_name]
    cat = _category(gguf_tensor_name)
    if not gguf_tensor_name.endswith("weight") or "_norm.weight" in gguf_tensor_name or cat == "router":
        return "F32", None
    if cat == "output" or (cat == "token_embd" and tied_embeddings):
        # Q6_K unless the mix is Q8_0, or Q8_0 when the row does not fit the base type's block
        if n_cols % block_size(base):
            t = "Q8_0"
        elif base != "Q8_0":
            t = _OUTPUT_TYPE.get(mix_name, "Q6_K")
        else:
            t = base
        return fallback_type(t, n_cols, fallbacks)
    if cat == "token_embd":  # untied
        return fallback_type(_TOKEN_EMBD_TYPE.get(mix_name, base), n_cols, fallbacks)
    t = base
    i = layer_index if layer_index is not None else 0
    for cond, new in _RULES.get(mix_name, {}).get(cat, ()):
        if _CONDITIONS[cond](i, n_layers, n_gqa, imatrix):
            t = new
            break
    if n_expert > 1:
        t = _moe_rules(mix_name, cat, t, base, i, n_layers, n_expert)
    return fallback_type(t, n_cols, fallbacks)


def file_type_of(mix_name: str) -> int:
    """llama.cpp's general.file_type value (LLAMA_FTYPE_MOSTLY_*) of a mix."""
    if mix_name not in MIXES:
        raise SchemeError(f"unknown GGUF mix {mix_name!r}; choose one of: {', '.join(MIXES)}")
    return MIXES[mix_name][1]
