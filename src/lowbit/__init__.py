"""lowbit: quantize LLMs to low bit-widths and measure what it cost."""

from lowbit.errors import LowbitError
from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme, preset
from lowbit.tensor import QuantizedTensor, quantize_tensor


def quantize(source, scheme=None, method: str | None = None, **kwargs):
    """Quantize a model (path, None for the embedded default, LoadedModel or an in-memory
    transformers model) by scheme/method, recipe= or plan=; see lowbit.api.quantize."""
    from lowbit.api import quantize as _quantize

    return _quantize(source, scheme, method=method, **kwargs)


def plan(source, recipe=None, container: str = "native", **kwargs):
    """What each weight would become (scheme, activations, why, bytes), nothing quantized;
    see lowbit.api.plan_model."""
    from lowbit.api import plan_model

    return plan_model(source, recipe, container, **kwargs)


def load_recipe(path):
    """A recipe (YAML) as a lowbit.plan.Recipe."""
    from lowbit.plan.recipe import load_recipe as _load_recipe

    return _load_recipe(path)


def load(path, runtime: str = "packed", compute_dtype=None):
    """A lowbit output folder as a runnable QuantizedModel (transformers model + tokenizer).

    runtime="packed" (default): weights stay low-bit in memory and run through torch's CPU
    kernels (int4pack / int8pack / _int_mm / _scaled_mm, else decoded per call), inputs to the
    int4/int8 weight-only kernels in bf16 (compute_dtype=torch.float32 for the exact, slow path).
    runtime="decoded": each weight decoded once to fp32, exactly the model `quantize` measured."""
    import torch

    from lowbit.export.native import load as _load

    return _load(path, runtime=runtime, compute_dtype=compute_dtype or torch.bfloat16)


def save(qm, path, force: bool = False):
    """Write a QuantizedModel in lowbit's own format (safetensors + lowbit.json)."""
    from lowbit.export.native import save as _save

    return _save(qm, path, force=force)


__all__ = ["LowbitError", "ActivationScheme", "QuantScheme", "WeightScheme", "preset",
           "QuantizedTensor", "quantize_tensor", "quantize", "plan", "load_recipe", "load", "save"]
