"""lowbit: quantize LLMs to low bit-widths and measure what it cost."""

from lowbit.errors import LowbitError
from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme, preset
from lowbit.tensor import QuantizedTensor, quantize_tensor


def quantize(source, scheme, method: str = "rtn", **kwargs):
    """Quantize a model (LoadedModel, path, or None for the embedded default); see lowbit.api.quantize."""
    from lowbit.api import quantize as _quantize

    return _quantize(source, scheme, method=method, **kwargs)


def load(path):
    """A lowbit output folder as a runnable QuantizedModel (transformers model + tokenizer)."""
    from lowbit.export.native import load as _load

    return _load(path)


def save(qm, path, force: bool = False):
    """Write a QuantizedModel in lowbit's own format (safetensors + lowbit.json)."""
    from lowbit.export.native import save as _save

    return _save(qm, path, force=force)


__all__ = ["LowbitError", "ActivationScheme", "QuantScheme", "WeightScheme", "preset",
           "QuantizedTensor", "quantize_tensor", "quantize", "load", "save"]
