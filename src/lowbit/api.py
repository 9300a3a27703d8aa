"""The public Python API: quantize a model, load a lowbit folder."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from lowbit.errors import SchemeError
from lowbit.methods import METHODS, rtn
from lowbit.model.load import LoadedModel, load_source
from lowbit.model.quantized import QuantizedModel, install_quantized
from lowbit.model.targets import all_weights, select_targets
from lowbit.scheme import QuantScheme, WeightScheme


def _as_scheme(scheme) -> QuantScheme:
    if isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, WeightScheme):
        return QuantScheme(scheme)
    if isinstance(scheme, str):
        from lowbit.scheme import preset
        return preset(scheme)
    raise SchemeError(f"scheme must be a QuantScheme, WeightScheme or preset name, got {type(scheme).__name__}")


def quantize(source, scheme, method: str = "rtn", include: list[str] | None = None,
             exclude: list[str] | None = None, progress: bool = True) -> QuantizedModel:
    """Quantize a model (a LoadedModel, or a source path / None for the embedded default).

    The model inside `source` is modified in place when a LoadedModel is given."""
    scheme = _as_scheme(scheme)
    if method not in METHODS:
        raise SchemeError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    loaded = source if isinstance(source, LoadedModel) else load_source(source)
    model = loaded.model
    targets = select_targets(model, include, exclude)
    if not targets:
        raise SchemeError("no weights matched the include/exclude patterns; loosen --include/--exclude")
    kept = sorted({w.name for w in all_weights(model)} - {t.name for t in targets})
    t0 = time.perf_counter()
    tensors = {}
    with torch.no_grad():
        for t in tqdm(targets, desc=f"{method} {scheme.weights.label()}", disable=not progress, unit="w"):
            qt = rtn.quantize_weight(t.parameter(model).data, scheme.weights, t.transposed)
            install_quantized(model, t, qt)
            tensors[t.name] = qt
    recipe = {"targets": len(targets), "kept_full_precision": kept,
              "include": include, "exclude": exclude, "seconds": {"quantize": time.perf_counter() - t0}}
    return QuantizedModel(model, loaded.tokenizer, scheme, tensors, {t.name: t for t in targets},
                          loaded.source, method, recipe)
