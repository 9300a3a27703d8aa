"""The public Python API: plan and quantize a model, load a lowbit folder.

    plan = lowbit.plan_model(source, recipe, container="gguf")     # what each tensor becomes
    qm = lowbit.quantize(source, "W8A8", method="smoothquant")     # or recipe=..., plan=...
    qm = lowbit.quantize(hf_model, "W4A8", method="gptq", forward_loop=lambda: run(hf_model))
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from tqdm.auto import tqdm

from lowbit import heap
from lowbit.calib import CalibrationConfig
from lowbit.errors import SchemeError
from lowbit.methods import get_method, is_calibrated, method_options
from lowbit.model.load import LoadedModel, load_source
from lowbit.model.quantized import QuantizedModel, install_quantized
from lowbit.model.targets import all_weights
from lowbit.plan import Plan, Recipe, as_recipe, build_plan
from lowbit.scheme import QuantScheme, WeightScheme, preset, scheme_of


def _as_scheme(scheme) -> tuple[QuantScheme, str | None]:
    """(scheme, preset name or None)."""
    if isinstance(scheme, QuantScheme):
        return scheme, None
    if isinstance(scheme, WeightScheme):
        return QuantScheme(scheme), None
    if isinstance(scheme, str):
        return preset(scheme), scheme.upper()
    raise SchemeError(f"scheme must be a QuantScheme, WeightScheme or preset name, got {type(scheme).__name__}")


def make_recipe(scheme=None, method: str | None = None, include: list[str] | None = None,
                exclude: list[str] | None = None, calibration: CalibrationConfig | None = None,
                options: dict | None = None, **extra) -> Recipe:
    """A Recipe from the keyword arguments quantize() takes (extra: Recipe fields such as
    budget, groups, gguf_mix)."""
    qs, name = _as_scheme(scheme if scheme is not None else "W4A16")
    return Recipe(scheme=qs, preset=name, method=method or "rtn", options=dict(options or {}),
                  calibration=calibration or CalibrationConfig(),
                  targets=tuple(include) if include is not None else None,
                  ignore=tuple(exclude) if exclude is not None else None, **extra)


def _resolve_recipe(recipe, plan, scheme, method, include, exclude, calibration, options, rotate=None,
                    imatrix=None) -> Recipe:
    given = [k for k, v in (("scheme", scheme), ("method", method), ("include", include), ("exclude", exclude),
                            ("calibration", calibration), ("options", options), ("rotate", rotate),
                            ("imatrix", imatrix)) if v is not None]
    if plan is not None or recipe is not None:
        if given:
            raise SchemeError(f"pass either a recipe/plan or {', '.join(given)}, not both: the recipe says everything")
        if plan is not None and recipe is not None:
            raise SchemeError("pass a plan or a recipe, not both (a plan already holds its recipe)")
        return plan.recipe if plan is not None else as_recipe(recipe)
    return make_recipe(scheme, method, include, exclude, calibration, options,
                       **({"rotate": rotate} if rotate is not None else {}),
                       **({"imatrix": str(imatrix)} if imatrix is not None else {}))


def _as_loaded(source, tokenizer=None) -> LoadedModel:
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, torch.nn.Module):  # an in-memory transformers model: quantized in place
        return LoadedModel(source, tokenizer, getattr(getattr(source, "config", None), "_name_or_path", "") or "in-memory", "module")
    return load_source(source)


def plan_model(source, recipe=None, container: str = "native", progress: bool = True, **kwargs) -> Plan:
    """The plan for a source (path, None for the embedded default, LoadedModel or nn.Module)
    under a recipe (Recipe, dict, YAML path; or quantize()'s keyword arguments)."""
    recipe = as_recipe(recipe) if recipe is not None else make_recipe(**kwargs)
    loaded = _as_loaded(source)
    transform(loaded, recipe)
    return build_plan(loaded, recipe, container, progress)


def transform(loaded: LoadedModel, recipe: Recipe) -> dict | None:
    """Apply the recipe's equivalence transforms to the model in place (once); what was done."""
    if recipe.rotate is None:
        return None
    from lowbit.methods.rotation import prepare_rotation, rotate_model

    if loaded.weights is not None:   # parameters on meta: only the structure now, the values layer by layer
        prepare_rotation(loaded.model, recipe.rotate, recipe.rotate_seed)   # in the streamed run
        return None
    return rotate_model(loaded.model, recipe.rotate, recipe.rotate_seed)


def quantize(source, scheme=None, method: str | None = None, include: list[str] | None = None,
             exclude: list[str] | None = None, calibration: CalibrationConfig | None = None,
             options: dict | None = None, *, rotate: str | None = None, imatrix: str | None = None, recipe=None,
             plan: Plan | None = None,
             container: str = "native", forward_loop=None, tokenizer=None, progress: bool = True) -> QuantizedModel:
    """Quantize a model: a path, None (the embedded default), a LoadedModel, or an in-memory
    transformers model (modified in place).

    Say what to do with scheme/method/... (a preset name, a QuantScheme or WeightScheme; method
    "rtn", "hqq" or a calibrated one: "gptq", "awq", "smoothquant"), or with a `recipe` (Recipe,
    dict or YAML path), or with a `plan` from plan_model(). `container` is the output the plan
    is sized for. Calibrated methods and static activation scales read `calibration` windows, or
    call `forward_loop()` (a function running the model on the user's data) instead. `rotate`
    ("hadamard") rotates the model first (methods.rotation); the model is modified in place.
    `imatrix`: a llama.cpp importance matrix file weighting RTN's fits (calib.imatrix)."""
    recipe = _resolve_recipe(recipe, plan, scheme, method, include, exclude, calibration, options, rotate, imatrix)
    loaded = _as_loaded(source, tokenizer)
    transform(loaded, recipe)
    if plan is None:
        plan = build_plan(loaded, recipe, container, progress)
    elif container != "native" and container != plan.container:
        raise SchemeError(f"the plan was made for {plan.container}, not {container}")
    if forward_loop is None and loaded.tokenizer is None and (is_calibrated(recipe.method) or plan.needs_static_activations):
        raise SchemeError("an in-memory model without a tokenizer needs forward_loop= (or tokenizer=) for calibration")
    return execute(loaded, plan, forward_loop=forward_loop, progress=progress)


def execute(loaded: LoadedModel, plan: Plan, forward_loop=None, progress: bool = True) -> QuantizedModel:
    """Run a plan: the method decides the values of every planned weight, then activation specs
    are attached (static scales calibrated on the weight-quantized model)."""
    recipe = plan.recipe
    impl = get_method(recipe.method)
    opts = method_options(recipe.method, dict(recipe.options))
    rotation = transform(loaded, recipe)
    model = loaded.model
    by_name = {w.name: w for w in all_weights(model)}
    targets = [by_name[n] for n in plan.tensors]
    ws = plan.weight_schemes()
    record = new_record(plan, opts)
    if rotation is not None:
        record["rotation"] = rotation
    t0 = time.perf_counter()
    if is_calibrated(recipe.method):
        tensors = _quantize_calibrated(model, loaded.tokenizer, targets, ws, impl, opts, recipe.calibration,
                                       record, progress, forward_loop,
                                       {n: t.activations for n, t in plan.tensors.items()})
    else:
        tensors = {}
        extra = dataclasses.asdict(opts) if opts is not None else {}
        importance = imatrix_importance(model, targets, recipe.imatrix, record) if recipe.imatrix else {}
        with torch.no_grad():
            for t in tqdm(targets, desc=f"{recipe.method}", disable=not progress, unit="w"):
                weighted = {"importance": importance[t.name]} if t.name in importance else {}
                qt = impl.quantize_weight(t.parameter(model).data, ws[t.name], t.transposed, **extra, **weighted)
                install_quantized(model, t, qt)
                tensors[t.name] = qt
    record["seconds"]["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _attach_activations(model, loaded.tokenizer, plan, tensors, by_name, forward_loop, record, progress)
    record["seconds"]["activations"] = time.perf_counter() - t0
    finish_record(record, plan)
    return QuantizedModel(model, loaded.tokenizer, plan.common_scheme(), tensors, {t.name: t for t in targets},
                          loaded.source, recipe.method, record, plan)


def imatrix_importance(model, targets, path: str, record: dict) -> dict:
    """{weight name: per-column importance} from a llama.cpp imatrix file; what was read and which
    targets it has no entry for (they are fitted unweighted, as llama-quantize does) are recorded."""
    from lowbit.calib import imatrix

    imat = imatrix.read(path)
    found, missing = imatrix.importance_for(model, targets, imat)
    record["imatrix"] = {"file": str(path), "sha256": imatrix.file_digest(path), "format": "dat" if imat.legacy else "gguf",
                         "datasets": imat.datasets, "chunk_count": imat.chunk_count, "chunk_size": imat.chunk_size,
                         "weighted": len(found), "no_entry": missing}
    return found


def new_record(plan: Plan, opts) -> dict:
    """The start of what a run records (lowbit.json's "recipe"): targets, kept weights, options."""
    record = {"targets": len(plan.tensors), "kept_full_precision": plan.kept, "seconds": {}}
    if opts is not None:
        record["options"] = dataclasses.asdict(opts)
    return record


def finish_record(record: dict, plan: Plan) -> None:
    """The plan's part of the record, added when the run is done."""
    recipe = plan.recipe
    record["recipe"] = recipe.to_dict()
    record["plan"] = plan.summary()
    if plan.budget is not None:
        record["budget"] = plan.budget
    if plan.notes:
        record["plan_notes"] = plan.notes
    if recipe.gguf_mix is not None:
        record["gguf_mix"] = recipe.gguf_mix
        record["gguf_fallbacks"] = {n: t.reason.split("fallback: ", 1)[1] for n, t in plan.tensors.items()
                                    if "fallback: " in t.reason}


def _attach_activations(model, tokenizer, plan: Plan, tensors: dict, by_name: dict, forward_loop, record, progress) -> None:
    """Give every planned Linear its input quantization (calibrating static scales first)."""
    from lowbit.calib.activations import observe_input_ranges, window_runner
    from lowbit.nn.act_quant import input_quant_spec

    acts = {n: t.activations for n, t in plan.tensors.items() if t.activations is not None}
    if not acts:
        return
    static = {n: (by_name[n].module_name, a) for n, a in acts.items() if a.needs_calibration}
    ranges: dict[str, float] = {}
    if static:
        if forward_loop is not None:
            run = lambda _m: forward_loop()  # noqa: E731
        else:
            cal = plan.recipe.calibration
            run = window_runner(cal.windows(tokenizer), cal.batch_size, progress)
        ranges = observe_input_ranges(model, static, run)
        record["activation_calibration"] = "forward_loop" if forward_loop is not None else "calibration windows"
    for n, act in acts.items():
        qt = dataclasses.replace(tensors[n], input_quant=input_quant_spec(act, ranges.get(n)))
        install_quantized(model, by_name[n], qt)
        tensors[n] = qt


def _compute_device(model: torch.nn.Module) -> torch.device:
    """Where the model computes (a streamed model's parameters are mostly on meta)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def _quantize_calibrated(model, tokenizer, targets, ws, impl, opts, calibration: CalibrationConfig,
                         recipe: dict, progress: bool, forward_loop=None, activations: dict | None = None,
                         hooks=None, tensors: dict | None = None, fallbacks: list | None = None,
                         cache_decoded: bool = True) -> dict:
    """Run a calibrated method layer by layer; returns the quantized tensors (installed).
    hooks (calib.runner.LayerHooks), tensors (the dict filled as layers are quantized) and
    fallbacks (names quantized without data so far) are how a streamed run takes part;
    cache_decoded=False: quantized Linears decode per call (install_quantized)."""
    from lowbit.calib import distributed
    from lowbit.calib.runner import bf16_gram_path, check_hessian_precision, finish_stats, release_stats, run_layers
    from lowbit.methods import rtn

    t0 = time.perf_counter()
    if forward_loop is None:
        windows = calibration.windows(tokenizer)
        recipe["calibration"] = {**dataclasses.asdict(calibration), "tokens": int(windows.numel())}
        distributed.check_same_run(windows, json.dumps({k: v for k, v in recipe.items() if k != "seconds"},
                                                       sort_keys=True, default=str),
                                   *(f"{t.name}{tuple(t.parameter(model).shape)}" for t in targets))
        windows = distributed.share(windows, calibration.batch_size)   # this rank's batches (all in one process)
    else:
        windows = None
        recipe["calibration"] = {"forward_loop": True, "hessian_precision": calibration.hessian_precision}
    recipe["seconds"]["calibration_data"] = time.perf_counter() - t0
    tensors = {} if tensors is None else tensors
    fallbacks = [] if fallbacks is None else fallbacks

    extra = {"activations": activations} if getattr(impl, "USES_ACTIVATIONS", False) else {}

    def quantize_layer(_index, layer_targets, stats):
        # with torch.distributed: statistics of every rank's windows, the solving split by weight
        distributed.reduce_stats(stats, [t.name for t in layer_targets], request.sample_rows)
        finish_stats(stats, [t.name for t in layer_targets])
        sizes = {t.name: t.parameter(model).numel() for t in layer_targets}
        out, fb = distributed.solve_split(lambda ts: impl.quantize_layer(model, ts, stats, ws, opts, **extra),
                                          layer_targets, sizes, getattr(impl, "SOLVES_EACH_WEIGHT", False))
        for t in layer_targets:
            install_quantized(model, t, out[t.name], cache=cache_decoded)
            report = getattr(stats.get(t.name), "report", {}).get(t.param_name)
            if report is not None:   # routed experts: tokens per expert, all-token fallbacks
                recipe.setdefault("experts", {})[t.name] = report
        tensors.update(out)
        fallbacks.extend(fb)
        release_stats(stats, [t.name for t in layer_targets])
        heap.trim()   # a solve's small temporaries fragment the heap; measured, it grows with depth

    request = dataclasses.replace(impl.STATS, hessian_precision=check_hessian_precision(calibration.hessian_precision),
                                  expert_min_tokens=calibration.expert_min_tokens)
    recipe["calibration"]["hessian_precision"] = request.hessian_precision
    recipe["calibration"]["hessian_precision_path"] = bf16_gram_path(_compute_device(model)) if request.hessian_precision == "bf16" else "fp32"
    outside = run_layers(model, windows, targets, quantize_layer, request,
                         calibration.batch_size, calibration.sequential, progress, recipe["seconds"],
                         forward_loop=forward_loop, hooks=hooks)
    for t in outside:  # weights outside the decoder stack (embeddings, an included lm_head) get RTN
        qt = rtn.quantize_weight(t.parameter(model).data, scheme_of(ws, t.name), t.transposed)
        install_quantized(model, t, qt)
        tensors[t.name] = qt
        fallbacks.append(t.name)
    recipe["rtn_fallback"] = fallbacks
    return {t.name: tensors[t.name] for t in targets if t.name in tensors}
