"""What AWQ and SmoothQuant share: the smoothing groups of a decoder layer resolved against the
layer's targets and calibration statistics, folding a scale with its statistics, and the plain
rounding (RTN or GPTQ) of the folded weights.

Statistics are collected before any folding. Folding s into a group divides that group's input
by s per channel, so the group's InputStats are replaced by scaled copies (absmax, abssum,
sample columns / s; Hessian diag(1/s) H diag(1/s)): exact, no re-collection. Folding never
changes another group's input (a Linear's output scale only reaches the Linears reading it).
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.calib.runner import InputStats
from lowbit.model.arch import decoder_layer_of, fold_scales, smoothing_groups
from lowbit.model.targets import WeightTarget
from lowbit.scheme import scheme_of
from lowbit.tensor import QuantizedTensor, to_matrix

ROUNDINGS = ("rtn", "gptq")


@dataclasses.dataclass
class Group:
    """A smoothing group resolved for one layer: the op before, and the targets reading its output."""

    prev: torch.nn.Module
    prev_name: str
    members: list[WeightTarget]


def resolve_groups(model: torch.nn.Module, layer_targets: list[WeightTarget],
                   stats: dict[str, InputStats]) -> list[Group]:
    """The layer's smoothing groups that can be folded safely: every Linear of the pattern is a
    target with observed input, they all share one InputStats object (one input tensor), and no
    other target of the layer reads that tensor (a parallel block feeding attention and MLP from
    one norm would otherwise see its MLP change)."""
    observed = [t for t in layer_targets if t.kind in ("linear", "conv1d") and t.name in stats]
    if not observed:
        return []
    layer_name, layer = decoder_layer_of(model, observed[0].module_name)
    by_module = {t.module_name: t for t in observed}
    out = []
    for g in smoothing_groups(layer, layer_name):
        members = [by_module.get(n) for n in g.linears]
        if any(m is None for m in members):
            continue
        st = stats[members[0].name]
        if any(stats[m.name] is not st for m in members):
            continue
        readers = {t.name for t in observed if stats[t.name] is st}
        if readers != {m.name for m in members}:
            continue
        out.append(Group(g.prev, g.prev_name, members))
    return out


def scaled_stats(st: InputStats, s: torch.Tensor) -> InputStats:
    """Statistics of X / s (per input channel) from those of X (made final first)."""
    s = s.float()
    st.finish()
    return InputStats(
        n_tokens=st.n_tokens,
        hessian=None if st.hessian is None else st.hessian / s[:, None] / s[None, :],
        absmax=None if st.absmax is None else st.absmax / s,
        abssum=None if st.abssum is None else st.abssum / s,
        sample=None if st.sample is None else st.sample / s,
        finished=True,
    )


def fold_group(model: torch.nn.Module, group: Group, s: torch.Tensor, stats: dict[str, InputStats]) -> None:
    """Fold s into the model (prev output / s, members' input columns * s) and replace the
    group's shared statistics in `stats` by those of the scaled input."""
    fold_scales(group.prev, [model.get_submodule(m.module_name) for m in group.members], s)
    old = stats[group.members[0].name]
    new = scaled_stats(old, s)
    for name in [n for n, v in stats.items() if v is old]:
        stats[name] = new


def matrix(model: torch.nn.Module, t: WeightTarget) -> torch.Tensor:
    """The target's weight as a float32 (out, in) matrix (a copy)."""
    return to_matrix(t.parameter(model).data, t.transposed).float().clone()


def gptq_round(model: torch.nn.Module, targets: list[WeightTarget], stats: dict[str, InputStats],
               scheme, refit: int = 0) -> dict[str, QuantizedTensor]:
    """GPTQ (default options; `refit` rounds of scale refitting) of targets with observed
    Hessians, weights sharing an input solved together."""
    from lowbit.methods import gptq

    groups: dict[tuple, list[WeightTarget]] = {}
    for t in targets:
        groups.setdefault((id(stats[t.name]), scheme_of(scheme, t.name)), []).append(t)
    out = {}
    for (_, ws), members in groups.items():
        H = stats[members[0].name].hessian
        mats = [matrix(model, t) for t in members]
        solved = gptq.quantize_weights_sharing_input(mats, H, ws, gptq.Options(refit=refit))
        for t, (codes, params, g) in zip(members, solved):
            out[t.name] = gptq.to_quantized_tensor(codes, params, g, ws, t.parameter(model).shape, t.transposed)
    return out


def rtn_for_unobserved(model, layer_targets, stats, scheme) -> tuple[dict, list[str]]:
    """RTN for the targets no input was observed for (stacked experts); their names are
    returned as fallbacks for the recipe."""
    from lowbit.methods import rtn
    from lowbit.scheme import scheme_of

    out = {t.name: rtn.quantize_weight(t.parameter(model).data, scheme_of(scheme, t.name), t.transposed)
           for t in layer_targets if stats.get(t.name) is None}
    return out, list(out)
