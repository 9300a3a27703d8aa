"""Per-layer error: relative weight error and relative output error on real inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from lowbit.model.targets import WeightTarget, select_targets
from lowbit.tensor import QuantizedTensor, to_matrix


@dataclasses.dataclass
class LayerError:
    name: str
    weight_rel_err: float         # ||W - Ŵ||_F / ||W||_F
    output_rel_err: float | None  # ||X(W - Ŵ)^T||_F / ||X W^T||_F on captured inputs X


@torch.no_grad()
def _errors(reference: torch.nn.Module, targets: dict[str, WeightTarget], decoded: Callable[[str], torch.Tensor],
            window: torch.Tensor, max_tokens: int) -> list[LayerError]:
    """Errors of each target's decoded matrix (one at a time), with inputs X captured from the
    reference model. Stacked expert weights get no output error: their inputs are routed per expert."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, t in targets.items():
        if t.kind == "experts":
            continue
        module = reference.get_submodule(t.module_name)

        def hook(_m, args, _out, name=name):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])[:max_tokens].float()

        hooks.append(module.register_forward_hook(hook))
    try:
        reference(window[:max_tokens].unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, t in targets.items():
        W = to_matrix(t.parameter(reference).detach().float(), t.transposed)
        Wq = decoded(name)
        w_err = float((W - Wq).norm() / W.norm().clamp_min(1e-12))
        o_err = None
        if name in inputs:
            X = inputs[name]
            o_err = float((X @ (W - Wq).T).norm() / (X @ W.T).norm().clamp_min(1e-12))
        rows.append(LayerError(name, w_err, o_err))
    return rows


def layer_errors(reference: torch.nn.Module, tensors: dict[str, QuantizedTensor],
                 targets: dict[str, WeightTarget], window: torch.Tensor, max_tokens: int = 512) -> list[LayerError]:
    """Errors of each quantized weight of a lowbit model."""
    return _errors(reference, {n: targets[n] for n in tensors}, lambda n: tensors[n].dequantize_matrix(),
                   window, max_tokens)


def dense_layer_errors(reference: torch.nn.Module, candidate: torch.nn.Module, window: torch.Tensor,
                       max_tokens: int = 512) -> list[LayerError]:
    """Errors of a candidate held as plain weights (a GGUF read back, an HF folder): every default
    target of the reference against the candidate's weight of the same name."""
    targets = {}
    for t in select_targets(reference):
        try:
            cand = t.parameter(candidate)
        except AttributeError:
            continue
        if cand.shape == t.parameter(reference).shape:
            targets[t.name] = t
    return _errors(reference, targets,
                   lambda n: to_matrix(targets[n].parameter(candidate).detach().float(), targets[n].transposed),
                   window, max_tokens)
