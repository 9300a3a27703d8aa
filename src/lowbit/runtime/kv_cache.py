"""A quantized KV cache through transformers' Cache API.

`QuantizedKVCache(spec, config)` is a `transformers.Cache` whose layers hold the real compressed
tensors (int8 / float8_e4m3fn / packed uint8 codes plus fp16 scales), so

    model(ids, cache=cache, use_cache=True)       # `past_key_values=` is the older name
    model.generate(ids, cache=cache)

run on it. Kinds (`KVCacheSpec.kind`):

- ``none`` (alias ``fp16``): stores exactly what DynamicCache stores (the model's dtype);
- ``int8`` / ``fp8``: symmetric, a scale per token per head (absmax over head_dim), or with
  ``granularity="head"`` one scale per head, fitted on the first update (the prefill) and frozen;
- ``int4``: asymmetric groups of ``group_size`` (32) channels along head_dim, two codes per byte;
- ``kivi2``: KIVI-2 (Liu et al. 2024): 2-bit, keys per channel over blocks of ``block`` (G, 32)
  tokens, values per token in groups of ``group_size`` along head_dim, and a full-precision
  window of the ``residual`` (R, 128) most recent tokens. After each update whole blocks of the
  oldest window tokens are quantized while the window would keep at least R tokens without
  them, so the window holds R..R+G-1 tokens once R are cached;
- ``kivi4``: the KIVI layout at 4 bits (keys per channel, values per token), for comparison with
  ``int4``, whose keys are grouped along head_dim (keys have outlier channels, KIVI section 3).

Write, then read: each `update` stores the new states first and returns the states decoded from
storage, so attention (prefill included) always reads what the cache holds. Reads decode the
whole history; the stored tensors stay compressed between steps. `nbytes()` is measured from the
stored tensors (element_size * numel).
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
    """How a KV cache stores keys and values; validated on construction."""

    kind: str = "none"
    granularity: str = "token"      # int8/fp8: "token" (per token per head) or "head"
    group_size: int = 32            # int4 and KIVI values: channels per group along head_dim
    block: int = 32                 # KIVI: tokens per key block (G), the unit that leaves the window
    residual: int = 128             # KIVI: most recent tokens kept in full precision (R)
    residual_dtype: str = "float16"  # KIVI window: float16 | bfloat16 | same (the model's dtype, exact)

    def __post_init__(self):
        kind = _ALIASES.get(self.kind, self.kind)
        object.__setattr__(self, "kind", kind)
        if kind not in KV_KINDS:
            raise SchemeError(f"unknown KV cache kind {self.kind!r}; choose one of: {', '.join(KV_KINDS)}")
        if self.granularity not in ("token", "head"):
            raise SchemeError(f"KV granularity must be 'token' or 'head', got {self.granularity!r}")
        if self.granularity == "head" and kind not in ("int8", "fp8"):
            raise SchemeError(f"granularity 'head' applies to int8/fp8 KV caches, not {kind}")
        if self.group_size < 4 or self.group_size % 4:
            raise SchemeError(f"KV group size must be a positive multiple of 4, got {self.group_size}")
        if self.block < 1:
            raise SchemeError(f"KIVI block (tokens per key group) must be at least 1, got {self.block}")
        if self.residual < 0:
            raise SchemeError(f"KIVI residual window must be 0 or more tokens, got {self.residual}; pass --kv-residual R")
        if self.residual_dtype not in _RESIDUAL_DTYPES:
            raise SchemeError(f"KIVI residual dtype must be one of {', '.join(_RESIDUAL_DTYPES)}, got {self.residual_dtype!r}")

    def check_head_dim(self, head_dim: int) -> None:
        """Refuse a head_dim the groups do not divide (no silent fallback)."""
        if self.kind in ("int4", "kivi2", "kivi4") and head_dim % self.group_size:
            raise SchemeError(f"{self.kind} KV groups of {self.group_size} channels do not divide head_dim {head_dim}; "
                              f"use a group size that divides it, or --kv int8/fp8")

    def label(self) -> str:
        if self.kind == "none":
            return "full precision"
        if self.kind in ("int8", "fp8"):
            return f"{self.kind} per-{self.granularity}"
        if self.kind == "int4":
            return f"int4 g{self.group_size} asym"
        return f"{self.kind} G{self.block} g{self.group_size} R{self.residual}"

    def bytes_per_head(self, tokens: int, head_dim: int, full_bytes: int = 2) -> int:
        """Bytes one layer's KV head holds for `tokens` tokens of one sequence."""
        rd = _RESIDUAL_DTYPES[self.residual_dtype]
        return Q.kv_bytes_per_head(self.kind, tokens, head_dim, granularity=self.granularity,
                                   group_size=self.group_size, block=self.block, residual=self.residual,
                                   full_bytes=full_bytes, residual_bytes=full_bytes if rd is None else rd.itemsize)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        self.cumulative_length += key_states.shape[-2]
        self._append(key_states, value_states)
        return self._read()

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


class AbsmaxLayer(KVLayer):
    """int8 or fp8 codes with fp16 absmax scales per token per head (or per head)."""

    kind = ""
    _codec: ClassVar[tuple] = ()   # (qmax, quantize, dequantize)

    def _append(self, key_states, value_states):
        qmax, quantize, _ = self._codec
        for name, x in (("k", key_states), ("v", value_states)):
            if x.shape[-2] == 0:
                continue
            if self.spec.granularity == "token":
                scale = Q.absmax_scale(x, qmax, dims=(-1,))             # (B, H, T, 1)
                self._cat(name + "_scale", scale)
            else:  # per head: fitted on the first (prefill) states, then frozen
                if name + "_scale" not in self.stored:
                    self.stored[name + "_scale"] = Q.absmax_scale(x, qmax, dims=(-2, -1))  # (B, H, 1, 1)
                scale = self.stored[name + "_scale"]
            self._cat(name + "_codes", quantize(x, scale))               # (B, H, T, D)

    def _read(self):
        _, _, dequantize = self._codec
        return tuple(dequantize(self.stored[n + "_codes"], self.stored[n + "_scale"], self.dtype) for n in ("k", "v"))


class Int8Layer(AbsmaxLayer):
    kind = "int8"
    _codec = (Q.INT8_MAX, Q.quantize_int8, Q.dequantize_int8)


class Fp8Layer(AbsmaxLayer):
    kind = "fp8"
    _codec = (Q.FP8_MAX, Q.quantize_fp8, Q.dequantize_fp8)


class Int4Layer(KVLayer):
    """4-bit asymmetric groups along head_dim, codes packed two per byte."""

    kind = "int4"
    bits = 4

    def _append(self, key_states, value_states):
        for name, x in (("k", key_states), ("v", value_states)):
            codes, scale, minimum = Q.quantize_token_groups(x, self.bits, self.spec.group_size)
            self._cat(name + "_codes", codes)      # (B, H, T, D/2) uint8
            self._cat(name + "_scale", scale)      # (B, H, T, D/group) fp16
            self._cat(name + "_min", minimum)      # (B, H, T, D/group) fp16

    def _read(self):
        return tuple(Q.dequantize_token_groups(self.stored[n + "_codes"], self.stored[n + "_scale"],
                                               self.stored[n + "_min"], self.bits, self.dtype) for n in ("k", "v"))


class KiviLayer(KVLayer):
    """KIVI-2: keys per channel over blocks of G tokens, values per token in groups, a window of
    the R most recent tokens in full precision; whole blocks move from the window to storage."""

    kind = "kivi2"
    bits = 2

    def _append(self, key_states, value_states):
        rd = _RESIDUAL_DTYPES[self.spec.residual_dtype] or key_states.dtype
        self._cat("k_window", key_states.to(rd))
        self._cat("v_window", value_states.to(rd))
        n_window = self.stored["k_window"].shape[-2]
        n_flush, _ = Q.kivi_split(n_window, self.spec.residual, self.spec.block)
        if n_flush == 0:
            return
        kw, vw = self.stored["k_window"], self.stored["v_window"]
        k_codes, k_scale, k_min = Q.quantize_channel_blocks(kw[..., :n_flush, :], self.bits, self.spec.block)
        v_codes, v_scale, v_min = Q.quantize_token_groups(vw[..., :n_flush, :], self.bits, self.spec.group_size)
        self._cat("k_codes", k_codes)   # (B, H, Tq, D*bits/8) uint8
        self._cat("k_scale", k_scale)   # (B, H, Tq/G, D) fp16: one per channel per block
        self._cat("k_min", k_min)
        self._cat("v_codes", v_codes)   # (B, H, Tq, D*bits/8) uint8
        self._cat("v_scale", v_scale)   # (B, H, Tq, D/group) fp16: per token per group
        self._cat("v_min", v_min)
        self.stored["k_window"] = kw[..., n_flush:, :].contiguous()
        self.stored["v_window"] = vw[..., n_flush:, :].contiguous()

    def quantized_length(self) -> int:
        """Tokens held as 2-bit codes (the rest are in the full-precision window)."""
        return self.stored["k_codes"].shape[-2] if "k_codes" in self.stored else 0

    def _read(self):
        kw, vw = self.stored["k_window"].to(self.dtype), self.stored["v_window"].to(self.dtype)
        if "k_codes" not in self.stored:
            return kw, vw
        s = self.stored
        k = Q.dequantize_channel_blocks(s["k_codes"], s["k_scale"], s["k_min"], self.bits, self.dtype)
        v = Q.dequantize_token_groups(s["v_codes"], s["v_scale"], s["v_min"], self.bits, self.dtype)
        return torch.cat([k, kw], dim=-2), torch.cat([v, vw], dim=-2)


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
        layer_cls = _LAYERS[spec.kind]
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
