"""QuantizedModel: the one representation every method produces and every exporter reads."""

from __future__ import annotations

import dataclasses

import torch

from lowbit.model.targets import WeightTarget
from lowbit.nn.quant_linear import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor


@dataclasses.dataclass
class QuantizedModel:
    """A runnable model with low-bit weights, plus everything needed to save and describe it.

    model:    the transformers model; quantized nn.Linear are QuantLinear, other quantized
              weights (Conv1D, stacked experts) hold their decoded values;
    tensors:  parameter name -> QuantizedTensor (the source of truth for exporters);
    targets:  parameter name -> WeightTarget (layout of each quantized weight);
    recipe:   method, its options, excluded weights, the recipe and plan that ran, timings:
              recorded in outputs;
    floats:   for a model left on the meta device (a streamed run), name -> StoredTensor of
              every full-precision value, read when an exporter writes it.
    """

    model: torch.nn.Module
    tokenizer: object
    scheme: QuantScheme
    tensors: dict[str, QuantizedTensor]
    targets: dict[str, WeightTarget]
    source: str
    method: str
    recipe: dict = dataclasses.field(default_factory=dict)
    plan: object = None   # the lowbit.plan.Plan it was made from (None when loaded from a file)
    # a streamed run's model is left on the meta device: name -> StoredTensor of each value it kept
    # in full precision (in the run's parts or the source), for the exporters to copy
    floats: object = None

    @property
    def quantized_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def quantized_numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Average bits per weight over the quantized weights (scales and zeros included)."""
        return self.quantized_bytes * 8 / max(1, self.quantized_numel)


def recorded_recipe(recipe: dict) -> dict:
    """The recipe as written into outputs: without wall-clock timings (the same inputs must give
    the same bytes) and without empty entries."""
    return {k: v for k, v in recipe.items() if k != "seconds" and v not in (None, [], {})}


def install_quantized(model: torch.nn.Module, target: WeightTarget, qt: QuantizedTensor, cache: bool = True) -> None:
    """Put a quantized weight into the model: nn.Linear becomes QuantLinear (so does a Conv1D
    whose input is quantized at run time); other layouts get their decoded values written in
    place (same module, same forward). cache=False: a QuantLinear decodes on every call instead
    of keeping its float32 matrix (a streamed run keeps only what the next layers need)."""
    module = model.get_submodule(target.module_name)
    decoded = None
    if isinstance(getattr(module, "weight", None), torch.nn.Parameter) and target.param_name == "weight":
        # staged calibration parks a batch *inside* this module's call: the replaced module still
        # finishes that forward, so it must compute with the quantized values too
        decoded = qt.dequantize()
        with torch.no_grad():
            module.weight.copy_(decoded)
    if target.kind == "linear" or (target.kind == "conv1d" and qt.input_quant is not None):
        parent_name, _, child = target.module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ql = QuantLinear(qt, module.bias, cache=cache)
        if cache and decoded is not None and target.kind == "linear":   # decoded once: the matrix QuantLinear would make
            ql._decoded = decoded
        setattr(parent, child, ql)
    else:
        p = getattr(module, target.param_name)
        with torch.no_grad():
            p.copy_(qt.dequantize(p.dtype))
