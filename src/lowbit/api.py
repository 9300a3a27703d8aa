"""The public Python API: quantize a model, load a lowbit folder."""

from __future__ import annotations

import dataclasses
import time

import torch
from tqdm.auto import tqdm

from lowbit.errors import SchemeError
from lowbit.calib import CalibrationConfig
from lowbit.methods import get_method, is_calibrated, method_options
from lowbit.model.load import LoadedModel, load_source
from lowbit.model.quantized import QuantizedModel, install_quantized
from lowbit.model.targets import all_weights, select_targets
from lowbit.scheme import QuantScheme, WeightScheme, scheme_of


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
             exclude: list[str] | None = None, calibration: CalibrationConfig | None = None,
             options: dict | None = None, per_target: dict[str, WeightScheme] | None = None,
             extra_targets: list[str] | None = None, progress: bool = True) -> QuantizedModel:
    """Quantize a model (a LoadedModel, or a source path / None for the embedded default).

    method: "rtn" (no data) or a calibrated method ("gptq"), which reads `calibration`
    (default: 128 x 512 tokens of the default text) and method `options` (e.g. damp, act_order).
    per_target: a weight scheme per parameter name overriding `scheme` (GGUF mixes);
    extra_targets: parameter names to quantize in addition to the selected ones (token_embd).
    The model inside `source` is modified in place when a LoadedModel is given."""
    scheme = _as_scheme(scheme)
    impl = get_method(method)
    opts = method_options(method, options or {})
    loaded = source if isinstance(source, LoadedModel) else load_source(source)
    model = loaded.model
    targets = select_targets(model, include, exclude)
    if extra_targets:
        chosen = {t.name for t in targets}
        targets += [w for w in all_weights(model) if w.name in extra_targets and w.name not in chosen]
    if not targets:
        raise SchemeError("no weights matched the include/exclude patterns; loosen --include/--exclude")
    kept = sorted({w.name for w in all_weights(model)} - {t.name for t in targets})
    recipe = {"targets": len(targets), "kept_full_precision": kept, "include": include, "exclude": exclude,
              "seconds": {}}
    t0 = time.perf_counter()
    if opts is not None:
        recipe["options"] = dataclasses.asdict(opts)
    if is_calibrated(method):
        ws = dict(per_target) if per_target else scheme.weights
        tensors = _quantize_calibrated(model, loaded.tokenizer, targets, ws, impl, opts,
                                       calibration or CalibrationConfig(), recipe, progress)
    else:
        tensors = {}
        extra = dataclasses.asdict(opts) if opts is not None else {}
        with torch.no_grad():
            for t in tqdm(targets, desc=f"{method} {scheme.weights.label()}", disable=not progress, unit="w"):
                ws = (per_target or {}).get(t.name, scheme.weights)
                qt = impl.quantize_weight(t.parameter(model).data, ws, t.transposed, **extra)
                install_quantized(model, t, qt)
                tensors[t.name] = qt
    recipe["seconds"]["quantize"] = time.perf_counter() - t0
    return QuantizedModel(model, loaded.tokenizer, scheme, tensors, {t.name: t for t in targets},
                          loaded.source, method, recipe)


def _quantize_calibrated(model, tokenizer, targets, ws, impl, opts, calibration: CalibrationConfig,
                         recipe: dict, progress: bool) -> dict:
    """Run a calibrated method layer by layer; returns the quantized tensors (installed)."""
    from lowbit.calib.runner import check_hessian_precision, run_layers
    from lowbit.methods import rtn

    t0 = time.perf_counter()
    windows = calibration.windows(tokenizer)
    recipe["calibration"] = {**dataclasses.asdict(calibration), "tokens": int(windows.numel())}
    recipe["seconds"]["calibration_data"] = time.perf_counter() - t0
    tensors: dict = {}
    fallbacks: list[str] = []

    def quantize_layer(_index, layer_targets, stats):
        out, fb = impl.quantize_layer(model, layer_targets, stats, ws, opts)
        for t in layer_targets:
            install_quantized(model, t, out[t.name])
        tensors.update(out)
        fallbacks.extend(fb)

    request = dataclasses.replace(impl.STATS, hessian_precision=check_hessian_precision(calibration.hessian_precision))
    recipe["calibration"]["hessian_precision"] = request.hessian_precision
    outside = run_layers(model, windows, targets, quantize_layer, request,
                         calibration.batch_size, calibration.sequential, progress, recipe["seconds"])
    for t in outside:  # weights outside the decoder stack (embeddings, an included lm_head) get RTN
        qt = rtn.quantize_weight(t.parameter(model).data, scheme_of(ws, t.name), t.transposed)
        install_quantized(model, t, qt)
        tensors[t.name] = qt
        fallbacks.append(t.name)
    recipe["rtn_fallback"] = fallbacks
    return {t.name: tensors[t.name] for t in targets}
