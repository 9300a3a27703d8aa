"""SparseGPT (Frantar & Alistarh 2023): prune and quantize each layer in one pass of the GPTQ
solver, so the later columns compensate both the dropped weights and the rounding error
(gptq.gptq_quantize with `prune`). `--opt sparsity=2:4` (N:M) or a fraction such as 0.5
(unstructured); the surviving weights are stored in the scheme's format, the dropped ones as its
exact-zero code (a format with a float minimum has none and is refused)."""

from __future__ import annotations

import dataclasses

from lowbit.errors import SchemeError
from lowbit.methods import gptq
from lowbit.sparsity import parse_pattern


@dataclasses.dataclass(frozen=True)
class Options(gptq.Options):
    sparsity: str = "2:4"
    act_order: bool = False     # N:M groups are consecutive input columns: solve in order

    def __post_init__(self):
        parse_pattern(self.sparsity)   # a bad pattern is an error when the recipe is read
        if self.act_order:
            raise SchemeError("sparsegpt solves columns in order (N:M groups are consecutive); drop act_order")
        if self.refit:
            raise SchemeError("sparsegpt does not refit scales (refitting would move the pruned weights' zeros); "
                              "drop --opt refit")


STATS = gptq.STATS
# each weight is solved from the shared statistics alone: ranks can split the solving
SOLVES_EACH_WEIGHT = True


def quantize_layer(model, layer_targets, stats, scheme, options: Options):
    from lowbit.sparsity import check_shape
    from lowbit.tensor import to_matrix

    pattern = parse_pattern(options.sparsity)
    for t in layer_targets:
        check_shape(pattern, to_matrix(t.parameter(model).data, t.transposed).shape[1], t.name)
    return gptq.quantize_layer(model, layer_targets, stats, scheme, options, prune=pattern)
