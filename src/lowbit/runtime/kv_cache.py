"""A quantized KV cache through transformers' Cache API.

`QuantizedKVCache(spec, config)` is a `transformers.Cache` whose layers hold the real compressed
tensors (int8 / float8_e4m3fn / packed uint8 codes plus fp16 scales), so

    model(ids, cache=cache, use_cache=True)       # `past_key_values=` is the older name
    model.generate(ids, cache=cache)

run on it. Kinds (`KVCacheSpec.kind`):

- ``none`` (alias ``fp16``): stores exactly what DynamicCache stores (the model's dtype);
- ``int8`` / ``fp8``: symmetric, a scale per token per head (absmax over head_dim), or with
  ``granularity="group"`` one per token per ``group_size`` channels, or ``granularity="head"`` one
  scale per head, fitted on the first states stored (the prefill) and frozen;
  With ``symmetric=False`` (int8 only) each token's range is its min-max instead, stored as an
  fp16 scale and fp16 minimum per token (or per group), codes one per byte: keys sit off zero in
  some channels, so a symmetric range wastes part of its levels (HQQ's int8 cache is asymmetric);
- ``int4``: asymmetric groups of ``group_size`` (32) channels along head_dim, two codes per byte;
- ``kivi2``: KIVI-2 (Liu et al. 2024): 2-bit, keys per channel over blocks of ``block`` (G, 32)
  tokens, values per token in groups of ``group_size`` along head_dim, and a full-precision
  window of the ``residual`` (R, 128) most recent tokens. After each update whole blocks of the
  oldest window tokens are quantized while the window would keep at least R tokens without
  them, so the window holds R..R+G-1 tokens once R are cached;
- ``kivi4``: the KIVI layout at 4 bits (keys per channel, values per token), for comparison with
  ``int4``, whose keys are grouped along head_dim (keys have outlier channels, KIVI section 3).

Around the codes, every quantized kind keeps in full precision (``residual_dtype``, fp16):
- the first ``sink`` tokens (default 1): the attention sink, which takes much of every query's
  attention and whose key differs from the rest (KVQuant, IntactKV); quantizing it costs KIVI-2 a
  third of its KLD on the embedded default;
- a window of the ``residual`` most recent tokens (default 128 for KIVI, 0 otherwise), leaving it
  in whole blocks of ``block`` tokens for KIVI (keys are grouped over tokens) and one by one
  otherwise.

Reads: with ``new_tokens="exact"`` (default) the tokens of one `update` attend to each other as
computed and to everything cached before as stored, which is what KIVI, transformers'
QuantizedCache and a serving engine's prefill do (the states exist before they are written);
``new_tokens="stored"`` returns every state decoded from storage (a stricter write-then-read).
Reads decode the whole history; the stored tensors stay compressed between steps. `nbytes()` is
measured from the stored tensors (element_size * numel).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.errors import SchemeError
from lowbit.runtime import kv_quant as Q

KV_KINDS = ("none", "int8", "fp8", "int4", "kivi2", "kivi4")
_ALIASES = {"fp16": "none", "bf16": "none", "fp32": "none"}
_RESIDUAL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "same": None}


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """How a KV cache stores keys and values; validated on construction. `None` fields take the
    kind's default: residual 128 for KIVI, else 0; sink 1 for quantized kinds; clip "mse" at 2 bits."""

    kind: str = "none"
    granularity: str = "token"      # int8/fp8: "token" (per token per head), "group" (per token per
                                    # group of group_size channels) or "head"
    group_size: int = 32            # int4 and KIVI values: channels per group along head_dim
    block: int = 32                 # KIVI: tokens per key block (G), the unit that leaves the window
    residual: int | None = None     # most recent tokens kept in full precision (R)
    residual_dtype: str = "float16"  # sink and window: float16 | bfloat16 | same (the model's dtype, exact)
    sink: int | None = None         # first tokens kept in full precision
    clip: str | None = None         # int4/KIVI ranges: "minmax" | "mse" (see kv_quant)
    symmetric: bool = True          # int8: absmax scales (True) or min-max ranges with a minimum
    new_tokens: str = "exact"       # "exact" | "stored": how an update's own tokens are read

    def __post_init__(self):
        kind = _ALIASES.get(self.kind, self.kind)
        object.__setattr__(self, "kind", kind)
        if kind not in KV_KINDS:
            raise SchemeError(f"unknown KV cache kind {self.kind!r}; choose one of: {', '.join(KV_KINDS)}")
        kivi = kind in ("kivi2", "kivi4")
        if self.residual is None:
            object.__setattr__(self, "residual", 128 if kivi else 0)
        if self.sink is None:
            object.__setattr__(self, "sink", 0 if kind == "none" else 1)
        if self.clip is None:
            object.__setattr__(self, "clip", "mse" if kind == "kivi2" else "minmax")
        if self.granularity not in ("token", "group", "head"):
            raise SchemeError(f"KV granularity must be 'token', 'group' or 'head', got {self.granularity!r}")
        if self.granularity != "token" and kind not in ("int8", "fp8"):
            raise SchemeError(f"granularity {self.granularity!r} applies to int8/fp8 KV caches, not {kind}")
        if self.group_size < 4 or self.group_size % 4:
            raise SchemeError(f"KV group size must be a positive multiple of 4, got {self.group_size}")
        if self.block < 1:
            raise SchemeError(f"KIVI block (tokens per key group) must be at least 1, got {self.block}")
        if self.residual < 0:
            raise SchemeError(f"KV residual window must be 0 or more tokens, got {self.residual}; pass --kv-residual R")
        if self.sink < 0:
            raise SchemeError(f"KV sink must be 0 or more tokens, got {self.sink}; pass --kv-sink N")
        if kind == "none" and (self.residual or self.sink):
            raise SchemeError("a full-precision KV cache has no sink or residual window; drop --kv-sink/--kv-residual")
        if self.residual_dtype not in _RESIDUAL_DTYPES:
            raise SchemeError(f"KV residual dtype must be one of {', '.join(_RESIDUAL_DTYPES)}, got {self.residual_dtype!r}")
        if self.clip not in Q.CLIPS:
            raise SchemeError(f"KV range clip must be one of {', '.join(Q.CLIPS)}, got {self.clip!r}")
        if not self.symmetric and (kind != "int8" or self.granularity == "head"):
            raise SchemeError(f"an asymmetric KV cache is int8 per token or per group; {kind} "
                              f"{'per head ' if kind == 'int8' else ''}is symmetric: drop --kv-asym")
        if self.clip == "mse" and kind in ("int8", "fp8") and self.symmetric:
            raise SchemeError(f"--kv-clip mse searches asymmetric ranges (int4, kivi2, kivi4, int8 with --kv-asym); "
                              f"{kind} uses absmax scales")
        if self.new_tokens not in ("exact", "stored"):
            raise SchemeError(f"KV new_tokens must be 'exact' or 'stored', got {self.new_tokens!r}")

    def check_head_dim(self, head_dim: int) -> None:
        """Refuse a head_dim the groups do not divide (no silent fallback)."""
        grouped = self.kind in ("int4", "kivi2", "kivi4") or self.granularity == "group"
        if grouped and head_dim % self.group_size:
            raise SchemeError(f"{self.kind} KV groups of {self.group_size} channels do not divide head_dim {head_dim}; "
                              f"use a group size that divides it, or --kv int8/fp8")

    def label(self) -> str:
        if self.kind == "none":
            return "full precision"
        if self.kind in ("int8", "fp8"):
            parts = [f"{self.kind} g{self.group_size}" if self.granularity == "group" else f"{self.kind} per-{self.granularity}"]
            if not self.symmetric:
                parts.append("asym")
        elif self.kind == "int4":
            parts = [f"int4 g{self.group_size} asym"]
        else:
            parts = [f"{self.kind} G{self.block} g{self.group_size}"]
        if self.residual:
            parts.append(f"R{self.residual}")
        if self.sink:
            parts.append(f"sink{self.sink}")
        if self.clip == "mse":
            parts.append("mse")
        if self.new_tokens == "stored":
            parts.append("read-back")
        return " ".join(parts)

    def bytes_per_head(self, tokens: int, head_dim: int, full_bytes: int = 2) -> int:
        """Bytes one layer's KV head holds for `tokens` tokens of one sequence."""
        rd = _RESIDUAL_DTYPES[self.residual_dtype]
        return Q.kv_bytes_per_head(self.kind, tokens, head_dim, granularity=self.granularity,
                                   group_size=self.group_size, block=self.block, residual=self.residual,
                                   sink=self.sink, symmetric=self.symmetric, full_bytes=full_bytes,
                                   residual_bytes=full_bytes if rd is None else rd.itemsize)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def layer_kind(self) -> str:
        """The storage layout: the kind, or "int8-asym" for min-max int8."""
        return self.kind if self.symmetric else self.kind + "-asym"


_LAYERS: dict[str, type["KVLayer"]] = {}


class KVLayer(DynamicLayer):
    """One decoder layer's cache: named stored tensors, each (batch, heads, tokens-ish, ...)."""

    kind: ClassVar[str] = ""
    is_croppable = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            _LAYERS[cls.kind] = cls

    def __init__(self, spec: KVCacheSpec):
        super().__init__()
        self.spec = spec
        self.cumulative_length = 0
        self.stored: dict[str, torch.Tensor] = {}
        self.shape: tuple[int, int, int] | None = None   # (batch, kv_heads, head_dim)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self.spec.check_head_dim(d)
        self.shape = (b, h, d)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new states, then return every cached state decoded (write, then read)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.cumulative_length += n
        self._append(key_states, value_states)
        keys, values = self._read()
        if self.spec.new_tokens == "exact" and n and self.kind != "none":
            keys = torch.cat([keys[..., :-n, :], key_states], dim=-2)
            values = torch.cat([values[..., :-n, :], value_states], dim=-2)
        return keys, values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _cat(self, name: str, t: torch.Tensor) -> None:
        old = self.stored.get(name)
        self.stored[name] = t.contiguous() if old is None else torch.cat([old, t], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes held, measured: sum of element_size * numel of the stored tensors."""
        return sum(t.element_size() * t.numel() for t in self.stored.values())

    def _map(self, fn) -> None:
        self.stored = {name: fn(t) for name, t in self.stored.items()}
        if self.stored and self.shape is not None:
            self.shape = (next(iter(self.stored.values())).shape[0], *self.shape[1:])

    # every stored tensor has the batch on dim 0, so beam search and batch edits are exact on codes
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(f"a {self.spec.kind} KV cache cannot be cropped (assisted decoding needs DynamicCache)")

    def reset(self) -> None:
        self.stored, self.cumulative_length, self.shape, self.is_initialized = {}, 0, None, False
        self.keys = self.values = None


class FullPrecisionLayer(KVLayer):
    """What DynamicLayer stores: the states as given, concatenated along tokens."""

    kind = "none"

    def _append(self, key_states, value_states):
        self._cat("keys", key_states)
        self._cat("values", value_states)

    def _read(self):
        return self.stored["keys"], self.stored["values"]


class QuantizedLayer(KVLayer):
    """The parts every quantized kind shares: the sink, the full-precision window and the order
    of reading (sink, decoded codes, window). Subclasses store and decode a run of tokens."""

    kind = ""
    flush_unit: ClassVar[bool] = False   # True: tokens leave the window in whole `block`s (KIVI)

    def _append(self, key_states, value_states):
        rd = _RESIDUAL_DTYPES[self.spec.residual_dtype] or key_states.dtype
        # the window's older tokens (already rounded to rd) followed by the new ones as given: a
        # token that goes straight to codes is quantized from the states the model computed
        k, v = key_states, value_states
        if "k_window" in self.stored:
            k = torch.cat([self.stored["k_window"].to(k.dtype), k], dim=-2)
            v = torch.cat([self.stored["v_window"].to(v.dtype), v], dim=-2)
        if "k_sink" not in self.stored:
            n_sink = self.spec.sink
            if k.shape[-2] < n_sink:      # the sink is not complete yet: everything waits in the window
                self.stored["k_window"], self.stored["v_window"] = k.to(rd).contiguous(), v.to(rd).contiguous()
                return
            self.stored["k_sink"], self.stored["v_sink"] = k[..., :n_sink, :].to(rd).contiguous(), v[..., :n_sink, :].to(rd).contiguous()
            k, v = k[..., n_sink:, :], v[..., n_sink:, :]
        n_flush, _ = Q.kivi_split(k.shape[-2], self.spec.residual, self.spec.block if self.flush_unit else 1)
        if n_flush:
            self._store(k[..., :n_flush, :], v[..., :n_flush, :])
        self.stored["k_window"] = k[..., n_flush:, :].to(rd).contiguous()
        self.stored["v_window"] = v[..., n_flush:, :].to(rd).contiguous()

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize a run of tokens and append its codes and scales."""
        raise NotImplementedError

    def _decode(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every quantized token decoded, (B, H, Tq, D) in the model's dtype; None if none yet."""
        raise NotImplementedError

    def quantized_length(self) -> int:
        """Tokens held as codes (the rest are the sink and the full-precision window)."""
        codes = self.stored.get("k_codes")
        return 0 if codes is None else codes.shape[-2]

    def _read(self):
        s = self.stored
        decoded = self._decode() if "k_codes" in s else None
        parts_k = [s["k_sink"].to(self.dtype)] if "k_sink" in s else []
        parts_v = [s["v_sink"].to(self.dtype)] if "v_sink" in s else []
        if decoded is not None:
            parts_k.append(decoded[0])
            parts_v.append(decoded[1])
        parts_k.append(s["k_window"].to(self.dtype))
        parts_v.append(s["v_window"].to(self.dtype))
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)


class AbsmaxLayer(QuantizedLayer):
    """int8 or fp8 codes with fp16 absmax scales per token per head, per token per group of
    channels, or per head."""

    kind = ""
    _codec: ClassVar[tuple] = ()   # (qmax, quantize, dequantize)

    def _store(self, key_states, value_states):
        qmax, quantize, _ = self._codec
        for name, x in (("k", key_states), ("v", value_states)):
            if self.spec.granularity == "token":
                scale = Q.absmax_scale(x, qmax, dims=(-1,))             # (B, H, T, 1)
                self._cat(name + "_scale", scale)
            elif self.spec.granularity == "group":
                *lead, d = x.shape
                xg = x.reshape(*lead, d // self.spec.group_size, self.spec.group_size)
                scale = Q.absmax_scale(xg, qmax, dims=(-1,))            # (B, H, T, D/g, 1)
                self._cat(name + "_scale", scale.squeeze(-1))
                self._cat(name + "_codes", quantize(xg, scale).reshape(x.shape))
                continue
            else:  # per head: fitted on the first states stored (the prefill's), then frozen
                if name + "_scale" not in self.stored:
                    self.stored[name + "_scale"] = Q.absmax_scale(x, qmax, dims=(-2, -1))  # (B, H, 1, 1)
                scale = self.stored[name + "_scale"]
            self._cat(name + "_codes", quantize(x, scale))               # (B, H, T, D)

    def _decode(self):
        _, _, dequantize = self._codec
        out = []
        for n in ("k", "v"):
            codes, scale = self.stored[n + "_codes"], self.stored[n + "_scale"]
            if self.spec.granularity == "group":
                *lead, d = codes.shape
                grouped = codes.reshape(*lead, scale.shape[-1], d // scale.shape[-1])
                out.append(dequantize(grouped, scale.unsqueeze(-1), self.dtype).reshape(codes.shape))
            else:
                out.append(dequantize(codes, scale, self.dtype))
        return tuple(out)


class Int8Layer(AbsmaxLayer):
    kind = "int8"
    _codec = (Q.INT8_MAX, Q.quantize_int8, Q.dequantize_int8)


class Fp8Layer(AbsmaxLayer):
    kind = "fp8"
    _codec = (Q.FP8_MAX, Q.quantize_fp8, Q.dequantize_fp8)


class Int4Layer(QuantizedLayer):
    """4-bit asymmetric groups along head_dim, codes packed two per byte."""

    kind = "int4"
    bits = 4

    def _group(self, head_dim: int) -> int:
        return self.spec.group_size

    def _store(self, key_states, value_states):
        group = self._group(key_states.shape[-1])
        for name, x in (("k", key_states), ("v", value_states)):
            codes, scale, minimum = Q.quantize_token_groups(x, self.bits, group, self.spec.clip)
            self._cat(name + "_codes", codes)      # (B, H, T, D/2) uint8
            self._cat(name + "_scale", scale)      # (B, H, T, D/group) fp16
            self._cat(name + "_min", minimum)      # (B, H, T, D/group) fp16

    def _decode(self):
        return tuple(Q.dequantize_token_groups(self.stored[n + "_codes"], self.stored[n + "_scale"],
                                               self.stored[n + "_min"], self.bits, self.dtype) for n in ("k", "v"))


class Int8AsymLayer(Int4Layer):
    """int8 with min-max ranges per token (over head_dim) or per group of channels: one code per
    byte, an fp16 scale and minimum per range."""

    kind = "int8-asym"
    bits = 8

    def _group(self, head_dim: int) -> int:
        return self.spec.group_size if self.spec.granularity == "group" else head_dim


class KiviLayer(QuantizedLayer):
    """KIVI-2: keys per channel over blocks of G tokens, values per token in groups, a window of
    the R most recent tokens in full precision; whole blocks move from the window to storage."""

    kind = "kivi2"
    bits = 2
    flush_unit = True

    def _store(self, keys, values):
        k_codes, k_scale, k_min = Q.quantize_channel_blocks(keys, self.bits, self.spec.block, self.spec.clip)
        v_codes, v_scale, v_min = Q.quantize_token_groups(values, self.bits, self.spec.group_size, self.spec.clip)
        self._cat("k_codes", k_codes)   # (B, H, Tq, D*bits/8) uint8
        self._cat("k_scale", k_scale)   # (B, H, Tq/G, D) fp16: one per channel per block
        self._cat("k_min", k_min)
        self._cat("v_codes", v_codes)   # (B, H, Tq, D*bits/8) uint8
        self._cat("v_scale", v_scale)   # (B, H, Tq, D/group) fp16: per token per group
        self._cat("v_min", v_min)

    def _decode(self):
        s = self.stored
        k = Q.dequantize_channel_blocks(s["k_codes"], s["k_scale"], s["k_min"], self.bits, self.dtype)
        v = Q.dequantize_token_groups(s["v_codes"], s["v_scale"], s["v_min"], self.bits, self.dtype)
        return k, v


class Kivi4Layer(KiviLayer):
    """The KIVI layout at 4 bits."""

    kind = "kivi4"
    bits = 4


def _geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


class QuantizedKVCache(Cache):
    """A transformers Cache whose layers store keys and values as `spec` says."""

    def __init__(self, spec: KVCacheSpec | str = "none", config=None, **spec_fields):
        if isinstance(spec, str):
            spec = KVCacheSpec(spec, **spec_fields)
        elif spec_fields:
            spec = dataclasses.replace(spec, **spec_fields)
        self.spec = spec
        layer_cls = _LAYERS[spec.layer_kind]
        if config is None:
            super().__init__(layer_class_to_replicate=functools.partial(layer_cls, spec))
            return
        config = config.get_text_config(decoder=True)
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds - {"full_attention"}:
            raise SchemeError(f"the quantized KV cache supports full-attention layers only; this model has {sorted(kinds)}")
        n_layers, _, head_dim = _geometry(config)
        spec.check_head_dim(head_dim)
        super().__init__(layers=[layer_cls(spec) for _ in range(n_layers)])

    def nbytes(self) -> int:
        """Bytes held by every layer, measured from the stored tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_bytes(self) -> int:
        """Bytes a 16-bit cache holding the same tokens would take (the reference of ratios)."""
        total = 0
        for layer in self.layers:
            if layer.shape is not None:
                b, h, d = layer.shape
                total += 2 * b * h * layer.get_seq_length() * d * 2
        return total


def make_cache(spec: KVCacheSpec, config) -> Cache:
    """A fresh cache for one sequence batch (a factory for eval and generate)."""
    return QuantizedKVCache(spec, config)
