"""Architecture knowledge as data: which Linears read the output of which previous op inside a
decoder layer ("smoothing groups"), so AWQ and SmoothQuant can move a per-input-channel scale
s from the Linears' inputs into the op before them without knowing any architecture.

Folding s: the previous op's output is divided by s (a norm: weight and bias /= s; a Linear or
Conv1D: its output rows and bias /= s) and the following Linears' input columns are multiplied
by s; the model computes the same function before quantization.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from lowbit.model.targets import _is_conv1d
from lowbit.tensor import from_matrix, to_matrix


@dataclasses.dataclass(frozen=True)
class SmoothingPattern:
    """One (previous op -> Linears reading its output) pattern, names relative to a decoder layer.

    requires:    other modules that must exist (up_proj -> down_proj is linear in up_proj's
                 output only in a gated MLP: act(gate(x)) * up(x));
    homogeneous: an activation between prev and the Linears that must satisfy f(c x) = c f(x)
                 for c > 0 (ReLU); checked numerically;
    layer_flag:  a layer attribute that must be true where present (OPT's do_layer_norm_before:
                 a post-norm feeds the residual stream too, so it cannot absorb a scale)."""

    prev: str
    linears: tuple[str, ...]
    requires: tuple[str, ...] = ()
    homogeneous: str | None = None
    layer_flag: str | None = None


SMOOTHING_PATTERNS: tuple[SmoothingPattern, ...] = (
    # LLaMA / Mistral / Qwen2 (and most RMSNorm decoders)
    SmoothingPattern("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    # attention is linear in v per channel; needs v out == o in (no GQA head repetition)
    SmoothingPattern("self_attn.v_proj", ("self_attn.o_proj",)),
    SmoothingPattern("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothingPattern("mlp.up_proj", ("mlp.down_proj",), requires=("mlp.gate_proj",)),
    # GPT-2 (Conv1D)
    SmoothingPattern("ln_1", ("attn.c_attn",)),
    SmoothingPattern("ln_2", ("mlp.c_fc",)),
    # OPT
    SmoothingPattern("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     layer_flag="do_layer_norm_before"),
    SmoothingPattern("self_attn.v_proj", ("self_attn.out_proj",)),
    SmoothingPattern("final_layer_norm", ("fc1",), layer_flag="do_layer_norm_before"),
    SmoothingPattern("fc1", ("fc2",), homogeneous="activation_fn"),
)

# AutoAWQ does not clip the weights whose outputs go through a softmax (query/key): their error
# matters through attention scores, not through the Linear's output
NO_CLIP_PATTERNS: tuple[str, ...] = (r"\bq_proj\b", r"\bk_proj\b", r"\bquery\b", r"\bkey\b", r"\bc_attn\b", r"\bWqkv\b")


class SmoothingGroup(NamedTuple):
    prev: torch.nn.Module
    prev_name: str            # full module name
    linears: list[str]        # full module names of the Linears reading prev's output


def _get(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a Linear or Conv1D (a view for Linear, a transposed view for Conv1D)."""
    return to_matrix(module.weight.data, _is_conv1d(module))


def _set_weight_matrix(module: torch.nn.Module, W: torch.Tensor) -> None:
    w = module.weight
    w.data.copy_(from_matrix(W.to(w.dtype), tuple(w.shape), _is_conv1d(module)))


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def _out_features(module: torch.nn.Module) -> int | None:
    if _is_linear(module):
        return weight_matrix(module).shape[0]
    w = getattr(module, "weight", None)
    return w.shape[0] if isinstance(w, torch.Tensor) and w.ndim == 1 else None


@torch.no_grad()
def _scales_with_weight(norm: torch.nn.Module) -> bool:
    """Whether scaling a norm's weight and bias by c scales its output by c (LayerNorm, RMSNorm;
    not Gemma's x * (1 + weight))."""
    w = norm.weight
    b = getattr(norm, "bias", None)
    b = b if isinstance(b, torch.Tensor) else None
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.dtype)
    try:
        y1 = norm(x).float()
        w.mul_(2)
        if b is not None:
            b.mul_(2)
        y2 = norm(x).float()
    except Exception:  # a norm with another signature: do not fold into it
        return False
    finally:
        w.div_(2)
        if b is not None:
            b.div_(2)
    return bool(torch.allclose(y2, 2 * y1, rtol=1e-3, atol=1e-5))


@torch.no_grad()
def _positively_homogeneous(act: torch.nn.Module) -> bool:
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    try:
        return bool(torch.allclose(act(3.0 * x), 3.0 * act(x), rtol=1e-5, atol=1e-6))
    except Exception:
        return False


def smoothing_groups(layer: torch.nn.Module, layer_prefix: str) -> list[SmoothingGroup]:
    """The smoothing groups of one decoder layer: patterns whose modules all exist, whose shapes
    line up (prev's output width == every Linear's input width) and whose prev op can absorb a
    per-channel scale. Names are full module names (layer_prefix + relative path)."""
    found = []
    for p in SMOOTHING_PATTERNS:
        prev = _get(layer, p.prev)
        linears = [_get(layer, n) for n in p.linears]
        if prev is None or any(m is None or not _is_linear(m) for m in linears):
            continue
        if any(_get(layer, r) is None for r in p.requires):
            continue
        if p.layer_flag is not None and not getattr(layer, p.layer_flag, True):
            continue
        if p.homogeneous is not None:
            act = _get(layer, p.homogeneous)
            if act is None or not _positively_homogeneous(act):
                continue
        width = _out_features(prev)
        if width is None or any(weight_matrix(m).shape[1] != width for m in linears):
            continue  # e.g. v_proj -> o_proj under grouped-query attention
        if not _is_linear(prev) and not _scales_with_weight(prev):
            continue
        pre = f"{layer_prefix}." if layer_prefix else ""
        found.append(SmoothingGroup(prev, pre + p.prev, [pre + n for n in p.linears]))
    return found


@torch.no_grad()
def fold_scales(prev: torch.nn.Module, linears: list[torch.nn.Module], s: torch.Tensor) -> None:
    """Divide prev's output by s (in,) and multiply the Linears' input columns by s, in place;
    the composed function is unchanged."""
    s = s.float()
    if _is_linear(prev):
        W = weight_matrix(prev).float()
        _set_weight_matrix(prev, W / s[:, None])
    else:
        prev.weight.data.copy_((prev.weight.float() / s).to(prev.weight.dtype))
    b = getattr(prev, "bias", None)
    if isinstance(b, torch.Tensor):
        b.data.copy_((b.float() / s).to(b.dtype))
    for m in linears:
        _set_weight_matrix(m, weight_matrix(m).float() * s)


def decoder_layer_of(model: torch.nn.Module, module_name: str) -> tuple[str, torch.nn.Module]:
    """(name, module) of the decoder layer holding `module_name`: the shortest prefix whose
    parent is a ModuleList (model.layers.3, transformer.h.0, model.decoder.layers.1)."""
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[: i - 1])) if i > 1 else model
        child = getattr(parent, parts[i - 1], None)
        if isinstance(child, torch.nn.ModuleList):
            name = ".".join(parts[: i + 1])
            return name, model.get_submodule(name)
    return "", model


@dataclasses.dataclass(frozen=True)
class RotationLayout:
    """How one decoder-layer family touches the residual stream, names relative to a layer:
    `reads`: each norm on the stream and the Linears that read its output; `writes`: the Linears
    whose outputs are added to the stream; `values`: a (value projection, output projection)
    pair whose per-head space a second rotation may transform; `inert`: parameterised modules
    that act off the stream (per-head q/k norms), left as they are."""

    reads: tuple[tuple[str, tuple[str, ...]], ...]
    writes: tuple[str, ...]
    values: tuple[str, str] | None = None
    inert: tuple[str, ...] = ()


ROTATION_LAYOUTS: tuple[RotationLayout, ...] = (
    # LLaMA / Mistral / Qwen2 / Qwen3 / Granite ... (pre-norm, separate projections)
    RotationLayout(reads=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
                   writes=("self_attn.o_proj", "mlp.down_proj"),
                   values=("self_attn.v_proj", "self_attn.o_proj"),
                   inert=("self_attn.q_norm", "self_attn.k_norm")),
    # Phi-3 (fused qkv and gate/up projections)
    RotationLayout(reads=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
                   writes=("self_attn.o_proj", "mlp.down_proj")),
)

# the norm after the last decoder layer, where the head reads the stream
FINAL_NORMS: tuple[str, ...] = ("model.norm", "model.language_model.norm", "transformer.ln_f",
                                "model.decoder.final_layer_norm", "model.final_layernorm")
