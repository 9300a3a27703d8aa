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


def load(path):
    """A lowbit output folder as a runnable QuantizedModel (transformers model + tokenizer)."""
    from lowbit.export.native import load as _load

    return _load(path)


def save(qm, path, force: bool = False):
    """Write a QuantizedModel in lowbit's own format (safetensors + lowbit.json)."""
    from lowbit.export.native import save as _save

    return _save(qm, path, force=force)


__all__ = ["LowbitError", "ActivationScheme", "QuantScheme", "WeightScheme", "preset",
           "QuantizedTensor", "quantize_tensor", "quantize", "plan", "load_recipe", "load", "save"]
