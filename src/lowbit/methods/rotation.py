"""Rotations as an equivalence transform (QuaRot's offline rotations R1 and R2).

For an orthogonal Q, a model whose residual stream carries x·Q instead of x computes the same
function when every reader of the stream multiplies by Qᵀ first and every writer by Q after.
RMSNorm commutes with Q once its per-channel weight has been folded into the Linears that read
it (‖xQ‖ = ‖x‖), so:

    norms:     W_reader <- W_reader · diag(g), g <- 1       (final norm: into the head)
    R1:        embeddings E <- E·Q; readers W <- W·Q; writers W <- Qᵀ·W, b <- b·Q; head W <- W·Q
    R2:        per head, v_proj rows <- Hᵀ·W_v,h and o_proj columns <- W_o,h·H (attention is linear in V)

The result is a plain checkpoint of the same architecture (a tied head is untied: it now reads
g-scaled, rotated features the embedding does not hold). Rotated weights have no outlier
channels left to dominate a group's scale, which is why rounding them after the rotation loses
less. Which modules read and write the stream is data (`model.arch.ROTATION_LAYOUTS`); anything
in a layer that the layout does not name is refused, and the rotated model's logits are checked
against the original's before anything is quantized.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError
from lowbit.hadamard import rotation
from lowbit.model.arch import FINAL_NORMS, ROTATION_LAYOUTS, RotationLayout, _get, weight_matrix

KINDS = ("hadamard",)
# relative logit change a float32 rotation may leave (double-precision products, one rounding to fp32)
TOLERANCE = 1e-3
# elements of the embedding and head transformed per step (float64 temporaries of 32 MB)
ROW_BLOCK_ELEMENTS = 1 << 22


class RotationError(SchemeError):
    """The model cannot be rotated exactly (say why and what would)."""


def _row_blocks(W: torch.Tensor) -> list[torch.Tensor]:
    """Views of W's rows, about ROW_BLOCK_ELEMENTS at a time."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, W.shape[1]))
    return [W[r: r + step] for r in range(0, W.shape[0], step)]


def _column_blocks(W: torch.Tensor) -> list[torch.Tensor]:
    """Views of W's columns, about ROW_BLOCK_ELEMENTS at a time."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, W.shape[0]))
    return [W[:, c: c + step] for c in range(0, W.shape[1], step)]


def _unit_value(norm: torch.nn.Module) -> float:
    """The weight value that makes this norm a plain x / rms(x): 1 for RMSNorm's x·w, 0 for
    Gemma's x·(1 + w). Anything else (LayerNorm subtracts the mean; a bias shifts it) cannot
    commute with a rotation."""
    w = getattr(norm, "weight", None)
    name = type(norm).__name__
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        raise RotationError(f"{name} has no per-channel weight to fold")
    b = getattr(norm, "bias", None)
    if isinstance(b, torch.Tensor) and b.abs().max() > 0:
        raise RotationError(f"{name} adds a bias (LayerNorm): a rotation needs RMSNorm-style norms; "
                            "quantize without --rotate")
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    want = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    saved = w.data.clone()
    try:
        for unit in (1.0, 0.0):
            w.data.fill_(unit)
            with torch.no_grad():
                y = norm(x.to(w.dtype)).double()
            if torch.allclose(y, want, rtol=1e-3, atol=1e-3):
                return unit
    finally:
        w.data.copy_(saved)
    centred = x - x.mean(-1, keepdim=True)
    hint = " (LayerNorm subtracts the mean)" if torch.allclose(y, centred / centred.pow(2).mean(-1, keepdim=True).sqrt(),
                                                               rtol=1e-3, atol=1e-3) else ""
    raise RotationError(f"{name} is not x / rms(x) · weight{hint}: a rotation needs RMSNorm-style norms; "
                        "quantize without --rotate")


def _fold_norm(norm: torch.nn.Module, readers: list[torch.nn.Module]) -> None:
    """Move a norm's per-channel gain into the Linears that read it; the norm becomes x / rms(x)."""
    unit = _unit_value(norm)
    g = norm.weight.data.double() + (1.0 - unit)
    for m in readers:
        for blk in _row_blocks(weight_matrix(m)):
            blk.copy_((blk.double() * g[None, :]).to(blk.dtype))
    norm.weight.data.fill_(unit)


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList holding the decoder layers: the one with the most parameters."""
    best = max(((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)),
               key=lambda nm: sum(p.numel() for p in nm[1].parameters()), default=None)
    if best is None:
        raise RotationError(f"{type(model).__name__} has no list of decoder layers")
    return best


def _layout(layer: torch.nn.Module, where: str) -> RotationLayout:
    for lay in ROTATION_LAYOUTS:
        names = [n for n, _ in lay.reads] + [r for _, rs in lay.reads for r in rs] + list(lay.writes)
        if all(_get(layer, n) is not None for n in names):
            covered = set(names) | {n for n in lay.inert if _get(layer, n) is not None}
            # every parameter of the layer must belong to a module the layout names
            stray = sorted({pn.rsplit(".", 1)[0] for pn, _ in layer.named_parameters()
                            if not any(pn == c or pn.startswith(c + ".") for c in covered)})
            if stray:
                raise RotationError(f"{where} has {', '.join(stray[:3])} ({type(layer.get_submodule(stray[0])).__name__}), "
                                    "which lowbit's rotation table does not place on the residual stream; "
                                    "quantize without --rotate")
            return lay
    layer_norms = sorted(n for n, m in layer.named_modules() if isinstance(m, torch.nn.LayerNorm))
    if layer_norms:
        raise RotationError(f"{where} normalises with LayerNorm ({', '.join(layer_norms)}), which subtracts the mean "
                            "and does not commute with a rotation; lowbit rotates RMSNorm models; quantize without --rotate")
    kids = ", ".join(n for n, _ in layer.named_children())
    raise RotationError(f"no rotation layout matches {where} ({type(layer).__name__}: {kids}); "
                        "quantize without --rotate")


# Every transform below works in place on float64 copies of a block of rows or columns at a
# time, the same blocks resident or streamed, so a 7B layer needs no full-size float64 copies.

def _rotate_inputs(m: torch.nn.Module, Q: torch.Tensor) -> None:
    """W <- W·Q (rows are independent)."""
    for blk in _row_blocks(weight_matrix(m)):
        blk.copy_((blk.double() @ Q).to(blk.dtype))


def _rotate_outputs(m: torch.nn.Module, Q: torch.Tensor) -> None:
    """W <- Qᵀ·W (columns are independent), b <- b·Q."""
    for blk in _column_blocks(weight_matrix(m)):
        blk.copy_((Q.T @ blk.double()).to(blk.dtype))
    b = getattr(m, "bias", None)
    if isinstance(b, torch.Tensor):
        b.data.copy_((b.data.double() @ Q).to(b.dtype))


def _head_dim(config, width: int) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else width // int(config.num_attention_heads)


def _rotate_values(v: torch.nn.Module, o: torch.nn.Module, H: torch.Tensor, hd: int) -> None:
    """Per head h: v_proj rows W_v,h <- Hᵀ·W_v,h, o_proj columns W_o,h <- W_o,h·H."""
    for head in weight_matrix(v).split(hd, 0):
        for blk in _column_blocks(head):
            blk.copy_((H.T @ blk.double()).to(blk.dtype))
    for head in weight_matrix(o).split(hd, 1):
        for blk in _row_blocks(head):
            blk.copy_((blk.double() @ H).to(blk.dtype))
    b = getattr(v, "bias", None)
    if isinstance(b, torch.Tensor):
        b.data.copy_(torch.cat([blk @ H for blk in b.data.double().split(hd)]).to(b.dtype))


def probe_ids(model: torch.nn.Module) -> torch.Tensor:
    """The tokens whose logits must not change."""
    vocab = model.get_input_embeddings().weight.shape[0]
    return (torch.arange(24) * 7919 % vocab)[None, :]


def _probe_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(probe_ids(model), use_cache=False).logits.double()


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise SchemeError(f"--rotate {kind}: lowbit has {', '.join(KINDS)} rotations (learned, SpinQuant-style "
                          "rotations are not implemented); use --rotate hadamard")


@dataclasses.dataclass
class Rotation:
    """What rotating a model needs, found from its structure alone (the model may be on meta):
    its embedding, head and final norm, its decoder layers and their layouts, the residual
    rotation Q and the per-head one H (None without a value/output pair)."""

    emb: torch.nn.Module
    head: torch.nn.Module
    final: torch.nn.Module
    layers_name: str
    layers: torch.nn.ModuleList
    layouts: list[RotationLayout]
    Q: torch.Tensor
    H: torch.Tensor | None
    info: dict

    def norms(self) -> list[torch.nn.Module]:
        """Every norm on the stream (each must be x / rms(x) · weight)."""
        return [layer.get_submodule(n) for lay, layer in zip(self.layouts, self.layers) for n, _ in lay.reads] + [self.final]


def plan_rotation(model: torch.nn.Module, kind: str = "hadamard", seed: int = 0) -> Rotation:
    """The rotation of this model, or a RotationError for a structure it cannot rotate exactly.
    Reads no weight values (norms are checked by `check_norms`)."""
    check_kind(kind)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    final = next((model.get_submodule(n) for n in FINAL_NORMS if _get(model, n) is not None), None)
    if emb is None or head is None or final is None:
        raise RotationError(f"{type(model).__name__}: lowbit finds no input embedding, output head or final norm "
                            f"({', '.join(FINAL_NORMS)}) to rotate; quantize without --rotate")
    layers_name, layers = _decoder_layers(model)
    layouts = [_layout(layer, f"{layers_name}.{i}") for i, layer in enumerate(layers)]
    # nothing else may touch the stream (GPT-2's position embeddings, OPT's projections)
    known = [emb, head, final, layers]
    stray = sorted(n for n, p in model.named_parameters()
                   if not any(p is q for m in known for q in m.parameters()))
    if stray:
        raise RotationError(f"{stray[0]} is outside the decoder layers, embeddings, head and final norm; "
                            "lowbit's rotation does not know where it acts; quantize without --rotate")
    Q, how = rotation(emb.weight.shape[1], seed)
    info = {"kind": kind, "seed": seed, "residual": how, "untied_head": False}
    H = None
    values = next(((lay, layer) for lay, layer in zip(layouts, layers) if lay.values is not None), None)
    if values is not None:
        o = values[1].get_submodule(values[0].values[1])
        H, info["per_head"] = rotation(_head_dim(model.config, weight_matrix(o).shape[1]), seed + 1)
    return Rotation(emb, head, final, layers_name, layers, layouts, Q, H, info)


def prepare_rotation(model: torch.nn.Module, kind: str = "hadamard", seed: int = 0) -> Rotation:
    """The rotation of a model whose weights are not read yet (parameters on meta), its head
    untied once: the plan is built on this structure, the streamed run fills in the values
    (streaming.rotate_streamed)."""
    rot = getattr(model, "_lowbit_rotation_plan", None)
    if rot is None or (rot.info["kind"], rot.info["seed"]) != (kind, seed):
        rot = plan_rotation(model, kind, seed)
        untie_head(model, rot)
        model._lowbit_rotation_plan = rot
    return rot


def check_norms(rot: Rotation, norms: list[torch.nn.Module] | None = None) -> None:
    """Each norm (default: all of them, read) must commute with the rotation once folded."""
    for norm in rot.norms() if norms is None else norms:
        _unit_value(norm)


def untie_head(model: torch.nn.Module, rot: Rotation) -> None:
    """Give the head its own weight (on meta too): it will read g-scaled, rotated features that
    the embedding does not hold."""
    head, emb = rot.head, rot.emb
    if head.weight is not emb.weight:
        return
    head.weight = torch.nn.Parameter(head.weight.data.clone(), requires_grad=head.weight.requires_grad)
    rot.info["untied_head"] = True
    config = model.config
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.tie_word_embeddings = False




def rotate_embedding(rot: Rotation) -> None:
    """E <- E·Q, a block of rows at a time."""
    for blk in _row_blocks(rot.emb.weight.data):
        blk.copy_((blk.double() @ rot.Q).to(blk.dtype))


def rotate_head(rot: Rotation) -> None:
    """Fold the final norm's gain into the head, then W <- W·Q, a block of rows at a time."""
    unit = _unit_value(rot.final)
    g = rot.final.weight.data.double() + (1.0 - unit)
    W = weight_matrix(rot.head)
    for blk in _row_blocks(W):
        blk.copy_(((blk.double() * g[None, :]).to(blk.dtype).double() @ rot.Q).to(blk.dtype))
    rot.final.weight.data.fill_(unit)


def rotate_layer(rot: Rotation, i: int) -> None:
    """Fold layer i's norms into its readers, rotate its readers and writers (R1) and its
    value/output pair per head (R2). The layer's weights must be real."""
    lay, layer = rot.layouts[i], rot.layers[i]
    for norm_name, readers in lay.reads:
        mods = [layer.get_submodule(r) for r in readers]
        _fold_norm(layer.get_submodule(norm_name), mods)
        for m in mods:
            _rotate_inputs(m, rot.Q)
    for w in lay.writes:
        _rotate_outputs(layer.get_submodule(w), rot.Q)
    if lay.values is not None:
        v, o = (layer.get_submodule(n) for n in lay.values)
        _rotate_values(v, o, rot.H, rot.H.shape[0])


def logit_change(before: torch.Tensor, after: torch.Tensor, model: torch.nn.Module) -> float:
    """The relative change the rotation made to the probe's logits; a RotationError past TOLERANCE."""
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if change > TOLERANCE:
        raise RotationError(f"rotating {type(model).__name__} changed its logits by {change:.2g} (relative); some "
                            "op in its layers does not commute with the rotation; quantize without --rotate")
    return change


@torch.no_grad()
def rotate_model(model: torch.nn.Module, kind: str = "hadamard", seed: int = 0) -> dict:
    """Rotate a model in place (R1 on the residual stream, R2 per attention head) and return what
    was done. Raises RotationError, before changing anything, for a model it cannot rotate exactly
    (and, should the logit check fail after rotating, with the model left rotated)."""
    check_kind(kind)
    if getattr(model, "_lowbit_rotation", None) is not None:
        return model._lowbit_rotation
    rot = plan_rotation(model, kind, seed)
    check_norms(rot)   # every norm before changing anything
    before = _probe_logits(model)
    untie_head(model, rot)
    rotate_head(rot)
    rotate_embedding(rot)
    for i in range(len(rot.layers)):
        rotate_layer(rot, i)
    rot.info["max_relative_logit_change"] = logit_change(before, _probe_logits(model), model)
    model._lowbit_rotation = rot.info
    return rot.info
