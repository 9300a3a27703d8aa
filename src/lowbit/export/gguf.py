"""GGUF export for llama.cpp: architecture metadata, the full tokenizer, and every weight as
the bytes lowbit evaluated.

Weights quantized with a GGUF block format (gguf_q4_k, gguf_q8_0, ...) are written as their
llama.cpp blocks (``to_gguf_bytes``), so llama.cpp decodes exactly ``qt.dequantize()``. Nothing
is quantized here: a weight in another format (int4, NF4, ...) is an error, unless the caller
asks for a full-precision file (``full_precision="F32"``/``"F16"``/``"BF16"``), which writes the
decoded values. Tensors lowbit did not quantize (embeddings, norms, an untied head) are written
in float (F32 by default; F16/BF16 on request, norms always F32).

Architectures (data, ``ARCHS``): llama (and mistral, which llama.cpp runs as llama) and qwen2.
llama.cpp's llama graph applies rotary embeddings to interleaved pairs, so q/k rows are permuted
from Hugging Face's half-split order as convert_hf_to_gguf.py does; qwen2 uses the NeoX order and
is written as is. transformers undoes the permutation when it reads a GGUF, so a model loaded
from the embedded GGUF is in HF order and gets permuted again here. Permuting rows of a
QuantizedTensor is exact: every GGUF block lies within one row.

Tokenizer: from a .gguf source every ``tokenizer.*`` key is copied unchanged (tokens, types,
merges, special ids, add_bos, chat template, pre-tokenizer); from a Hugging Face folder a BPE
(GPT-2 style, byte-level) tokenizer is rebuilt from tokenizer.json as convert_hf_to_gguf.py does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.errors import SchemeError, SourceError
from lowbit.tensor import QuantizedTensor

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """How one transformers model_type is written: GGUF architecture and q/k row order."""

    gguf_arch: str        # general.architecture, and the prefix of its keys
    permute_qk: bool      # llama.cpp's llama rope wants interleaved q/k rows (HF: half split)
    norm_offset: float = 0.0   # added to norm weights: Gemma's x·(1 + w) is llama.cpp's x·w'
    family: str = "rope"       # which hyper-parameters the file carries: "rope" (LLaMA-like) | "gpt2"
    # MoE: whether llama.cpp renormalises the chosen experts' router weights for this architecture
    # (fixed in its model code); a config whose norm_topk_prob differs is refused
    moe_norm: bool | None = None
    layer_norm: bool = False   # LayerNorm (weight and bias) instead of RMSNorm
    keys: tuple[tuple[str, str], ...] = ()   # (GGUFWriter method, config attribute) written when set
    qkv_per_head: bool = False  # fused qkv rows grouped per head (q, k, v of head 0, ...): llama.cpp wants q; k; v
    qkv_per_kv_group: str | None = None   # config flag: when true, fused qkv rows come per KV group (q..., k, v)
    requires: tuple[tuple[str, object], ...] = ()   # (config attribute, the value llama.cpp's model code assumes)
    swa_pattern: int = 2        # sliding-window layers: i % pattern < pattern - 1 (llama.cpp's default per arch)
    wide_scale_layers: int | None = None   # the depth at which llama.cpp scales queries by 1/sqrt(hidden/heads)


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", True),
    "mistral": ArchSpec("llama", True),
    "qwen2": ArchSpec("qwen2", False),
    "qwen3": ArchSpec("qwen3", False),      # + per-head q/k norms (attn_q_norm / attn_k_norm)
    "phi3": ArchSpec("phi3", False),        # fused qkv and gate/up projections, as llama.cpp keeps them
    "gemma": ArchSpec("gemma", False, 1.0),
    "gpt2": ArchSpec("gpt2", False, family="gpt2"),   # LayerNorm with biases, learned positions, Conv1D
    # MoE: stacked experts (E, out, in) become ffn_{gate,up,down}_exps; gate_up_proj is split
    "mixtral": ArchSpec("llama", True, moe_norm=True),
    "qwen2_moe": ArchSpec("qwen2moe", False, moe_norm=False),   # + a shared expert and its gate
    "qwen3_moe": ArchSpec("qwen3moe", False, moe_norm=True),    # + per-head q/k norms
    "starcoder2": ArchSpec("starcoder2", False, layer_norm=True),   # biases everywhere, GELU c_fc/c_proj
    # sandwich norms (post-attention / post-feed-forward), soft-capped logits, sliding windows on
    # every other layer (llama.cpp's default pattern for gemma2, as transformers' layer_types)
    # fused per-head qkv, LayerNorm with biases, partial rotary, parallel attention and MLP
    "gpt_neox": ArchSpec("gptneox", False, layer_norm=True, qkv_per_head=True,
                         keys=(("add_parallel_residual", "use_parallel_residual"),)),
    # parallel attention and MLP from one LayerNorm (two for new_decoder_architecture), fused qkv
    # (multi-query: q; k; v already, grouped per KV head otherwise), no biases, rotary positions
    "falcon": ArchSpec("falcon", False, layer_norm=True, qkv_per_kv_group="new_decoder_architecture",
                       requires=(("parallel_attn", True), ("bias", False), ("alibi", False))),
    "gemma2": ArchSpec("gemma2", False, 1.0, keys=(("add_sliding_window", "sliding_window"),
                                                   ("add_attn_logit_softcapping", "attn_logit_softcapping"),
                                                   ("add_final_logit_softcapping", "final_logit_softcapping")),
                       wide_scale_layers=46),
    # Gemma-3 text: + per-head q/k norms, five sliding layers per full one, a local rotary base
    "gemma3_text": ArchSpec("gemma3", False, 1.0, keys=(("add_sliding_window", "sliding_window"),
                                                        ("add_final_logit_softcapping", "final_logit_softcapping")),
                            swa_pattern=6, wide_scale_layers=62),
}

# Pre-tokenizer names llama.cpp knows, recognised from tokenizer.json's pre_tokenizer (data).
# A Split regex names llama3 / qwen2 style; bare ByteLevel is GPT-2; Digits + ByteLevel is SmolLM.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEXES: dict[str, str] = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

# file_type (LLAMA_FTYPE_MOSTLY_*) of a file whose weights are mostly one type
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
               "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23,
               "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ2_S": 28, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32,
               "TQ1_0": 36, "TQ2_0": 37, "MXFP4": 38}


# --- rows ----------------------------------------------------------------------------------------
def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp wants for q/k: within each head, HF's [first half; second half] of
    rotary pairs becomes interleaved [x0, y0, x1, y1, ...]. new[i] = old[perm[i]]."""
    if rows % (2 * n_head):
        raise SchemeError(f"cannot permute {rows} rows for {n_head} heads: rows must be a multiple of 2 * heads")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def permute_rows(qt: QuantizedTensor, perm: torch.Tensor) -> QuantizedTensor:
    """The QuantizedTensor whose matrix rows are qt's rows in the order perm (exact: codes and
    per-row parameters move together; per-tensor parameters stay)."""
    if qt.transposed or len(qt.shape) != 2:
        raise SchemeError(f"row permutation needs a plain (out, in) weight, got shape {qt.shape}")
    return _take_rows(qt, perm, qt.shape, "permute rows")


def _take_rows(qt: QuantizedTensor, idx: torch.Tensor, shape: tuple[int, ...], what: str) -> QuantizedTensor:
    """qt's matrix rows idx, codes and per-row parameters together, as a tensor of `shape`;
    per-tensor parameters stay. Parameters shared by several rows cannot follow: refused."""
    rows = qt.codes.shape[0]
    bad = [k for k, v in qt.params.items() if v.ndim == 2 and v.shape[0] != rows]
    if bad:
        raise SchemeError(f"parameters {bad} of a {qt.format.name} tensor are not per row; cannot {what}")
    params = {k: (v[idx] if v.ndim == 2 else v) for k, v in qt.params.items()}
    return dataclasses.replace(qt, codes=qt.codes[idx], params=params, shape=tuple(shape))


# --- inputs --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Model:
    """What the writer needs from a QuantizedModel or a LoadedModel."""

    model: torch.nn.Module
    tokenizer: object
    tensors: Mapping[str, QuantizedTensor]
    source: str
    recipe: dict
    floats: Mapping[str, torch.Tensor] | None = None   # values of parameters left on meta (a streamed run)


def _unpack(qm_or_model) -> _Model:
    from lowbit.model.load import LoadedModel
    from lowbit.model.quantized import QuantizedModel

    if isinstance(qm_or_model, _Model):
        return qm_or_model
    if isinstance(qm_or_model, QuantizedModel):
        from lowbit.model.quantized import recorded_recipe

        recipe = recorded_recipe({"method": qm_or_model.method, "scheme": qm_or_model.scheme.to_dict(), **qm_or_model.recipe})
        return _Model(qm_or_model.model, qm_or_model.tokenizer, qm_or_model.tensors, qm_or_model.source, recipe)
    if isinstance(qm_or_model, LoadedModel):
        return _Model(qm_or_model.model, qm_or_model.tokenizer, {}, qm_or_model.source, {})
    raise SchemeError(f"write_gguf needs a QuantizedModel or LoadedModel, got {type(qm_or_model).__name__}")


def _rope_theta(config, layer_type: str = "full_attention") -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type in params:    # per layer type (Gemma-3: sliding layers have their own base)
        params, theta = params[layer_type], None
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise SchemeError(f"rope type {rope_type!r} is not supported by lowbit's GGUF exporter yet; "
                          "export a model with default rotary embeddings, or use --export native")
    return float(theta)


def _arch(config) -> ArchSpec:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise SchemeError(f"GGUF export supports model types {', '.join(ARCHS)}, not {mt!r}; "
                          "use another --export target for this model")
    return ARCHS[mt]


def _write_arch_metadata(w, config, spec: ArchSpec) -> None:
    if spec.family == "gpt2":
        w.add_context_length(int(config.n_positions))
        w.add_embedding_length(int(config.n_embd))
        w.add_feed_forward_length(int(config.n_inner or 4 * config.n_embd))
        w.add_block_count(int(config.n_layer))
        w.add_head_count(int(config.n_head))
        w.add_layer_norm_eps(float(config.layer_norm_epsilon))
        w.add_vocab_size(int(config.vocab_size))
        return
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    ffn = next((getattr(config, k) for k in ("intermediate_size", "ffn_hidden_size") if getattr(config, k, None)), None)
    w.add_feed_forward_length(int(ffn or 4 * config.hidden_size))
    for attr, want in spec.requires:
        if getattr(config, attr, want) != want:
            raise SchemeError(f"{config.model_type} with {attr}={getattr(config, attr)!r}: llama.cpp's {spec.gguf_arch} "
                              f"assumes {want!r}; use another --to target")
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_rope_freq_base(_rope_theta(config))
    params = getattr(config, "rope_parameters", None) or {}
    if "sliding_attention" in params:
        w.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))
    eps = next(getattr(config, k) for k in ("rms_norm_eps", "norm_epsilon", "layer_norm_eps", "layer_norm_epsilon")
               if hasattr(config, k))
    if spec.layer_norm:
        w.add_layer_norm_eps(float(eps))
    else:
        w.add_layer_norm_rms_eps(float(eps))
    w.add_vocab_size(int(config.vocab_size))
    w.add_rope_dimension_count(int(head_dim * _partial_rotary(config)))
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    for method, attr in spec.keys:
        if getattr(config, attr, None) is not None:
            getattr(w, method)(getattr(config, attr))
    _check_query_scale(config, head_dim, spec.wide_scale_layers)
    _check_layer_types(config, spec.swa_pattern)
    n_expert = num_experts(config)
    if n_expert:
        _check_moe(config, spec)
        w.add_expert_count(n_expert)
        w.add_expert_used_count(int(config.num_experts_per_tok))
        if getattr(config, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if getattr(config, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))


def _partial_rotary(config) -> float:
    """Share of each head's dimensions that rotary embeddings turn (1.0 for most models)."""
    params = getattr(config, "rope_parameters", None) or {}
    for v in (params.get("partial_rotary_factor"), getattr(config, "partial_rotary_factor", None),
              getattr(config, "rotary_pct", None)):
        if v is not None:
            return float(v)
    return 1.0


def qkv_head_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order turning a per-head fused qkv ([q_h; k_h; v_h] for each head h) into [q; k; v]."""
    if rows % (3 * n_head):
        raise SchemeError(f"cannot regroup {rows} fused qkv rows for {n_head} heads")
    return torch.arange(rows).reshape(n_head, 3, rows // n_head // 3).transpose(0, 1).reshape(-1)


def qkv_group_order(rows: int, n_head: int, n_kv: int) -> torch.Tensor:
    """Row order turning a fused qkv grouped per KV head ([q of its n_head/n_kv heads; k; v] for
    each KV head) into [q; k; v]."""
    per = n_head // n_kv + 2
    if rows % (n_kv * per):
        raise SchemeError(f"cannot regroup {rows} fused qkv rows for {n_head} heads and {n_kv} KV heads")
    grid = torch.arange(rows).reshape(n_kv, per, rows // (n_kv * per))
    return torch.cat([grid[:, :-2].reshape(-1), grid[:, -2].reshape(-1), grid[:, -1].reshape(-1)])


def _check_query_scale(config, head_dim: int, wide_scale_layers: int | None = None) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the depth of
    Gemma's 27B models); transformers by 1/sqrt(query_pre_attn_scalar) where the config has one."""
    q = getattr(config, "query_pre_attn_scalar", None)
    if q is None:
        return
    wide = config.num_hidden_layers == wide_scale_layers
    allowed = {head_dim} | ({config.hidden_size // config.num_attention_heads} if wide else set())
    if q not in allowed:
        raise SchemeError(f"query_pre_attn_scalar={q}: llama.cpp scales queries by 1/sqrt({head_dim}) for this model, "
                          "so the GGUF file would compute other attention; use another --to target")


def _check_layer_types(config, pattern: int = 2) -> None:
    """Sliding-window layers must be llama.cpp's default pattern for the architecture: layer i
    slides when i % pattern < pattern - 1."""
    types = getattr(config, "layer_types", None)
    if not types or getattr(config, "sliding_window", None) is None:
        return
    want = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(len(types))]
    if list(types) != want and set(types) != {"full_attention"}:
        raise SchemeError(f"layer_types {types} differ from llama.cpp's alternation of sliding and full attention; "
                          "use another --to target")


def num_experts(config) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)


def _check_moe(config, spec: ArchSpec) -> None:
    """What llama.cpp's MoE code for this architecture assumes, checked against the config."""
    if spec.moe_norm is None:
        raise SchemeError(f"lowbit's GGUF exporter does not write experts for {config.model_type}")
    norm = bool(getattr(config, "norm_topk_prob", True))
    if norm != spec.moe_norm:
        raise SchemeError(f"this {config.model_type} config has norm_topk_prob={norm}, but llama.cpp's {spec.gguf_arch} "
                          f"always uses {spec.moe_norm}: the GGUF file would route differently; use another --to target")
    if getattr(config, "mlp_only_layers", None) or int(getattr(config, "decoder_sparse_step", 1) or 1) != 1:
        raise SchemeError("a model with dense layers between its MoE layers (mlp_only_layers / decoder_sparse_step) "
                          "is not one llama.cpp's qwen2moe/qwen3moe loads; use another --to target")


# --- tokenizer -----------------------------------------------------------------------------------
def _copy_gguf_keys(w, reader, prefixes: tuple[str, ...], skip: set[str]) -> list[str]:
    """Copy every key/value of a GGUFReader's file starting with one of `prefixes` (types kept)."""
    from gguf import GGUFValueType

    copied = []
    for key, field in reader.fields.items():
        if not key.startswith(prefixes) or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        if vtype == GGUFValueType.ARRAY and not value:
            continue  # GGUFWriter drops empty arrays
        w.add_key_value(key, value, vtype, sub_type=sub)
        copied.append(key)
    return copied


def _pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json (see PRE_TOKENIZER_REGEXES)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZER_REGEXES:
                return PRE_TOKENIZER_REGEXES[regex]
    if types == ["ByteLevel"]:
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    log.warning("pre-tokenizer %s is not one lowbit recognises; writing 'default' (llama.cpp may split text "
                "differently from the Hugging Face tokenizer)", types)
    return "default"


def _write_hf_tokenizer(w, tokenizer, vocab_size: int) -> None:
    """tokenizer.* keys for a byte-level BPE tokenizer, as convert_hf_to_gguf.py writes them."""
    from gguf import SpecialVocab, TokenType

    if tokenizer is None:
        raise SourceError("the model has no tokenizer; GGUF files need one (load the model from a folder with tokenizer.json)")
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        tj = Path(d) / "tokenizer.json"
        if not tj.exists():
            raise SchemeError("GGUF export needs a fast tokenizer (tokenizer.json); this tokenizer has none")
        tok_json = json.loads(tj.read_text(encoding="utf-8"))
        if (tok_json.get("model") or {}).get("type") != "BPE":
            raise SchemeError(f"GGUF export from a Hugging Face folder supports BPE tokenizers, not "
                              f"{(tok_json.get('model') or {}).get('type')!r}; export from a .gguf source instead")
        vocab = tokenizer.get_vocab()
        by_id = {i: t for t, i in vocab.items()}
        added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
        n = max(vocab_size, max(by_id) + 1)
        tokens, types = [], []
        for i in range(n):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(TokenType.UNUSED)
            elif i in added:
                tokens.append(by_id[i])
                types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[i])
                types.append(TokenType.NORMAL)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_tokenizer_name(tok_json))
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = SpecialVocab(d, load_merges=True, n_vocab=n)
        special.add_to_gguf(w, quiet=True)
        if "bos" not in special.add_special_token:
            # tokenizer_config.json may not say; what the tokenizer does is the truth llama.cpp must copy
            bos = getattr(tokenizer, "bos_token_id", None)
            ids = tokenizer("a")["input_ids"]
            w.add_add_bos_token(bool(bos is not None and ids and ids[0] == bos))


# --- tensors -------------------------------------------------------------------------------------
_EXPERT_PART = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                "gate_up_proj": "ffn_gate_exps"}   # gate_up is split in two; its type is the gate's


def _gguf_name(name_map, hf_name: str) -> str | None:
    for suffix in (".weight", ".bias"):
        if hf_name.endswith(suffix):
            base = name_map.get_name(hf_name[: -len(suffix)])
            return None if base is None else base + suffix
    head, _, part = hf_name.rpartition(".")
    if head.endswith(".experts") and part in _EXPERT_PART:   # stacked experts: a parameter, no suffix
        base = name_map.get_name(head + ".down_proj")
        return None if base is None else base.replace("ffn_down_exps", _EXPERT_PART[part]) + ".weight"
    return None


def split_gguf_names(hf_name: str, gguf_name: str) -> list[str]:
    """The GGUF tensors a model parameter becomes: a stacked gate_up is split into the gate and
    the up experts (the exporter's _split_gate_up), everything else keeps its one name."""
    if hf_name.endswith(".experts.gate_up_proj"):
        return [gguf_name, gguf_name.replace("ffn_gate_exps", "ffn_up_exps")]
    return [gguf_name]


def _split_gate_up(value):
    """transformers' stacked gate_up (E, 2I, H) -> (gate, up), each (E, I, H): per expert the
    first I rows are the gate (the model chunks its output in two). Quantized values split by
    rows, codes and per-row parameters together (exact)."""
    if not isinstance(value, QuantizedTensor):
        g, u = value.detach().chunk(2, dim=1)
        return g.contiguous(), u.contiguous()
    if value.transposed or len(value.shape) != 3:
        raise SchemeError(f"stacked experts of shape {value.shape} stored transposed are not written to GGUF yet")
    E, two_i, H = value.shape
    half = two_i // 2
    return tuple(_take_rows(value, (torch.arange(E)[:, None] * two_i + start + torch.arange(half)).reshape(-1),
                            (E, half, H), "split gate_up") for start in (0, half))


def tensor_names(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name: GGUF tensor name} of a model of a supported architecture (what importance
    matrices are keyed by)."""
    import gguf

    config = model.config
    spec = _arch(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch.upper()], int(config.num_hidden_layers))
    out = {}
    for hf_name, _ in model.named_parameters(remove_duplicate=False):
        g = _gguf_name(name_map, hf_name)
        if g is not None:
            out[hf_name] = g
    return out


def _float_array(t: torch.Tensor, type_name: str):
    """(numpy array, raw GGML type or None) of a float tensor in F32/F16/BF16."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    a = t.detach().float().cpu().numpy()
    if type_name == "F32":
        return a.astype(np.float32, copy=False), None   # no second copy of a large embedding
    if type_name == "F16":
        return a.astype(np.float16), None
    return gguf_quantize(a, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16


def _as_gguf_blocks(qt: QuantizedTensor, ternary: str = "TQ2_0") -> QuantizedTensor:
    """The same values in a GGUF block format where one holds them bit for bit (symmetric INT4/5/8
    and float-minimum INT4/5 in groups of multiples of 32, ternary; see formats.gguf_map);
    other tensors as they are."""
    from lowbit.formats.gguf_map import exact_blocks

    return exact_blocks(qt, f"gguf_{ternary.lower()}") or qt


def _type_name_of(qt: QuantizedTensor) -> str | None:
    from lowbit.formats.gguf_blocks import GGUF_TYPES

    return GGUF_TYPES[qt.format.name].name if qt.format.name in GGUF_TYPES else None


@dataclasses.dataclass
class _Entry:
    """One tensor of the file: its name, type and logical shape, and how to read its value (a
    QuantizedTensor in GGUF blocks, or a float tensor) when it is written."""

    gname: str
    type_name: str
    shape: tuple[int, ...]                        # the model's shape of the tensor
    read: Callable[[], object]
    block_shape: tuple[int, ...] | None = None    # a quantized weight's (..., rows, cols) as GGUF stores it
    read_rows: Callable[[int, int], torch.Tensor] | None = None   # a float matrix's rows r0..r1, read on demand

    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _value_readers(m: _Model) -> tuple[dict[str, Callable], dict[str, Callable], dict[str, Callable],
                                        dict[str, tuple[int, ...]]]:
    """({name: read float value}, {name: read QuantizedTensor}, {name: read its header},
    {float name: shape}): nothing is read here, so a model whose parameters are on meta (a
    streamed run: m.floats reads them) is written one tensor at a time. A header is the tensor
    without its codes where they are read lazily (its format, shape and parameters: what picks
    the GGUF type), else the tensor. A stacked gate_up becomes its gate and up halves."""
    from lowbit.export.native import tensor_headers

    state = dict(m.model.named_parameters(remove_duplicate=False))
    persistent = set(m.model.state_dict())   # non-persistent buffers (Gemma's embed_scale) are recomputed
    state.update({k: v for k, v in m.model.named_buffers() if k not in state and k in persistent})
    shapes = {n: tuple(v.shape) for n, v in state.items()}

    def float_reader(name):
        if m.floats is not None and name in m.floats:
            return lambda: m.floats[name]
        return lambda: state[name]

    floats = {n: float_reader(n) for n in state}
    head_tensors = tensor_headers(m.tensors)
    quantized = {n: (lambda n=n: m.tensors[n]) for n in m.tensors}
    headers = {n: (lambda n=n: head_tensors[n]) for n in m.tensors}
    for fused in [n for n in list(floats) if n.endswith(".experts.gate_up_proj")]:
        head = fused[: -len("gate_up_proj")]
        shape = shapes.pop(fused)
        for half, part in enumerate(("gate_proj", "up_proj")):
            shapes[head + part] = (shape[0], shape[1] // 2, *shape[2:])
        for readers in (floats, quantized, headers):
            if fused in readers:
                read = readers.pop(fused)
                readers[head + "gate_proj"] = lambda read=read: _split_gate_up(read())[0]
                readers[head + "up_proj"] = lambda read=read: _split_gate_up(read())[1]
    return floats, quantized, headers, shapes


def _model_order(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Names in the order of their modules in the model, a module's weight before its other
    tensors: the same order whether a Linear was replaced by its quantized module (resident
    runs) or still holds its parameter (streamed runs)."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    end = len(position)

    def key(name):
        owner, _, attr = name.rpartition(".")
        return position.get(owner, end), attr != "weight"

    return sorted(names, key=key)


def _plan_tensors(m: _Model, spec: ArchSpec, tensor_types: dict[str, str], full_precision: str | None,
                  name_map, ternary: str = "TQ2_0") -> list[_Entry]:
    """The file's tensors in model order, q/k not yet permuted. Each quantized tensor's header is
    read here (its GGUF type; the whole tensor only when it is in memory anyway), the tensor when
    it is written; nothing is kept."""
    config = m.model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan, seen = [], set()
    floats, quantized, headers, shapes = _value_readers(m)
    names = _model_order(m.model, list(dict.fromkeys(list(floats) + list(quantized))))
    for hf_name in names:
        if "rotary_emb" in hf_name or hf_name.endswith("inv_freq"):
            continue  # recomputed by llama.cpp from rope metadata
        if hf_name.startswith("lm_head.") and tied and hf_name not in quantized:
            continue  # tied head: llama.cpp uses token_embd when output.weight is absent
        gname = _gguf_name(name_map, hf_name)
        if gname is None:
            raise SchemeError(f"tensor {hf_name} has no GGUF name for architecture {spec.gguf_arch}; "
                              "the model is not a plain LLaMA-style model")
        if gname in seen:
            continue
        seen.add(gname)
        requested = tensor_types.get(hf_name, tensor_types.get(gname))
        if hf_name in quantized:
            read = lambda read=quantized[hf_name]: _as_gguf_blocks(read(), ternary)  # noqa: E731
            qt = _as_gguf_blocks(headers[hf_name](), ternary)
            if qt.input_quant is not None:
                raise SchemeError(f"{hf_name} has quantized inputs, which a GGUF file cannot hold (llama.cpp picks its own "
                                  "activation types at run time); quantize without activations (a weight-only scheme) "
                                  "for --to gguf")
            have = _type_name_of(qt)
            want = requested or full_precision or have
            if want is None:
                raise SchemeError(
                    f"{hf_name} is stored as {qt.format.name} {qt.group_size}, which no GGUF type holds exactly, and the "
                    "GGUF exporter never re-quantizes; `lowbit convert IN --to gguf` re-fits such tensors (and says "
                    "what it cost), or quantize with --format gguf_q4_k (or another gguf_* type), or pass --type "
                    "F32/F16 for a full-precision file of the decoded weights")
            if want in FLOAT_TYPES:
                plan.append(_Entry(gname, want, tuple(qt.shape), lambda read=read: read().dequantize(torch.float32)))
            elif want != have:
                raise SchemeError(f"{hf_name} was quantized as {qt.format.name}; it cannot be written as {want} without "
                                  f"quantizing again; quantize it with --format gguf_{want.lower()} instead")
            else:
                plan.append(_Entry(gname, want, tuple(qt.shape), read,
                                   tuple(qt.shape) if len(qt.shape) == 3 else tuple(qt.codes.shape)))
            del qt
            continue
        shape = shapes[hf_name]
        if len(shape) <= 1 or "norm" in gname:
            want = "F32"  # norms and biases: llama.cpp keeps them in F32
        else:
            want = requested or (full_precision or "F32")
        if want not in FLOAT_TYPES:
            raise SchemeError(f"{hf_name} is not quantized; it can be written as {', '.join(FLOAT_TYPES)}, not {want} "
                              "(the exporter never quantizes: quantize it first)")
        rows = m.floats.read_rows if m.floats is not None and hf_name in m.floats and len(shape) == 2 else None
        plan.append(_Entry(gname, want, shape, floats[hf_name],
                           read_rows=(lambda r0, r1, n=hf_name, rows=rows: rows(n, r0, r1)) if rows else None))
    return plan


def _file_type(plan: list[_Entry]) -> int:
    """general.file_type: the type holding most of the 2-D weights' elements."""
    count: dict[str, int] = {}
    for e in plan:
        if len(e.shape) >= 2:
            count[e.type_name] = count.get(e.type_name, 0) + e.numel()
    main = max(count, key=count.get) if count else "F32"
    return _FILE_TYPES.get(main, 0)


def _add_metadata(w, m: _Model, config, spec: ArchSpec, file_type: int) -> None:
    """Every key/value of the file: names, architecture, recipe and the full tokenizer."""
    import gguf

    source = Path(m.source) if m.source else None
    gguf_source = source is not None and source.suffix.lower() == ".gguf" and source.is_file()
    reader = gguf.GGUFReader(source) if gguf_source else None
    if reader is not None:  # names, license, ... of the original model
        _copy_gguf_keys(w, reader, ("general.",), {"general.architecture", "general.file_type",
                                                   "general.quantization_version", "general.alignment"})
    elif source is not None:
        w.add_name(source.name)
    _write_arch_metadata(w, config, spec)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_quantized_by("lowbit")
    if m.recipe:
        w.add_string("lowbit.recipe", json.dumps(m.recipe, sort_keys=True, default=str))
    if reader is not None:
        copied = _copy_gguf_keys(w, reader, ("tokenizer.",), set())
        if "tokenizer.ggml.tokens" not in copied:
            raise SourceError(f"{source} has no tokenizer.ggml.tokens; cannot write a usable GGUF from it")
    else:
        _write_hf_tokenizer(w, m.tokenizer, int(config.vocab_size))


def metadata_bytes(qm_or_model, tensor_shapes: dict[str, tuple[int, ...]], reserve: int = 65536) -> int:
    """Bytes of a GGUF file that are not tensor data, for a file holding `tensor_shapes` (by GGUF
    name): header, key/values (tokenizer included) and tensor infos, plus the worst-case
    alignment padding of every tensor and `reserve` bytes for the recipe written later.
    Used to turn a file-size budget into a tensor-data budget."""
    import gguf

    m = _unpack(qm_or_model)
    spec = _arch(m.model.config)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "meta.gguf"
        w = gguf.GGUFWriter(path, spec.gguf_arch)
        _add_metadata(w, m, m.model.config, spec, 0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        kv = path.stat().st_size
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    infos = sum(8 + len(name.encode()) + 4 + 8 * len(shape) + 4 + 8 for name, shape in tensor_shapes.items())
    return kv + infos + align + (align - 1) * len(tensor_shapes) + reserve


def write_gguf(qm_or_model, path: str | os.PathLike, tensor_types: dict[str, str] | None = None, *,
               full_precision: str | None = None, force: bool = False, ternary: str = "TQ2_0",
               progress: bool = False) -> Path:
    """Write a QuantizedModel (or a plain LoadedModel) as one GGUF file for llama.cpp.

    tensor_types: per tensor (HF or GGUF name) "F32"/"F16"/"BF16", or the GGML name of the type
    it was quantized with; full_precision: write every quantized weight decoded, in that float
    type (F32/F16/BF16), e.g. for a reference file; ternary: the block type of ternary weights
    (TQ2_0, or TQ1_0: 1.69 instead of 2.06 bits/weight). The file appears at `path` only when complete.
    Tensors are read and written one at a time after the header (a lazy `tensors` mapping or
    `_Model.floats` keeps memory to one tensor)."""
    if ternary not in ("TQ1_0", "TQ2_0"):
        raise SchemeError(f"ternary weights go to TQ1_0 or TQ2_0 blocks, not {ternary!r}")
    import gguf

    if full_precision is not None and full_precision not in FLOAT_TYPES:
        raise SchemeError(f"full-precision type must be one of {', '.join(FLOAT_TYPES)}, got {full_precision!r}; "
                          "quantized GGUF types come from quantizing with --format gguf_*")
    tensor_types = dict(tensor_types or {})
    m = _unpack(qm_or_model)
    config = m.model.config
    spec = _arch(config)
    final = Path(path)
    if final.exists() and not force:
        raise SourceError(f"output {final} already exists; choose another --output or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch.upper()], int(config.num_hidden_layers))
    plan = _plan_tensors(m, spec, tensor_types, full_precision, name_map, ternary)
    from lowbit.model.targets import _is_conv1d

    # Conv1D stores (in, out); GGUF rows are output features
    conv1d = {_gguf_name(name_map, f"{n}.weight") for n, mod in m.model.named_modules() if _is_conv1d(mod)}

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    stored = [(e, _stored_shape(e, conv1d)) for e in plan]
    w = gguf.GGUFWriter(tmp, spec.gguf_arch)
    try:
        _add_metadata(w, m, config, spec, _file_type(plan))
        for e, shape in stored:   # the header first: every tensor's name, type and size
            w.add_tensor_info(e.gname, shape, np.dtype(np.float32), _stored_nbytes(e.type_name, shape),
                              raw_dtype=gguf.GGMLQuantizationType[e.type_name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for e, shape in tqdm(stored, desc="gguf", unit="tensor", disable=not progress):   # then one value at a time
            blocks = _RowBlocks.of(e, shape, config, spec, conv1d)
            w.write_tensor_data(blocks if blocks is not None else _tensor_bytes(e, e.read(), config, spec, conv1d))
        w.close()
        os.replace(tmp, final)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return final


def _stored_shape(e: _Entry, conv1d: set[str]) -> tuple[int, ...]:
    """The shape the file gives a tensor (numpy order: a row is the last dimension)."""
    if e.gname.endswith("ffn_gate_inp_shexp.weight"):   # (1, hidden) in HF, a vector here
        return (e.numel(),)
    if e.block_shape is not None:   # a quantized weight's rows are its output features
        return e.block_shape
    return tuple(reversed(e.shape)) if e.gname in conv1d else e.shape


def _stored_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return int(np.prod(shape)) // block * type_size


def _row_order(gname: str, rows: int, config, spec: ArchSpec) -> torch.Tensor | None:
    """The permutation of a tensor's rows for the architecture's rotary/fused layout, or None."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    if spec.permute_qk and (".attn_q." in gname or ".attn_k." in gname):
        return qk_permutation(rows, n_head if ".attn_q." in gname else n_kv)
    if spec.qkv_per_head and ".attn_qkv." in gname:
        return qkv_head_order(rows, n_head)
    if spec.qkv_per_kv_group and getattr(config, spec.qkv_per_kv_group, False) and ".attn_qkv." in gname:
        return qkv_group_order(rows, n_head, n_kv)
    return None


class _RowBlocks:
    """A float matrix written a block of rows at a time (an embedding or head in F32 is the
    largest tensor of a streamed run). GGUFWriter.write_tensor_data needs only nbytes and tofile."""

    ROWS_ELEMENTS = 1 << 22

    def __init__(self, e: _Entry, nbytes: int):
        self.e, self.nbytes = e, nbytes

    @classmethod
    def of(cls, e: _Entry, shape, config, spec: ArchSpec, conv1d: set[str]) -> "_RowBlocks | None":
        """Blocks for a float matrix written as stored (no row order, transposition or offset), else None."""
        if e.read_rows is None or e.block_shape is not None or len(e.shape) != 2 or e.gname in conv1d \
                or "norm" in e.gname or e.gname.endswith("ffn_gate_inp_shexp.weight") \
                or _row_order(e.gname, e.shape[0], config, spec) is not None:
            return None
        return cls(e, _stored_nbytes(e.type_name, shape))

    def tofile(self, f) -> None:
        rows, cols = self.e.shape
        step = max(1, self.ROWS_ELEMENTS // max(1, cols))
        for r0 in range(0, rows, step):
            _float_array(self.e.read_rows(r0, min(rows, r0 + step)), self.e.type_name)[0].tofile(f)


def _tensor_bytes(e: _Entry, value, config, spec: ArchSpec, conv1d: set[str]) -> np.ndarray:
    """The array written for one tensor: llama.cpp's blocks, or floats, rows permuted for the
    architecture's rotary layout."""
    gname = e.gname
    rows = (value.codes if isinstance(value, QuantizedTensor) else value).shape[0]
    order = _row_order(gname, rows, config, spec)
    if isinstance(value, QuantizedTensor):
        if order is not None:
            value = permute_rows(value, order)
        from lowbit.formats.gguf_blocks import to_gguf_bytes

        data = to_gguf_bytes(value)
        if len(value.shape) == 3:          # stacked experts: (E, rows, bytes per row)
            data = data.reshape(value.shape[0], value.shape[1], -1)
        elif gname.endswith("ffn_gate_inp_shexp.weight"):   # llama.cpp wants a vector
            data = data.reshape(-1)
        return np.ascontiguousarray(data)
    t = value.detach()
    if order is not None:
        t = t[order]
    if spec.norm_offset and gname.endswith("norm.weight"):
        t = t.float() + spec.norm_offset
    if gname in conv1d:
        t = t.T.contiguous()
    if gname.endswith("ffn_gate_inp_shexp.weight"):   # (1, hidden) in HF, a vector here
        t = t.reshape(-1)
    arr, _ = _float_array(t, e.type_name)
    return arr


# --- import ---------------------------------------------------------------------------------------
def import_gguf(path: str | os.PathLike):
    """A GGUF file as a QuantizedModel: every weight stored in a block type lowbit knows becomes a
    QuantizedTensor with the file's own codes and scales (q/k rows back in HF order); float
    tensors (norms, F16/F32 weights) are the model's parameters, as transformers reads them."""
    import collections

    import gguf

    from lowbit.formats.gguf_blocks import GGUF_TYPES, from_gguf_bytes
    from lowbit.model.load import load_source
    from lowbit.model.quantized import QuantizedModel, install_quantized
    from lowbit.model.targets import all_weights
    from lowbit.scheme import QuantScheme, WeightScheme

    loaded = load_source(path)
    config = loaded.model.config
    spec = _arch(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch.upper()], int(config.num_hidden_layers))
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    known = {v.name: k for k, v in GGUF_TYPES.items()}
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tensors, targets = {}, {}
    for t in all_weights(loaded.model):
        gname = _gguf_name(name_map, t.name)
        rt = stored.get(gname)
        if t.kind not in ("linear", "embedding") or rt is None or rt.tensor_type.name not in known:
            continue
        rows, cols = (int(x) for x in reversed(rt.shape.tolist()))
        qt = from_gguf_bytes(rt.data, known[rt.tensor_type.name], (rows, cols))
        if spec.permute_qk and (".attn_q." in gname or ".attn_k." in gname):
            perm = qk_permutation(rows, n_head if ".attn_q." in gname else n_kv)
            qt = permute_rows(qt, torch.argsort(perm))
        install_quantized(loaded.model, t, qt)
        tensors[t.name], targets[t.name] = qt, t
    if not tensors:
        raise SourceError(f"{path} holds no weights in a block type lowbit reads ({', '.join(known)}); "
                          "it is a full-precision GGUF: quantize it with `lowbit quantize`")
    counts = collections.Counter(GGUF_TYPES[qt.format.name].name for qt in tensors.values())
    common = counts.most_common(1)[0][0]
    scheme = QuantScheme(WeightScheme(known[common], None, 32))
    return QuantizedModel(loaded.model, loaded.tokenizer, scheme, tensors, targets, str(path), "imported-gguf",
                          {"imported_from": "gguf", "gguf_types": dict(counts)})
