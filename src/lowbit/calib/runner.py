"""Layer-sequential calibration.

Capture the inputs of decoder layer 0 once; then, for each decoder layer: run the calibration
batches through it with hooks on its weight-holding modules (collecting what the method needs),
let the method quantize the layer, and run the batches through the *quantized* layer to produce
the next layer's inputs. Only the current layer's activations are resident, and the runner
touches one layer's weights at a time, so weights could be streamed per layer from disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from lowbit.errors import SourceError
from lowbit.model.targets import WeightTarget


@dataclasses.dataclass
class InputStats:
    """Statistics of one module's input X (tokens, in_features), over all calibration tokens."""

    n_tokens: int = 0
    hessian: torch.Tensor | None = None   # sum of X^T X (in, in), float32
    absmax: torch.Tensor | None = None    # max |X| per input channel
    abssum: torch.Tensor | None = None    # sum |X| per input channel
    sample: torch.Tensor | None = None    # first rows of X (for search-based methods)

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(1, self.n_tokens)

    def add(self, X: torch.Tensor, want_hessian: bool, sample_rows: int) -> None:
        X = X.reshape(-1, X.shape[-1]).float()
        if want_hessian:
            H = X.T @ X
            self.hessian = H if self.hessian is None else self.hessian.add_(H)
        a = X.abs()
        amax, asum = a.amax(dim=0), a.sum(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.abssum = asum if self.abssum is None else self.abssum.add_(asum)
        if sample_rows and (self.sample is None or self.sample.shape[0] < sample_rows):
            need = sample_rows - (0 if self.sample is None else self.sample.shape[0])
            part = X[:need].clone()
            self.sample = part if self.sample is None else torch.cat([self.sample, part])
        self.n_tokens += X.shape[0]


@dataclasses.dataclass(frozen=True)
class StatsRequest:
    """What a method needs from calibration."""

    hessian: bool = False
    sample_rows: int = 0


class _StopForward(Exception):
    pass


def find_decoder_layers(model: torch.nn.Module, targets: list[WeightTarget]) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList holding most target weights (model.layers, transformer.h, decoder.layers...)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            count = sum(t.module_name.startswith(name + ".") for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise SourceError("found no stack of decoder layers holding the target weights; this model needs --method rtn")
    return best


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, windows: torch.Tensor,
                         batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) that the model passes to its first decoder layer, per batch."""
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(windows[i: i + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layers(model: torch.nn.Module, windows: torch.Tensor, targets: list[WeightTarget],
               quantize_layer: Callable[[int, list[WeightTarget], dict[str, InputStats]], None],
               request: StatsRequest, batch_size: int = 8, sequential: bool = True,
               progress: bool = True) -> list[WeightTarget]:
    """Drive `quantize_layer(index, layer_targets, stats_by_target_name)` over the decoder layers.

    With sequential=True each layer sees inputs produced by the already-quantized layers before
    it. Returns the targets outside the decoder layers (the caller quantizes them without data)."""
    prefix, layers = find_decoder_layers(model, targets)
    by_layer: dict[int, list[WeightTarget]] = {}
    outside = []
    for t in targets:
        rest = t.module_name[len(prefix) + 1:] if t.module_name.startswith(prefix + ".") else None
        if rest is None:
            outside.append(t)
            continue
        by_layer.setdefault(int(rest.split(".")[0]), []).append(t)
    batches = capture_layer_inputs(model, layers[0], windows, batch_size)
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress, unit="layer")):
        layer_targets = by_layer.get(i, [])
        stats: dict[str, InputStats] = {}
        hooks = []
        last_input: dict[str, torch.Tensor] = {}
        for t in layer_targets:
            if t.kind == "experts":
                continue  # routed per expert inside the module: no single input to observe
            module = model.get_submodule(t.module_name)

            def hook(_m, args, t=t):
                x = args[0]
                # modules fed the same tensor (q/k/v, gate/up) share one statistics object;
                # holding the tensor keeps its memory from being reused by a later input
                owner = next((n for n, prev in last_input.items()
                              if prev.data_ptr() == x.data_ptr() and prev.shape == x.shape), None)
                if owner is not None:
                    stats[t.name] = stats[owner]
                    return
                last_input[t.name] = x
                stats.setdefault(t.name, InputStats()).add(x, request.hessian, request.sample_rows)

            hooks.append(module.register_forward_pre_hook(hook))
        outputs = []
        try:
            for hidden, kwargs in batches:
                last_input.clear()
                out = _layer_output(layer(hidden, **kwargs))
                if not sequential:
                    outputs.append(out)
        finally:
            for h in hooks:
                h.remove()
        quantize_layer(i, layer_targets, stats)
        if sequential:
            outputs = [_layer_output(layer(hidden, **kwargs)) for hidden, kwargs in batches]
        batches = [(out, kwargs) for out, (_, kwargs) in zip(outputs, batches)]
    return outside
