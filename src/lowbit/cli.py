"""Command line: parses flags, calls the API, prints tables or --json. The only place that
prints or exits."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from tabulate import tabulate
from tqdm.auto import tqdm

from lowbit.errors import LowbitError


# --kv spellings: the quantized KV caches of lowbit.runtime.kv_cache
_KV_CHOICES = ("int8", "fp8", "int4", "kivi2", "kivi4")


def _add_kv_flags(parser, help_kv: str) -> None:
    """--kv and the cache's settings, the same on eval, generate and bench-infer."""
    parser.add_argument("--kv", choices=_KV_CHOICES, help=help_kv)
    parser.add_argument("--kv-residual", type=int, help="most recent tokens kept in full precision "
                                                        "(default 128 for kivi2/kivi4, 0 otherwise)")
    parser.add_argument("--kv-sink", type=int, help="first tokens kept in full precision, the attention sink (default 1)")
    parser.add_argument("--kv-clip", choices=("minmax", "mse"), help="int4/kivi ranges: min-max, or the clipped range "
                                                                     "of least squared error (default: mse for kivi2)")
    parser.add_argument("--kv-group", type=int, help="channels per scale along head_dim: int8/fp8 get a scale per "
                                                     "group instead of per token; int4/kivi values (default 32)")
    parser.add_argument("--kv-asym", action="store_true", default=None,
                        help="int8: min-max ranges (a scale and a minimum) instead of absmax scales")


def _kv_spec(args):
    """The KVCacheSpec the --kv flags name, or None without --kv."""
    if args.kv is None:
        for flag in ("kv_residual", "kv_sink", "kv_clip", "kv_group", "kv_asym"):
            if getattr(args, flag, None) is not None:
                from lowbit.errors import SchemeError

                raise SchemeError(f"--{flag.replace('_', '-')} sets a quantized KV cache: add --kv int8|fp8|int4|kivi2|kivi4")
        return None
    from lowbit.runtime.kv_cache import KVCacheSpec

    grouped = {}
    if args.kv_group is not None:
        grouped["group_size"] = args.kv_group
        if args.kv in ("int8", "fp8"):
            grouped["granularity"] = "group"
    return KVCacheSpec(args.kv, residual=args.kv_residual, sink=args.kv_sink, clip=args.kv_clip,
                       symmetric=not args.kv_asym, **grouped)

# --act spellings -> activation schemes (static ones take --act-observer)
_ACT_CHOICES = ("none", "int8", "int8-static", "int4", "fp8", "fp8-static", "nvfp4", "nvfp4-dynamic", "mxfp8", "mxfp4")


def _activation_from_args(args):
    from lowbit.scheme import ActivationScheme

    act, obs = args.act, args.act_observer
    if act in (None, "none"):
        return None
    table = {"int8": ("int", 8, "token", True), "int8-static": ("int", 8, "tensor", False),
             "int4": ("int", 4, "token", True), "fp8": ("fp8_e4m3", 8, "token", True),
             "fp8-static": ("fp8_e4m3", 8, "tensor", False), "nvfp4": ("nvfp4", 4, "block", False),
             "nvfp4-dynamic": ("nvfp4", 4, "block", True), "mxfp8": ("mxfp8", 8, "block", True),
             "mxfp4": ("mxfp4", 4, "block", True)}
    return ActivationScheme(*table[act], observer=obs)


def _scheme_from_args(args):
    """(QuantScheme, preset name or None) from the scheme flags."""
    from lowbit.errors import SchemeError
    from lowbit.scheme import QuantScheme, WeightScheme, preset

    if (not args.scheme and getattr(args, "method", None) == "llm_int8" and args.format == "int" and args.bits is None
            and args.group_size == 128 and args.act is None):
        return preset("LLM_INT8"), "LLM_INT8"   # the method's own scheme, unless flags say another (refused)
    if (not args.scheme and getattr(args, "method", None) == "aqlm" and args.format == "int" and args.bits is None
            and args.act is None):
        from lowbit.methods import method_options

        # the codebook setting names the format (a bad setting is refused by the method's options)
        fmt = method_options("aqlm", _parse_options(args.opt)).format_name()
        return QuantScheme(WeightScheme(fmt, None, -1)), None
    if (not args.scheme and getattr(args, "method", None) == "quip" and args.format == "int" and args.bits is None
            and args.act is None):
        return QuantScheme(WeightScheme("e8p", None, -1)), None   # the method's own format
    if args.scheme:
        if args.act is not None:
            raise SchemeError(f"--scheme {args.scheme} already fixes the activations; drop --act, or spell the weights "
                              "with --format/--bits/--group-size and add --act")
        return preset(args.scheme), args.scheme.upper()
    fmt = args.format
    bits = args.bits
    if fmt in ("int8", "int4", "int3", "int2"):  # convenience spellings
        fmt, bits = "int", int(fmt[3:])
    if fmt == "int" and bits is None:
        bits = 4
    ws = WeightScheme(format=fmt, bits=bits, group_size=args.group_size, symmetric=not args.asym,
                      zero_point=args.zero_point, observer=args.observer, percentile=args.percentile,
                      double_quant=args.double_quant)
    return QuantScheme(ws, _activation_from_args(args)), None


# flags a --recipe replaces: (dest, flag) — giving one with --recipe is an error
_RECIPE_FLAGS = (("scheme", "--scheme"), ("format", "--format"), ("bits", "--bits"), ("group_size", "--group-size"),
                 ("asym", "--asym"), ("zero_point", "--zero-point"), ("observer", "--observer"),
                 ("percentile", "--percentile"), ("double_quant", "--double-quant"), ("include", "--include"),
                 ("exclude", "--exclude"), ("method", "--method"), ("calib", "--calib"), ("samples", "--samples"),
                 ("seqlen", "--seqlen"), ("seed", "--seed"), ("no_sequential", "--no-sequential"),
                 ("hessian_precision", "--hessian-precision"), ("damp", "--damp"), ("act_order", "--act-order"),
                 ("opt", "--opt"), ("act", "--act"), ("act_observer", "--act-observer"), ("target_bpw", "--target-bpw"),
                 ("max_size", "--max-size"), ("candidates", "--candidates"), ("fisher_windows", "--fisher-windows"),
                 ("fallback", "--fallback"), ("rotate", "--rotate"), ("rotate_seed", "--rotate-seed"),
                 ("expert_min_tokens", "--expert-min-tokens"), ("imatrix", "--imatrix"))


def _recipe_from_args(args, parser_defaults: dict):
    """The Recipe the flags (or --recipe FILE) describe: the CLI and the API run the same thing."""
    from lowbit.api import make_recipe
    from lowbit.calib import CalibrationConfig
    from lowbit.errors import SchemeError
    from lowbit.plan import Budget, load_recipe
    from lowbit.plan.budget import parse_size

    gguf_type = (args.type or "").upper() if args.to == "gguf" else ""
    if args.recipe:
        given = [flag for dest, flag in _RECIPE_FLAGS if getattr(args, dest, None) != parser_defaults.get(dest)]
        if given:
            raise SchemeError(f"--recipe {args.recipe} says how to quantize; drop {', '.join(given)} (or edit the recipe)")
        if gguf_type and gguf_type not in ("AUTO", "F32", "F16", "BF16"):
            raise SchemeError(f"--recipe with --type {args.type}: put the mix in the recipe (gguf: {{mix: {gguf_type}}})")
        return load_recipe(args.recipe)
    scheme, name = _scheme_from_args(args)
    budget = None
    if args.target_bpw is not None or args.max_size is not None:
        if args.target_bpw is not None and args.max_size is not None:
            raise SchemeError("pass --target-bpw or --max-size, not both")
        if gguf_type and gguf_type != "AUTO":
            raise SchemeError(f"a budget chooses every tensor's type itself; drop --type {args.type} (or pass --type auto)")
        cands = tuple(x.strip() for x in args.candidates.split(",") if x.strip()) if args.candidates else None
        budget = Budget(args.target_bpw, parse_size(args.max_size) if args.max_size is not None else None, cands,
                        args.fisher_windows)
    elif args.candidates:
        raise SchemeError("--candidates lists what a budget chooses from; add --target-bpw B or --max-size SIZE")
    if args.to == "gguf" and not gguf_type and budget is None:
        raise SchemeError("--to gguf needs --type (a mix such as Q4_K_M, Q8_0, Q4_0, or F32/F16) or --max-size SIZE")
    if gguf_type == "AUTO" and budget is None:
        raise SchemeError("--type auto needs --max-size SIZE (e.g. 91.7MB) or --target-bpw B: the size to fit")
    mix = gguf_type if gguf_type not in ("", "AUTO", "F32", "F16", "BF16") else None
    if args.expert_min_tokens < 0:
        raise SchemeError(f"--expert-min-tokens {args.expert_min_tokens}: give 0 or more")
    for flag, value in (("--samples", args.samples), ("--seqlen", args.seqlen)):
        if value < 1:
            raise SchemeError(f"{flag} {value}: calibration needs at least 1 (default --samples 128 --seqlen 512)")
    calibration = CalibrationConfig(args.calib, args.samples, args.seqlen, args.seed, sequential=not args.no_sequential,
                                    hessian_precision=args.hessian_precision, expert_min_tokens=args.expert_min_tokens)
    return make_recipe(scheme if name is None else name, args.method, args.include, args.exclude, calibration,
                       _method_options(args), budget=budget, gguf_mix=mix, gguf_fallback=args.fallback,
                       rotate=args.rotate, rotate_seed=args.rotate_seed, imatrix=args.imatrix)


def _container(args) -> str:
    """The container a plan is sized for; a float GGUF (--type F32/F16/BF16) holds decoded values."""
    if args.to == "gguf" and (args.type or "").upper() in ("F32", "F16", "BF16"):
        return "native"
    return args.to


def _add_scheme_flags(p):
    p.add_argument("--scheme", help="preset (weights and activations, as compressed-tensors names them): W4A16, "
                                    "W4A16_G32_ASYM, W3A16_G32, W8A16, W8A8, W8A8_STATIC, W4A8, FP8, FP8_DYNAMIC, "
                                    "FP8_WEIGHT, NF4, MXFP4, MXFP4A16, MXFP8, MXFP8A16, NVFP4, NVFP4A16, TERNARY")
    p.add_argument("--format", default="int", help="int | fp8_e4m3 | fp8_e5m2 | fp4 | nf4 | mxfp4 | mxfp8 | nvfp4 | ternary | gguf_* | aqlm_2x8 | aqlm_1x16 | e8p (default int)")
    p.add_argument("--bits", type=int, default=None, help="bits for --format int (2-8, default 4)")
    p.add_argument("--group-size", type=int, default=128, help="group size along the input dim; -1 per channel, 0 per tensor (default 128)")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero-point) integer quantization")
    p.add_argument("--zero-point", default="int", choices=["int", "float"], help="asymmetric zero as an integer (GPTQ) or a float minimum (Q4_1/HQQ)")
    p.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "mse", "kl"])
    p.add_argument("--percentile", type=float, default=99.9)
    p.add_argument("--double-quant", action="store_true", help="NF4: quantize the absmax scales too")
    p.add_argument("--include", action="append", help="regex of weight names to quantize (repeatable)")
    p.add_argument("--exclude", action="append", help="regex of weight names to keep (repeatable; replaces the default lm_head/embed/norm)")


def _print(obj, as_json: bool, table=None, headers=()):
    if as_json:
        print(json.dumps(obj, indent=1, default=str))
    elif table is not None:
        print(tabulate(table, headers=headers, floatfmt=".4g"))


def _parse_options(pairs: list[str] | None) -> dict:
    """--opt key=value pairs -> dict with ints, floats and booleans parsed."""
    from lowbit.errors import SchemeError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SchemeError(f"--opt {pair!r} is not KEY=VALUE; write e.g. --opt damp=0.02")
        k, v = pair.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def _method_options(args) -> dict:
    opts = _parse_options(args.opt)
    if args.damp is not None:
        opts["damp"] = args.damp
    if args.act_order is not None:
        opts["act_order"] = args.act_order
    return opts


def _check_calibration_is_read(recipe, calib: str) -> None:
    """--calib with nothing that reads it would be silently ignored: refuse it instead."""
    from lowbit.errors import SchemeError
    from lowbit.methods import is_calibrated

    static = any(s.activations is not None and s.activations.needs_calibration
                 for s in (recipe.scheme, *(g.scheme for g in recipe.groups)))
    if not (is_calibrated(recipe.method) or static or recipe.budget is not None):
        raise SchemeError(f"--calib {calib}: --method {recipe.method} with this scheme reads no calibration data, so "
                          "the file would be ignored; drop --calib, or use a calibrated method (gptq, awq, "
                          "smoothquant, sparsegpt, ...), static activations or a size budget")


def _plan_from_args(args, loaded=None, stream: bool = False):
    """(loaded model, plan, load seconds). stream: open a safetensors source lazily (parameters on
    meta, read layer by layer) when the run allows it (streaming.resident_reason)."""
    from lowbit.api import transform
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.streaming import resident_reason

    recipe = _recipe_from_args(args, args.parser_defaults)
    if getattr(args, "calib", None) and not args.recipe:
        _check_calibration_is_read(recipe, args.calib)
    t0 = time.perf_counter()
    if loaded is None and stream and resident_reason(recipe, _container(args)) is None:
        loaded = load_lazy(args.source)
    loaded = loaded or load_source(args.source)
    t_load = time.perf_counter() - t0
    transform(loaded, recipe)
    plan = build_plan(loaded, recipe, _container(args), progress=args.progress)
    if getattr(args, "expert_min_tokens", None) not in (None, args.parser_defaults.get("expert_min_tokens")) and not args.recipe:
        _check_experts_are_calibrated(plan, loaded.model)
    return loaded, plan, t_load


def _check_experts_are_calibrated(plan, model) -> None:
    """--expert-min-tokens with no routed experts calibrated would be silently ignored: refuse it."""
    from lowbit.errors import SchemeError
    from lowbit.methods import get_method, is_calibrated

    experts = [n for n in plan.tensors if n.endswith(("gate_up_proj", "up_proj", "down_proj"))
               and model.get_parameter(n).ndim == 3]
    if not experts:
        raise SchemeError("--expert-min-tokens: this model has no routed experts among the planned weights; drop it")
    if not (is_calibrated(plan.recipe.method) and getattr(get_method(plan.recipe.method).STATS, "experts", False)):
        raise SchemeError(f"--expert-min-tokens: --method {plan.recipe.method} does not calibrate experts from their "
                          "routed tokens (gptq and sparsegpt do); drop it")


def cmd_quantize(args):
    from lowbit.api import execute
    from lowbit.errors import SchemeError

    _shard_bytes(args)   # checked before any work
    loaded, plan, t_load = _plan_from_args(args, stream=True)
    _check_distributed(plan)
    if loaded.weights is not None:
        _quantize_streamed(args, loaded, plan, t_load)
        return
    if args.resume:
        from lowbit.streaming import resident_reason

        why = resident_reason(plan.recipe, plan.container) or f"{loaded.source} is not a safetensors folder that streams"
        raise SchemeError(f"--resume continues a layer-by-layer run, and this one holds the whole model ({why}); "
                          "drop --resume")
    qm = execute(loaded, plan, progress=args.progress and _is_main())
    if not _is_main():   # rank 0 writes and reports
        return
    qm.recipe["seconds"]["load"] = t_load
    kept = qm.recipe["kept_full_precision"]
    if args.progress:
        print(f"quantized {len(qm.tensors)} weights with {plan.recipe.method}: {_plan_line(plan)}; kept in full precision: "
              f"{', '.join(kept[:6])}{' ...' if len(kept) > 6 else ''} ({len(kept)})", file=sys.stderr)
        for note in plan.notes[:5]:
            print(f"note: {note}", file=sys.stderr)
        if plan.recipe.gguf_mix is not None:
            fb = qm.recipe["gguf_fallbacks"]
            print(f"GGUF {plan.recipe.gguf_mix}: {len(fb)} of {len(plan.tensors)} weights fell back to another type "
                  f"(rows not a multiple of the block), e.g. {next(iter(fb.values()), '-')}; recorded in the file", file=sys.stderr)
    out = _write_output(qm, args)
    _check_max_size(plan, out)
    budget = plan.budget
    summary = {"output": str(out), "method": qm.method, "scheme": _plan_line(plan),
               "weights_quantized": len(qm.tensors), "kept_full_precision": kept, "bits_per_weight": qm.bits_per_weight,
               "quantized_bytes": qm.quantized_bytes, "seconds": qm.recipe["seconds"]}
    if budget is not None:
        summary["budget"] = budget
    _print(summary, args.json, [[k, v] for k, v in summary.items() if k not in ("kept_full_precision", "budget")], ("", ""))


def _check_max_size(plan, out) -> None:
    """A --max-size budget's output that came out bigger is removed, with an error."""
    from lowbit.errors import SchemeError
    from lowbit.export import weights_bytes
    from lowbit.export.native import remove_output

    budget = plan.budget
    if budget is not None and budget.get("max_bytes") is not None:
        size = weights_bytes(out)
        if size > budget["max_bytes"]:
            remove_output(out)
            raise SchemeError(f"the output came out {size} bytes, over --max-size {budget['max_bytes']}, so it was removed; "
                              "lowbit's size estimate is wrong here: lower --max-size meanwhile and please report it")


def _is_main() -> bool:
    from lowbit.calib.distributed import is_main

    return is_main()


def _check_distributed(plan) -> None:
    """Under torch.distributed only calibration is split: a run that reads none is refused."""
    from lowbit.calib.distributed import world
    from lowbit.errors import SchemeError
    from lowbit.methods import is_calibrated

    if world()[1] == 1:
        return
    if not is_calibrated(plan.recipe.method):
        raise SchemeError(f"--workers splits calibration, and --method {plan.recipe.method} reads none; "
                          "run it in one process")
    if plan.needs_static_activations:
        raise SchemeError("static activation scales are not yet calibrated across ranks; run them in one process "
                          "(or use dynamic activations)")


def _quantize_streamed(args, loaded, plan, t_load) -> None:
    from lowbit.streaming import quantize_streamed

    r = quantize_streamed(loaded, plan, args.output, force=args.force, resume=args.resume,
                          progress=args.progress and _is_main(), max_shard_bytes=_shard_bytes(args),
                          full_precision=_full_precision_type(args) if args.to == "gguf" else None)
    if not _is_main():
        return
    _check_max_size(plan, r.output)
    r.record["seconds"]["load"] = t_load
    kept = r.record["kept_full_precision"]
    if args.progress:
        resumed = "" if r.resumed_at_layer is None else f", resumed at layer {r.resumed_at_layer}"
        print(f"quantized {r.weights_quantized} weights with {r.method} layer by layer{resumed}: {_plan_line(plan)}; "
              f"kept in full precision: {len(kept)}", file=sys.stderr)
    summary = {"output": str(r.output), "method": r.method, "scheme": _plan_line(plan),
               "weights_quantized": r.weights_quantized, "kept_full_precision": kept,
               "bits_per_weight": r.bits_per_weight, "quantized_bytes": r.quantized_bytes, "streamed": True,
               "resumed_at_layer": r.resumed_at_layer, "seconds": r.record["seconds"]}
    _print(summary, args.json, [[k, v] for k, v in summary.items() if k != "kept_full_precision"], ("", ""))


def _plan_line(plan) -> str:
    """One line naming what the plan does: the preset, the mix, the budget, or the scheme counts."""
    r = plan.recipe
    if r.gguf_mix is not None:
        return f"GGUF {r.gguf_mix}"
    if plan.budget is not None:
        what = (f"--target-bpw {r.budget.target_bpw}" if r.budget.target_bpw is not None
                else f"--max-size {r.budget.max_size / 1e6:.2f} MB")
        counts = ", ".join(f"{k} x{v}" for k, v in plan.budget["counts"].items())
        return f"budget {what}: {counts} ({plan.bits_per_weight:.3f} bits/weight)"
    labels = {}
    for t in plan.tensors.values():
        key = t.weights.label() + ("" if t.activations is None else f", inputs {t.activations.label()}")
        labels[key] = labels.get(key, 0) + 1
    text = "; ".join(f"{k}" + (f" x{n}" if len(labels) > 1 else "") for k, n in labels.items())
    return f"{r.preset} ({text})" if r.preset and len(labels) == 1 else text


def cmd_plan(args):
    """The plan, its estimated size and cost; nothing quantized (like llama-quantize --dry-run)."""
    _loaded, plan, _ = _plan_from_args(args)
    if args.json:
        _print(plan.to_dict(), True)
        return
    rows = [[t.name, f"{t.shape[0]}x{t.shape[1]}", t.label or t.weights.label(),
             "-" if t.activations is None else t.activations.label(), t.nbytes * 8 / t.numel,
             "" if t.cost is None else f"{t.cost:.2e}", t.reason] for t in plan.tensors.values()]
    print(tabulate(rows, headers=("weight", "shape", "scheme", "inputs", "bits/w", "est. KLD", "why"), floatfmt=".3f"))
    print()
    print(f"{len(plan.tensors)} weights planned for --to {plan.container}: {_plan_line(plan)}")
    print(f"quantized weights {plan.quantized_bytes / 1e6:.2f} MB at {plan.bits_per_weight:.3f} bits/weight; estimated "
          f"weights file {plan.estimated_file_bytes / 1e6:.2f} MB; kept in full precision: {len(plan.kept)}")
    if plan.budget is not None:
        print(f"budget: Fisher-estimated KLD of round-to-nearest in the chosen schemes {plan.budget['predicted_kld_rtn']:.4f}")
    for note in plan.notes:
        print(f"note: {note}")


def _full_precision_type(args) -> str | None:
    """--type F32/F16/BF16 with --to gguf: a GGUF file of the decoded weights in that float type."""
    from lowbit.export.gguf import FLOAT_TYPES

    t = (args.type or "").upper()
    return t if t in FLOAT_TYPES else None


def _write_output(qm, args):
    """Serialise a QuantizedModel in the requested target format."""
    from lowbit.export import write

    return write(qm, args.to, args.output, force=args.force, full_precision=_full_precision_type(args),
                 max_shard_bytes=_shard_bytes(args))


def _shard_bytes(args) -> int | None:
    """--max-shard-size as bytes (None: one weights file)."""
    from lowbit.errors import SchemeError
    from lowbit.plan.budget import parse_size

    size = getattr(args, "max_shard_size", None)
    if size is None:
        return None
    if args.to == "gguf":
        from lowbit.export import GGUF_IS_ONE_FILE

        raise SchemeError(GGUF_IS_ONE_FILE)
    n = parse_size(size)
    if n < 1:
        raise SchemeError(f"--max-shard-size {size}: give a positive size such as 2GB")
    return n


def _refuse_existing(*paths, force: bool) -> None:
    """Before any long work: an output that exists needs --force."""
    from lowbit.errors import SchemeError

    for p in paths:
        if p is not None and Path(p).exists() and not force:
            raise SchemeError(f"{p} already exists; pass --force to replace it or choose another output path")


def cmd_rotate(args):
    from lowbit.export.native import staged_output_dir
    from lowbit.methods.rotation import rotate_model
    from lowbit.model.load import load_lazy, load_source
    from lowbit.streaming import ROTATION_FILE, rotate_streamed

    out = Path(args.output)
    _refuse_existing(out, force=args.force)
    loaded = load_lazy(args.source)   # a safetensors folder is rotated a layer at a time
    if loaded is None:
        loaded = load_source(args.source)
        info = rotate_model(loaded.model, args.kind, args.seed)
    with staged_output_dir(out, args.force) as tmp:
        if loaded.weights is not None:
            rotate_streamed(loaded, args.kind, args.seed, tmp, progress=args.progress)
            info = loaded.model._lowbit_rotation
            (tmp / ROTATION_FILE).unlink()
            loaded.model.config.save_pretrained(tmp)
        else:
            loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    summary = {"output": str(out), **info, "streamed": loaded.weights is not None}
    _print(summary, args.json, [[k, v] for k, v in summary.items()], ("", ""))


def cmd_imatrix(args):
    """Collect an importance matrix on calibration text and write it as llama.cpp's file."""
    from lowbit.calib import CalibrationConfig, imatrix
    from lowbit.errors import SchemeError
    from lowbit.model.load import load_source
    from lowbit.model.targets import select_targets

    out = Path(args.output)
    _refuse_existing(out, force=args.force)
    if out.suffix not in (".gguf", ".dat"):
        raise SchemeError(f"-o {out}: name the file .gguf (llama.cpp's format) or .dat (its legacy format)")
    for flag, value in (("--samples", args.samples), ("--seqlen", args.seqlen)):
        if value < 1:
            raise SchemeError(f"{flag} {value}: give at least 1")
    loaded = load_source(args.source)
    names = imatrix.gguf_names(loaded.model)
    targets = [t for t in select_targets(loaded.model, args.include, args.exclude) if t.kind in ("linear", "conv1d", "experts")]
    cal = CalibrationConfig(args.calib, args.samples, args.seqlen, args.seed)
    windows = cal.windows(loaded.tokenizer)
    stats = imatrix.collect(loaded.model, targets, windows, progress=args.progress)
    dataset = args.calib if args.calib else "lowbit default calibration text"
    path = imatrix.write(out, stats, names, windows.shape[0], args.seqlen, dataset)
    summary = {"output": str(path), "format": "dat" if path.suffix == ".dat" else "gguf", "entries": len(stats),
               "chunks": int(windows.shape[0]), "chunk_size": args.seqlen, "tokens": int(windows.numel()),
               "dataset": dataset}
    _print(summary, args.json, [[k, v] for k, v in summary.items()], ("", ""))


def cmd_qat(args):
    """PTQ init, QAT (optionally distilled) with checkpoints and --resume, saved as a lowbit folder."""
    import shutil

    from lowbit.data import read_text
    from lowbit.errors import SchemeError
    from lowbit.export.native import save
    from lowbit.train.qat import QATConfig, run_qat

    if args.to != "native":
        raise SchemeError(f"qat writes a lowbit folder; drop --to {args.to} and convert the result with "
                          f"`lowbit export OUT --to {args.to}`")
    cfg = QATConfig(args.steps, args.lr, args.warmup, args.batch_size, args.ctx, args.distill, args.scales,
                    args.clip_ste, args.checkpoint_every, args.gradient_checkpointing, args.seed)
    out = Path(args.output)
    _refuse_existing(out, force=args.force)
    text, label = read_text(args.data, "calib")
    loaded, plan, t_load = _plan_from_args(args)
    res = run_qat(loaded, plan, text, label, cfg, out, resume=args.resume, progress=args.progress)
    res.qm.recipe["seconds"]["load"] = t_load
    path = save(res.qm, out, force=args.force)
    if res.checkpoint is not None:
        shutil.rmtree(res.checkpoint, ignore_errors=True)
    summary = {"output": str(path), "init": plan.recipe.method, "scheme": _plan_line(plan), "steps": cfg.steps,
               "distill": cfg.distill, "loss_first": res.losses[0], "loss_last": res.losses[-1],
               "resumed_from": res.resumed_from, "bits_per_weight": res.qm.bits_per_weight,
               "seconds": res.qm.recipe["seconds"], "losses": res.losses}
    _print(summary, args.json, [[k, v] for k, v in summary.items() if k != "losses"], ("", ""))


def cmd_qlora(args):
    """NF4 (double-quantized) base + LoRA adapters trained in full precision, saved for PEFT."""
    from lowbit.data import read_text
    from lowbit.errors import SchemeError
    from lowbit.train.qlora import QLoRAConfig, run_qlora

    if args.to != "native":
        raise SchemeError(f"qlora writes PEFT adapters and a lowbit base folder; drop --to {args.to}")
    scheme_flags = ("format", "bits", "group_size", "asym", "zero_point", "observer", "percentile", "double_quant", "act")
    if args.scheme is None and args.recipe is None and all(getattr(args, k) == args.parser_defaults.get(k)
                                                           for k in scheme_flags):
        args.scheme = "NF4"  # QLoRA's base unless the flags say otherwise: NF4 g64 with double quantization
    cfg = QLoRAConfig(args.steps, args.rank, args.alpha, args.lr, args.warmup, args.batch_size, args.ctx,
                      args.gradient_checkpointing, args.seed)
    out = Path(args.output)
    _refuse_existing(out, force=args.force)
    text, label = read_text(args.data, "calib")
    loaded, plan, _ = _plan_from_args(args)
    res = run_qlora(loaded, plan, text, label, cfg, out, force=args.force, progress=args.progress)
    summary = {"output": str(res.output), "base": _plan_line(plan), "adapted_modules": len(res.adapted),
               "rank": cfg.rank, "steps": cfg.steps, "loss_first": res.losses[0], "loss_last": res.losses[-1],
               "seconds": res.seconds, "losses": res.losses}
    _print(summary, args.json, [[k, v] for k, v in summary.items() if k != "losses"], ("", ""))


def cmd_qlora_merge(args):
    """QLoRA adapters merged into their base, then quantized through the plan like any source."""
    from lowbit.api import execute
    from lowbit.errors import SchemeError
    from lowbit.train.qlora import merge

    if args.source is None:
        raise SchemeError("name the `lowbit qlora` output folder whose adapters to merge")
    _refuse_existing(args.output, force=args.force)
    merged = merge(args.source)
    loaded, plan, _ = _plan_from_args(args, merged)
    qm = execute(loaded, plan, progress=args.progress)
    out = _write_output(qm, args)
    summary = {"output": str(out), "merged": str(args.source), "source": merged.source, "scheme": _plan_line(plan),
               "method": qm.method, "bits_per_weight": qm.bits_per_weight}
    _print(summary, args.json, [[k, v] for k, v in summary.items()], ("", ""))


def _training_text_windows(args, loaded):
    from lowbit.data import read_text
    from lowbit.train.loop import training_windows

    text, label = read_text(args.data, "calib")
    return training_windows(loaded.tokenizer, text, args.ctx, args.batch_size), label


def cmd_fp8_train(args):
    """Fine-tune in FP8 with delayed scaling beside the same run in FP32; print both losses."""
    from lowbit.model.load import load_source
    from lowbit.train.fp8 import FP8Recipe, run_fp8_training
    from lowbit.train.loop import Schedule

    schedule = Schedule(args.steps, args.lr, args.warmup)
    recipe = FP8Recipe(args.history, args.reduction, args.margin)
    out = Path(args.output) if args.output else None
    _refuse_existing(out, force=args.force)
    loaded = load_source(args.source)
    windows, label = _training_text_windows(args, loaded)
    res = run_fp8_training(loaded.model, windows, schedule, recipe, args.batch_size, args.seed,
                           compare_fp32=not args.no_fp32, progress=args.progress)
    if out is not None:
        from lowbit.export.native import staged_output_dir

        with staged_output_dir(out, args.force) as tmp:
            res.model.save_pretrained(tmp)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
    fp8, fp32 = res.losses["fp8"], res.losses.get("fp32")
    gaps = [abs(a - b) / b for a, b in zip(fp8, fp32)] if fp32 else []
    summary = {"layers_in_fp8": len(res.layers), "steps": args.steps, "data": label,
               "recipe": {"history_len": recipe.history_len, "reduction": recipe.reduction, "margin": recipe.margin},
               "loss_fp8_last": fp8[-1], "loss_fp32_last": fp32[-1] if fp32 else None,
               "max_relative_gap": max(gaps) if gaps else None, "seconds": res.seconds,
               "losses": res.losses, "output": None if out is None else str(out)}
    if args.json:
        _print(summary, True)
        return
    every = max(1, args.steps // 10)
    rows = [[i + 1, fp8[i], fp32[i] if fp32 else "-", f"{gaps[i]:.2%}" if gaps else "-"]
            for i in range(len(fp8)) if (i + 1) % every == 0 or i == 0]
    print(tabulate(rows, headers=("step", "loss FP8", "loss FP32", "gap"), floatfmt=".4f"))
    print(f"{len(res.layers)} Linears in FP8 (E4M3 forward, E5M2 gradients, delayed scaling: history "
          f"{recipe.history_len}, {recipe.reduction}, margin {recipe.margin})"
          + (f"; largest gap to FP32 {max(gaps):.2%}" if gaps else ""))


def cmd_bitnet_train(args):
    """Train a small LLaMA from scratch as BitNet b1.58 beside the same model in FP32."""
    from lowbit.data import read_text, token_windows
    from lowbit.errors import SchemeError
    from lowbit.export.native import save
    from lowbit.model.load import load_source
    from lowbit.train.bitnet import TinyLlama, run_bitnet, without_input_quant
    from lowbit.train.loop import Schedule

    schedule = Schedule(args.steps, args.lr, args.warmup)
    shape = TinyLlama(args.layers, args.hidden, args.intermediate, args.heads, args.heads, args.ctx)
    out = Path(args.output)
    _refuse_existing(out, args.gguf, force=args.force)
    if args.gguf and (args.hidden % 256 or args.intermediate % 256):
        raise SchemeError(f"--gguf writes {args.gguf_type} blocks of 256: --hidden ({args.hidden}) and --intermediate "
                          f"({args.intermediate}) must be multiples of 256")
    loaded = load_source(args.source)   # for its tokenizer
    windows, label = _training_text_windows(args, loaded)
    eval_text, _ = read_text(args.eval_data, "eval")
    held_out = token_windows(loaded.tokenizer, eval_text, args.ctx, 8)
    res = run_bitnet(loaded.tokenizer, windows, held_out, shape, schedule, args.batch_size, args.seed,
                     compare_fp32=not args.no_fp32, progress=args.progress)
    path = save(res.qm, out, force=args.force)
    gguf_path = None
    if args.gguf:
        from lowbit.export.gguf import write_gguf

        gguf_path = str(write_gguf(without_input_quant(res.qm), args.gguf, force=args.force, ternary=args.gguf_type))
    summary = {"output": str(path), "gguf": gguf_path, "shape": dataclasses.asdict(shape), "steps": args.steps, "data": label,
               "bits_per_weight": res.qm.bits_per_weight, "train_loss_last": {k: v[-1] for k, v in res.losses.items()},
               "held_out_loss": res.eval_loss, "seconds": res.seconds, "losses": res.losses}
    if args.json:
        _print(summary, True)
        return
    every = max(1, args.steps // 10)
    kinds = list(res.losses)
    rows = [[i + 1, *(res.losses[k][i] for k in kinds)] for i in range(args.steps) if (i + 1) % every == 0 or i == 0]
    print(tabulate(rows, headers=["step", *(f"loss {k}" for k in kinds)], floatfmt=".4f"))
    print("held-out next-token loss: " + ", ".join(f"{k} {v:.4f}" for k, v in res.eval_loss.items())
          + f"; ternary model saved to {path} ({res.qm.bits_per_weight:.2f} bits/weight)")


def cmd_export(args):
    """Serialise a lowbit folder (or a source, in full precision) into another format."""
    from lowbit.errors import SchemeError
    from lowbit.model.load import load_source, resolve_source

    _shard_bytes(args)   # checked before any work
    path, kind = resolve_source(args.input)
    if kind == "lowbit":
        from lowbit.export.native import load

        obj = load(path)
    else:
        if args.to != "gguf" or (args.type or "").upper() not in ("F32", "F16", "BF16"):
            raise SchemeError(f"{args.input} is not a lowbit output: only `--to gguf --type F32|F16|BF16` can export it as it is; "
                              "run `lowbit quantize ... --to ...` to quantize and export in one step")
        obj = load_source(path)
    out = _write_output(obj, args)
    _print({"output": str(out)}, args.json, [["output", str(out)]], ("", ""))


def cmd_convert(args):
    from lowbit.convert import read_quantized
    from lowbit.errors import SchemeError
    from lowbit.export import write

    from lowbit.export import CHECKPOINT_EXPORTERS

    _refuse_existing(args.output, force=args.force)
    # a lowbit folder into a checkpoint format: read one tensor at a time, never loaded whole
    qm = read_quantized(args.input, lazy=args.to in CHECKPOINT_EXPORTERS)
    if args.to == "gguf":
        from lowbit.convert import to_gguf_blocks
        from lowbit.export.gguf import write_gguf

        _shard_bytes(args)
        qm, float_types, rows = to_gguf_blocks(qm, args.refit_type, progress=args.progress)
        out = write_gguf(qm, args.output, float_types, force=args.force)
    else:
        if args.refit_type:
            raise SchemeError("--refit-type applies to --to gguf; the other exporters store lowbit's codes as they are")
        if args.to != "native":   # GGUF's linear 32-blocks are integer groups for the checkpoint formats
            from lowbit.convert import blocks_as_integers

            qm = blocks_as_integers(qm)
        out = write(qm, args.to, args.output, force=args.force, max_shard_bytes=_shard_bytes(args))
        rows = [{"name": n, "source": qt.format.name, "target": args.to, "how": "exact", "added_rel_err": 0.0}
                for n, qt in qm.tensors.items()]
    rows = [r if isinstance(r, dict) else dataclasses.asdict(r) for r in rows]
    counts = {how: sum(r["how"] == how for r in rows) for how in ("exact", "codes kept", "re-fitted")}
    summary = {"output": str(out), "to": args.to, "tensors": counts,
               "max_added_rel_err": max((r["added_rel_err"] for r in rows), default=0.0), "per_tensor": rows}
    if args.json:
        _print(summary, True)
        return
    shown = [r for r in rows if r["how"] != "exact"] if not args.tensors else rows
    if shown:
        print(tabulate([[r["name"], r["source"], r["target"], r["how"], r["added_rel_err"], r.get("note") or ""]
                        for r in shown[: None if args.tensors else 12]],
                       headers=("tensor", "from", "to", "how", "added rel err", "note"), floatfmt=".2e"))
        if not args.tensors and len(shown) > 12:
            print(f"... {len(shown) - 12} more (--tensors lists all)")
    print(f"{counts['exact']} tensors exact, {counts['codes kept']} with their codes kept, {counts['re-fitted']} "
          f"re-fitted (largest added error {summary['max_added_rel_err']:.2e}); wrote {out}")


def cmd_eval(args):
    from lowbit.errors import DataError, SourceError
    from lowbit.eval.divergence import CacheProtocol
    from lowbit.eval.domains import read_named_texts
    from lowbit.eval.layers import LayerError
    from lowbit.eval.report import candidate_record, check_context, eval_windows, load_candidate, resolve_reference, source_candidate
    from lowbit.model.load import load_source

    data, extra = None, {}
    if args.domains:
        extra = read_named_texts(args.data)
    elif args.data and len(args.data) > 1:
        raise DataError("--data names one evaluation text; several (as NAME=FILE) only with --domains")
    elif args.data:
        data = args.data[0]
    protocol = None
    kv_spec = _kv_spec(args)
    if kv_spec is not None:
        if args.domains:
            raise DataError("--domains with --kv is not supported; evaluate the KV cache and the domains in two runs")
        protocol = CacheProtocol.for_window(kv_spec, args.ctx, args.kv_chunk)
    if args.candidate is None:
        if protocol is None:
            raise SourceError("name a CANDIDATE to evaluate, or pass --kv K to evaluate the source's own weights "
                              "with a quantized KV cache")
        ref = load_source(args.reference)
        cand = source_candidate(ref)
    else:
        cand = load_candidate(args.candidate)
        ref = load_source(resolve_reference(cand, args.reference))
    check_context(ref.model, args.ctx, ref.source)
    windows = eval_windows(ref.tokenizer, data, args.ctx, args.windows)
    result = candidate_record(cand, ref.model, ref.tokenizer, windows, protocol, args.domains, extra, args.windows,
                              args.seed, progress=args.progress)
    if args.json:
        _print(result, True)
        return
    layers = [LayerError(**r) for r in result.get("layers", [])]
    # worst first; all of them with --layers, the ten worst otherwise
    layers = sorted(layers, key=lambda r: -(r.output_rel_err if r.output_rel_err is not None else r.weight_rel_err))
    if not args.layers:
        layers = layers[:10]
    if layers:
        print(tabulate([[r.name, r.weight_rel_err, r.output_rel_err] for r in layers],
                       headers=("layer", "weight rel err", "output rel err"), floatfmt=".4f"))
        print()
    keys = ("ppl", "ref_ppl", "kld", "kld_p99", "top1", "bits_per_weight", "bits_per_weight_file", "size_bytes", "n_tokens")
    if protocol is not None:
        keys += ("kv_cache_bytes", "kv_cache_fp16_bytes", "kv_ratio_fp16")
        print(f"KV cache {result['kv_label']} against a full-precision cache; each window: a {protocol.prefill}-token "
              f"prefill, forwards of {protocol.chunk} tokens, the last {protocol.tail} tokens one at a time")
    print(tabulate([[k, result[k]] for k in keys], floatfmt=".4f"))
    if args.domains:
        print(f"\nper domain ({args.windows} windows x {args.ctx} tokens each; sensitivity = KLD / prose KLD)")
        print(tabulate([[n, d["kld"], d["sensitivity"], d["top1"], d["ppl"], d["ref_ppl"]] for n, d in result["domains"].items()],
                       headers=("domain", "KLD", "sensitivity", "top-1", "PPL", "ref PPL"), floatfmt=".4f"))
        for n, g in result["generations"].items():
            print(f"\n[{n}] {g['prompt']!r}")
            print(tabulate([[g["reference"], g["candidate"]]], headers=("reference", "candidate"),
                           tablefmt="grid", maxcolwidths=[50, 50]))


def cmd_report(args):
    from lowbit.report import check_output, collect_records, parse_candidate, unique_labels, write_report

    check_output(args.output, args.force)
    records = collect_records([parse_candidate(c) for c in args.candidates], args.reference, args.data, args.ctx,
                              args.windows, domains=not args.no_domains, seed=args.seed, progress=args.progress)
    records = unique_labels(records)
    paths = write_report(records, args.output, args.title, args.reference, args.force)
    rows = [[r["label"], r["size_bytes"] / 1e6, r["kld"], r.get("top1")] for r in records]
    if args.json:
        _print({"written": {k: str(v) for k, v in paths.items()},
                "candidates": [dict(zip(("label", "mb", "kld", "top1"), row)) for row in rows]}, True)
        return
    print(tabulate(rows, headers=("candidate", "MB stored", "KLD", "top-1"), floatfmt=(".2f", ".2f", ".4f", ".3f")))
    print("\n".join(f"wrote {p}" for p in paths.values()))


def cmd_recommend(args):
    import tempfile

    from lowbit.calib import CalibrationConfig
    from lowbit.errors import DataError
    from lowbit.eval.report import eval_windows
    from lowbit.model.load import load_source
    from lowbit.plan.budget import parse_size
    from lowbit.recommend import explain, keep, recommend

    budget = parse_size(args.budget)
    work_parent = None
    if args.output:
        _refuse_existing(args.output, force=args.force)
        work_parent = Path(args.output).resolve().parent
        if not work_parent.is_dir():
            raise DataError(f"the folder {work_parent} for -o does not exist; create it or choose another path")
    loaded = load_source(args.source)
    windows = eval_windows(loaded.tokenizer, args.data, args.ctx, args.windows)
    calibration = CalibrationConfig(text=args.calib, samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix=".lowbit-recommend-", dir=work_parent) as work:
        outcomes = recommend(loaded, args.use, budget, calibration, windows, Path(work), progress=args.progress)
        best = outcomes[0]
        if best.status != "measured":
            raise DataError(f"no candidate's file came out within --budget {args.budget}: "
                            + "; ".join(f"{o.choice.name} {o.file_bytes or o.planned_bytes} bytes" for o in outcomes))
        kept = str(keep(best, args.output)) if args.output else None
    why = explain(best, outcomes, budget)
    if args.json:
        _print({"use": args.use, "budget_bytes": budget, "recommended": best.choice.name, "why": why, "output": kept,
                "eval": {"windows": windows.shape[0], "ctx": windows.shape[1]},
                "calibration": {"samples": args.samples, "seqlen": args.seqlen},
                "candidates": [o.as_dict() for o in outcomes]}, True)
        return
    mb = lambda b: None if b is None else b / 1e6  # noqa: E731
    print(tabulate([[o.choice.name, o.choice.container, mb(o.planned_bytes), mb(o.file_bytes), o.kld, o.top1, o.status,
                     o.choice.runtime] for o in outcomes],
                   headers=("candidate", "format", "planned MB", "file MB", "KLD", "top-1", "status", "loads in"),
                   floatfmt=("", "", ".1f", ".1f", ".4f", ".3f"), missingval="–", maxcolwidths=[None] * 7 + [40]))
    print(f"\nrecommended: {why}" + (f"\nwritten: {kept}" if kept else "\n(pass -o OUT to keep it)"))


def cmd_compare(args):
    """Quantize one source with several schemes and evaluate each against it: the demo table."""
    import copy

    from lowbit.api import quantize
    from lowbit.eval.divergence import compare, run_reference
    from lowbit.eval.report import eval_windows
    from lowbit.model.load import load_source
    from lowbit.scheme import preset

    t0 = time.perf_counter()
    loaded = load_source(args.source)
    t_load = time.perf_counter() - t0
    windows = eval_windows(loaded.tokenizer, args.data, args.ctx, args.windows)
    t0 = time.perf_counter()
    ref = run_reference(loaded.model, windows, progress=args.progress)
    t_ref = time.perf_counter() - t0
    rows = []
    for name in args.schemes:
        scheme = preset(name)
        work = copy.deepcopy(loaded)
        t0 = time.perf_counter()
        qm = quantize(work, name, method=args.method, progress=False)
        t_q = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = compare(qm.model, ref, progress=args.progress)
        t_e = time.perf_counter() - t0
        rows.append({"method": args.method, "scheme": name, "format": scheme.label(),
                     "bits_per_weight": qm.bits_per_weight, "quantized_mb": qm.quantized_bytes / 1e6,
                     "ppl": res.ppl, "ref_ppl": res.ref_ppl, "kld": res.kld, "kld_p99": res.kld_p99, "top1": res.top1,
                     "seconds_quantize": t_q, "seconds_eval": t_e})
        del work, qm
    out = {"source": loaded.source, "tokens": int(ref.windows[:, 1:].numel()), "seconds_load": t_load,
           "seconds_reference": t_ref, "rows": rows}
    if args.json:
        _print(out, True)
        return
    print(f"source: {loaded.source}\neval: {windows.shape[0]} windows x {windows.shape[1]} tokens; "
          f"reference PPL {rows[0]['ref_ppl']:.3f}; load {t_load:.1f}s, reference pass {t_ref:.1f}s")
    print(tabulate([[r["method"], r["format"], r["bits_per_weight"], r["quantized_mb"], r["ppl"], r["kld"], r["top1"],
                     r["seconds_quantize"], r["seconds_eval"]] for r in rows],
                   headers=("method", "format", "bits/weight", "quantized MB", "PPL", "KLD", "top-1", "quantize s", "eval s"),
                   floatfmt=("", "", ".3f", ".2f", ".3f", ".4f", ".3f", ".1f", ".1f")))


def cmd_generate(args):
    from lowbit.errors import SourceError
    from lowbit.eval.report import generate_text, load_candidate, resolve_reference
    from lowbit.model.load import load_source
    from lowbit.runtime.kv_cache import QuantizedKVCache

    spec = _kv_spec(args)
    if args.candidate is None:
        if spec is None:
            raise SourceError("name a CANDIDATE, or pass --kv K to generate with the source's own weights and a "
                              "quantized KV cache")
        ref = load_source(args.reference)
        cand_model, cand_tok = ref.model, ref.tokenizer
    else:
        cand = load_candidate(args.candidate)
        ref = load_source(resolve_reference(cand, args.reference))
        cand_model, cand_tok = cand.model, cand.tokenizer
    cand_label = "candidate" if spec is None else f"candidate, KV {spec.label()}"
    outputs = {}
    for label, model, tok, kv in (("reference", ref.model, ref.tokenizer, None), ("candidate", cand_model, cand_tok, spec)):
        cache = None if kv is None else QuantizedKVCache(kv, model.config)
        outputs[label] = generate_text(model, tok, args.prompt, args.max_new_tokens, cache)
    if args.json:
        _print({"prompt": args.prompt, **outputs, "kv": None if spec is None else spec.as_dict()}, True)
        return
    print(tabulate([[outputs["reference"], outputs["candidate"]]], headers=("reference", cand_label),
                   tablefmt="grid", maxcolwidths=[50, 50]))


def cmd_info(args):
    from lowbit.info import describe

    info = describe(args.path)
    if args.json:
        _print(info, True)
        return
    for k, v in info.items():
        if isinstance(v, list):
            print(f"{k}:")
            print(tabulate(v, headers="keys"))
        elif isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk}: {vv}")
        else:
            print(f"{k}: {v}")


def cmd_size(args):
    from lowbit.errors import SchemeError
    from lowbit.sizing import arch_from_config, estimate, kv_estimate, nearest_arch, parse_count

    arch, params = (tuple(args.arch) if args.arch else None), None
    if args.config:
        if args.arch:
            raise SchemeError("pass --arch LAYERS KV_HEADS HEAD_DIM or --config, not both")
        arch, _, params = arch_from_config(args.config)
    if args.params is not None:
        params = parse_count(args.params)
    if params is None:
        raise SchemeError("give the parameter count (e.g. lowbit size 70B), or --config a model folder with safetensors")
    if args.kv and args.kv_bits != 16:
        raise SchemeError("pass --kv KIND or --kv-bits N, not both")
    if args.kv and args.context <= 0:
        raise SchemeError("--kv sizes a KV cache: add --context TOKENS (and --batch REQUESTS)")
    kv = args.kv[0] if args.kv else None
    fmts = args.format or ["fp32", "fp16", "int8", "int4"]
    if not args.kv and (args.kv_residual is not None or args.kv_sink is not None):
        raise SchemeError("--kv-residual/--kv-sink size a quantized KV cache: add --kv KIND")
    rows = [estimate(params, f, args.group_size, args.asym, args.context, args.batch, args.kv_bits, arch, kv,
                     args.kv_residual, args.kv_sink) for f in fmts]
    kv_rows = []
    if args.kv:
        geometry = arch or nearest_arch(params)
        kv_rows = [kv_estimate(k, geometry, args.context, args.batch, args.kv_residual, sink=args.kv_sink)
                   for k in dict.fromkeys(["fp16", *args.kv])]
    if args.json:
        weights = [r.as_dict() for r in rows]
        _print(weights if not kv_rows else {"weights": weights, "kv_cache": [r.as_dict() for r in kv_rows]}, True)
        return
    gb = 1e9
    print(tabulate([[r.format, r.bits, r.weight_bytes / gb, r.scale_bytes / gb,
                     None if r.kv_cache_bytes is None else r.kv_cache_bytes / gb, r.total_bytes / gb] for r in rows],
                   headers=("format", "bits", "weights GB", "scales GB", f"KV cache GB ({kv or f'{args.kv_bits}-bit'})",
                            "total GB"), floatfmt=".2f"))
    if kv_rows:
        g = kv_rows[0]
        print(f"\nKV cache: {g.layers} layers x {g.kv_heads} KV heads x head_dim {g.head_dim}, "
              f"{args.batch} request(s) x {args.context} tokens")
        print(tabulate([[r.label, r.bits_per_element, r.bytes_per_token / 1024, r.total_bytes / gb, r.total_bytes / 2**30,
                         r.ratio_fp16] for r in kv_rows],
                       headers=("KV cache", "bits/element", "KiB/token", "GB", "GiB", "x fp16"),
                       floatfmt=("", ".3f", ".1f", ".2f", ".2f", ".3f")))


def cmd_bench_infer(args):
    """Resident memory and tokens/s of a candidate against its full-precision source (and
    llama.cpp on a GGUF of the same quantization), each in a fresh process, ratios in one run."""
    from lowbit.data import read_text
    from lowbit.errors import SourceError
    from lowbit.eval.speed import measure, prompt_tokens, with_ratios
    from lowbit.model.load import resolve_source

    path, kind = resolve_source(args.candidate)
    if kind != "lowbit":
        raise SourceError(f"{path} is not a lowbit output; bench-infer measures a folder written by `lowbit quantize`")
    from lowbit.export.native import read_recipe
    from transformers import AutoTokenizer

    recipe = read_recipe(path)
    kv = _kv_spec(args)
    reference = args.reference if args.reference is not None else recipe.get("source")
    if args.gguf is not None and not Path(args.gguf).is_file():
        raise SourceError(f"--gguf {args.gguf} does not exist; pass a .gguf file (e.g. from `lowbit export --to gguf`)")
    tok = AutoTokenizer.from_pretrained(path)
    text, _ = read_text(args.data, "eval")
    prompt = prompt_tokens(tok, text, args.prompt_tokens)
    base = {"prompt": prompt, "decode_tokens": args.decode_tokens, "threads": args.threads,
            "warm_config": str(path), "repeats": args.repeats}
    specs = [{**base, "label": "source (fp32)", "runtime": "source", "path": None if reference in (None, "default") else reference},
             {**base, "label": f"candidate ({args.runtime}{'' if kv is None else ', KV ' + kv.label()})",
              "runtime": args.runtime, "path": str(path), **({"kv": kv.as_dict()} if kv else {})}]
    if args.compile:
        specs.append({**specs[1], "label": f"candidate ({args.runtime}, torch.compile)", "compile": True})
    if args.gguf:
        specs.append({**base, "label": "llama.cpp (" + Path(args.gguf).name + ")", "runtime": "llama.cpp",
                      "path": str(Path(args.gguf).resolve())})
    rows = []
    for spec in tqdm(specs, desc="bench-infer", disable=args.json):
        rows.append(measure(spec))
    rows = with_ratios(rows, "source (fp32)")
    if args.json:
        _print({"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "threads": args.threads,
                "rows": rows}, True)
        return
    mb = 1e6
    print(tabulate([[r["label"], "failed: " + r["error"]] if "error" in r else
                    [r["label"], r["model_rss"] / mb, r.get("model_rss_ratio"), r["prefill_tok_s"], r.get("prefill_speedup"),
                     r["decode_tok_s"], r.get("decode_speedup"), r.get("same_tokens_as_reference"),
                     ", ".join(f"{k} {v}" for k, v in r.get("kernels", {}).items())] for r in rows],
                   headers=("model", "resident MB", "x source", "prefill tok/s", "x source", "decode tok/s", "x source",
                            "same greedy tokens", "kernels"), floatfmt=".2f"))
    print(f"\n{args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens, {args.threads} threads; resident MB: "
          "RSS after load and one warm-up generation, minus the process's RSS before the load")


def _add_plan_flags(q):
    """Flags shared by quantize and plan: they describe one Recipe."""
    q.add_argument("source", nargs="?", help="HF folder, .gguf file; default: embedded SmolLM2-135M-Instruct")
    q.add_argument("--recipe", help="a YAML recipe (method, scheme, targets, groups, budget, ...) instead of the flags below")
    q.add_argument("--method", default="rtn", help="rtn | gptq | awq | smoothquant | hqq | llm_int8 (scheme LLM_INT8) | "
                                                    "sparsegpt | wanda (--opt sparsity=2:4) | aqlm (--opt codebooks=2 "
                                                    "--opt codebook_bits=8) | quip (2-bit E8P lattice, format e8p)")
    _add_scheme_flags(q)
    q.add_argument("--act", choices=_ACT_CHOICES, default=None,
                   help="input (activation) quantization with --format: int8 (per-token dynamic), int8-static (per "
                        "tensor, calibrated), int4, fp8 (E4M3 per token), fp8-static, nvfp4 (static global scale), "
                        "nvfp4-dynamic, mxfp8, mxfp4 (default: none, or the --scheme preset's)")
    q.add_argument("--act-observer", default="minmax", choices=["minmax", "percentile", "mse", "kl"],
                   help="static activation ranges from calibration activations (default minmax)")
    q.add_argument("--calib", help="calibration text file (default: Python reference manual, calibration part)")
    q.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-sequential", action="store_true", help="feed full-precision (not quantized) layer outputs forward")
    q.add_argument("--hessian-precision", default="fp32", choices=["fp32", "bf16"],
                   help="X^T X products: fp32 (default) or bf16 inputs with fp32 accumulation (same numbers on "
                        "every CPU); faster only where a probe finds oneDNN bf16 kernels (recipe: "
                        "hessian_precision_path); on AVX512-BF16 without AMX it is fp32-emulated, no faster")
    q.add_argument("--expert-min-tokens", type=int, default=128,
                   help="GPTQ on MoE experts: each expert is solved from the tokens routed to it; one reached by "
                        "fewer tokens is calibrated on every calibration token instead (default 128; recorded)")
    q.add_argument("--damp", type=float, help="GPTQ: dampening as a fraction of the mean Hessian diagonal (0.01)")
    q.add_argument("--act-order", dest="act_order", action="store_true", default=None, help="GPTQ: act-order (default on)")
    q.add_argument("--no-act-order", dest="act_order", action="store_false")
    q.add_argument("--opt", action="append", help="method option KEY=VALUE (repeatable), e.g. alpha=0.5")
    q.add_argument("--rotate", choices=["hadamard", "learned"],
                   help="rotate the model before the method (QuaRot R1+R2: norms folded, randomized Hadamard on the "
                        "residual stream and per head); same function, a plain checkpoint, outliers spread out")
    q.add_argument("--rotate-seed", type=int, default=0, help="--rotate: seed of the Hadamard's random signs (default 0)")
    q.add_argument("--imatrix", help="llama.cpp importance matrix (.gguf or .dat, from llama-imatrix or `lowbit "
                                     "imatrix`): weights each column's error in RTN's fits, as llama-quantize does")
    q.add_argument("--to", default="native", choices=["native", "gguf", "compressed-tensors", "gptq", "awq"])
    q.add_argument("--type", help="--to gguf: a llama.cpp mix (Q4_K_M, Q8_0, ...), F32/F16, or auto (with a budget)")
    q.add_argument("--max-size", help="largest weights file (e.g. 91.7MB, 87MiB): lowbit chooses each tensor's scheme "
                                      "among --candidates to minimise the Fisher-estimated KL divergence within it")
    q.add_argument("--target-bpw", type=float, help="average bits per weight of the quantized weights (e.g. 4.25), "
                                                    "each tensor's scheme chosen like --max-size")
    q.add_argument("--candidates", "--gguf-types", dest="candidates",
                   help="a budget's choices, comma-separated: GGUF types for --to gguf (default Q2_K,Q3_K,Q4_0,Q4_K,"
                        "Q4_1,Q5_0,Q5_K,Q5_1,Q6_K,Q8_0), else schemes like int4_g64, int8_ch, nf4_g64 (default "
                        "int2..int8 at g32/g64/g128)")
    q.add_argument("--fisher-windows", type=int, default=16,
                   help="budgets: calibration windows for the Fisher information that prices each scheme (default 16)")
    q.add_argument("--fallback", default="measured", choices=["measured", "llama.cpp"],
                   help="--to gguf: type for rows that do not fit 256-blocks: the most accurate block-32 type no "
                        "larger than llama.cpp's choice (measured), or llama.cpp's fixed table")
    q.add_argument("--json", action="store_true")


def _add_training_flags(p, ctx: int, lr: float, lr_note: str = "") -> None:
    """Flags every training command shares: steps, text, window, batch, learning-rate schedule."""
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--data", help="training text (default: Python reference manual, calibration part)")
    p.add_argument("--ctx", type=int, default=ctx, help=f"tokens per training window (default {ctx})")
    p.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g}{lr_note})")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 5%% of --steps)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (not the whole usage) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lowbit", description="Quantize LLMs and measure what it cost.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes, only the results")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    _add_plan_flags(q)
    q.add_argument("--output", "-o", required=True)
    q.add_argument("--force", action="store_true", help="replace an existing output")
    q.add_argument("--max-shard-size", metavar="SIZE", help="split a folder output's weights into safetensors shards "
                   "of at most SIZE (e.g. 5GB) with model.safetensors.index.json (default: one file)")
    q.add_argument("--resume", action="store_true",
                   help="continue a killed run into --output from its .OUTPUT.partial folder (a safetensors source "
                        "is quantized layer by layer; same bytes as an uninterrupted run)")
    q.add_argument("--workers", type=int,
                   help="data-parallel calibration over N local torch.distributed ranks (gloo): windows split, "
                        "statistics all-reduced, GPTQ's solving split by weight; the same codes as one process "
                        "(`torchrun --nproc-per-node N -m lowbit quantize ...` does the same)")
    q.set_defaults(func=cmd_quantize)

    pl = sub.add_parser("plan", help="what each tensor would become, its size and estimated cost; nothing quantized")
    _add_plan_flags(pl)
    pl.set_defaults(func=cmd_plan)

    t = sub.add_parser("qat", help="quantization-aware training from a PTQ start (optionally distilled)",
                       description="Quantize with --init (rtn, gptq, awq, ...) and the scheme flags or --recipe, then "
                                   "fine-tune the quantized weights with fake quantization (straight-through "
                                   "gradients; learned LSQ scales for integer formats), AdamW with warm-up and a "
                                   "cosine schedule, on --data windows of --ctx tokens. --distill trains on the KL "
                                   "divergence to the full-precision model's logits. Checkpoints every K steps go to "
                                   "OUT.qat-checkpoint/; --resume continues from there bit-identically.")
    _add_plan_flags(t)
    t.add_argument("--init", dest="method", help="the PTQ method training starts from (same as --method; default rtn)")
    _add_training_flags(t, ctx=512, lr=1e-5)
    t.add_argument("--distill", action="store_true", help="loss = KL(full-precision model || student) on the logits")
    t.add_argument("--scales", default="auto", choices=["auto", "lsq", "fixed", "dynamic"],
                   help="group parameters: lsq (learned; integer formats), fixed (the PTQ start's), dynamic (refitted "
                        "every step); auto = lsq for integers, else fixed")
    t.add_argument("--clip-ste", action="store_true", help="no gradient to weights outside their group's grid (with --scales fixed or dynamic; LSQ clips by itself)")
    t.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: none; default 50)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward (less memory)")
    t.add_argument("--resume", action="store_true", help="continue from OUT.qat-checkpoint/ (same flags)")
    t.add_argument("--output", "-o", required=True)
    t.add_argument("--force", action="store_true", help="replace an existing output")
    t.set_defaults(func=cmd_qat)

    lq = sub.add_parser("qlora", help="QLoRA: LoRA adapters trained on a frozen NF4 base, saved in PEFT's layout",
                        description="Quantize the base (default --scheme NF4: NF4 g64 with double quantization; any "
                                    "format decoded per call), keep it packed and frozen, and train LoRA adapters on "
                                    "its quantized Linears with the next-token loss on --data. OUT holds "
                                    "adapter_config.json and adapter_model.safetensors (PEFT loads them onto the base) "
                                    "and base/, the quantized base as a lowbit folder.")
    _add_plan_flags(lq)
    _add_training_flags(lq, ctx=512, lr=2e-4)
    lq.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    lq.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha / r (default 16)")
    lq.add_argument("--gradient-checkpointing", action="store_true")
    lq.add_argument("--output", "-o", required=True)
    lq.add_argument("--force", action="store_true")
    lq.set_defaults(func=cmd_qlora)

    mg = sub.add_parser("qlora-merge", help="merge QLoRA adapters into their base and quantize the result",
                        description="The adapters of a `lowbit qlora` output added to its decoded base (as PEFT's "
                                    "merge_and_unload does), then quantized with the scheme flags, method and "
                                    "exporter as `lowbit quantize` takes them (default: int4 g128, RTN).")
    _add_plan_flags(mg)
    next(a for a in mg._actions if a.dest == "source").help = "a `lowbit qlora` output folder"
    mg.add_argument("--output", "-o", required=True)
    mg.add_argument("--force", action="store_true")
    mg.set_defaults(func=cmd_qlora_merge)

    f8 = sub.add_parser("fp8-train", help="fine-tune with FP8 delayed scaling beside the same run in FP32",
                        description="Every target Linear computes in FP8 (Transformer Engine's HYBRID: E4M3 inputs and "
                                    "weights, E5M2 output gradients, per-tensor scales from an amax history updated "
                                    "after each step; GEMMs through torch._scaled_mm), the master weights in FP32. "
                                    "The same model trains in FP32 on the same batches for comparison.")
    f8.add_argument("source", nargs="?", help="HF folder, .gguf file; default: embedded SmolLM2-135M-Instruct")
    _add_training_flags(f8, ctx=512, lr=1e-5)
    f8.add_argument("--seed", type=int, default=0)
    f8.add_argument("--history", type=int, default=16, help="amax history length (default 16)")
    f8.add_argument("--reduction", default="max", choices=["max", "most_recent"], help="how a scale reads its history")
    f8.add_argument("--margin", type=int, default=0, help="scale headroom in powers of two (default 0)")
    f8.add_argument("--no-fp32", action="store_true", help="skip the FP32 comparison run")
    f8.add_argument("--output", "-o", help="save the FP8-trained model (an HF folder)")
    f8.add_argument("--force", action="store_true")
    f8.add_argument("--json", action="store_true")
    f8.set_defaults(func=cmd_fp8_train)

    bn = sub.add_parser("bitnet-train", help="train a small LLaMA from scratch as BitNet b1.58, beside FP32",
                        description="Ternary weights (per-tensor absmean scale) and 8-bit per-token inputs in every "
                                    "Linear, straight-through gradients, trained from random initialisation; the same "
                                    "model (same initial weights, batches and schedule) trains in FP32 beside it. "
                                    "The ternary model is saved as a lowbit folder.")
    bn.add_argument("source", nargs="?", help="where the tokenizer comes from (default: the embedded default's)")
    _add_training_flags(bn, ctx=256, lr=1.5e-3, lr_note=", BitNet's small-model rate")
    bn.add_argument("--eval-data", help="held-out text (default: Python reference manual, evaluation part)")
    bn.add_argument("--layers", type=int, default=4)
    bn.add_argument("--hidden", type=int, default=256)
    bn.add_argument("--intermediate", type=int, default=688)
    bn.add_argument("--heads", type=int, default=4)
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--no-fp32", action="store_true", help="skip the FP32 comparison run")
    bn.add_argument("--gguf-type", default="TQ2_0", choices=["TQ2_0", "TQ1_0"],
                    help="--gguf: llama.cpp's ternary block type (TQ2_0 2.06 bits/weight, TQ1_0 1.69; default TQ2_0)")
    bn.add_argument("--gguf", help="also write the ternary weights as a llama.cpp GGUF (TQ2_0; rows must be multiples "
                                   "of 256); llama.cpp quantizes their inputs to 8 bits itself (Q8_K)")
    bn.add_argument("--output", "-o", required=True)
    bn.add_argument("--force", action="store_true")
    bn.add_argument("--json", action="store_true")
    bn.set_defaults(func=cmd_bitnet_train)

    x = sub.add_parser("export", help="write a lowbit output as GGUF / compressed-tensors / GPTQ / AWQ")
    x.add_argument("input", help="a lowbit output folder (or a source, for --to gguf --type F32/F16)")
    x.add_argument("--to", required=True, choices=["native", "gguf", "compressed-tensors", "gptq", "awq"])
    x.add_argument("--type", help="--to gguf: F32/F16/BF16 for a full-precision file; quantized types come from quantize")
    x.add_argument("--output", "-o", required=True)
    x.add_argument("--force", action="store_true")
    x.add_argument("--max-shard-size", metavar="SIZE", help="split a folder output's weights into safetensors shards "
                   "of at most SIZE (e.g. 5GB) with model.safetensors.index.json (default: one file)")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export)

    cv = sub.add_parser("convert", help="a quantized checkpoint into GGUF / compressed-tensors / GPTQ / AWQ / native, "
                        "exactly where the grids map",
                        description="Write a quantized model in another runtime's format without quantizing it again "
                                    "where the grids map (symmetric INT2-8 and float-minimum INT2-5 in groups of "
                                    "multiples of 32 are Q4_0/Q5_0/Q8_0/Q4_1/Q5_1 blocks already, MXFP4 is MXFP4, "
                                    "ternary is TQ2_0); an integer zero-point becomes Q4_1/Q5_1 with its codes kept; "
                                    "other tensors are re-fitted into a GGUF type. A table says which tensor went "
                                    "which way and the error it added.")
    cv.add_argument("input", help="a lowbit output, a GGUF file, or a GPTQ / AWQ / compressed-tensors checkpoint folder")
    cv.add_argument("--to", required=True, choices=["gguf", "native", "compressed-tensors", "gptq", "awq"])
    cv.add_argument("--refit-type", help="--to gguf: GGML type for tensors no block holds (default: the k-quant of "
                                         "their bits, e.g. Q3_K for int3, Q4_K for NF4)")
    cv.add_argument("--tensors", action="store_true", help="list every tensor (default: the ones not exact)")
    cv.add_argument("--output", "-o", required=True)
    cv.add_argument("--force", action="store_true")
    cv.add_argument("--max-shard-size", metavar="SIZE", help="split a folder output's weights into safetensors shards "
                   "of at most SIZE (e.g. 5GB) with model.safetensors.index.json (default: one file)")
    cv.add_argument("--json", action="store_true")
    cv.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="perplexity, KLD and top-1 of a candidate against its reference",
                       description="Perplexity, KLD and top-1 of a candidate against its reference. With --kv K the "
                                   "logits come through a quantized KV cache: each window's first half is one "
                                   "prefill forward, the rest runs in forwards of --kv-chunk tokens and its last 16 "
                                   "tokens one at a time, so every later token attends to the keys/values the cache "
                                   "stores (quantized on write, decoded on read); the reference runs the same "
                                   "forwards with a full-precision cache. Without a CANDIDATE, the source's own "
                                   "weights with the quantized cache are compared with the same weights and a "
                                   "full-precision cache; with one, its weights and cache against the source.")
    e.add_argument("candidate", nargs="?", help="lowbit folder, HF folder or .gguf (optional with --kv)")
    e.add_argument("--reference", help="the source (default: the candidate's recorded source, or the embedded default)")
    e.add_argument("--data", action="append", help="text file (default: Python reference manual, evaluation part); "
                   "with --domains, NAME=FILE adds a domain (repeatable); windows are cut "
                                  "from the whole text concatenated, e.g. WikiText-2 test.txt with --ctx 2048")
    e.add_argument("--ctx", type=int, default=512, help="tokens per window, at most the model's max_position_embeddings")
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--layers", action="store_true", help="print every layer's weight/output error (default: the ten worst)")
    _add_kv_flags(e, "quantized KV cache: int8 / fp8 (E4M3; scale per token per head), int4 (asymmetric g32 along "
                     "head_dim), kivi2 (KIVI 2-bit: keys per channel, values per token, a full-precision window), "
                     "kivi4 (KIVI at 4 bits)")
    e.add_argument("--domains", action="store_true", help="also score each domain (prose, code, arithmetic, math, "
                   "chat) on --windows windows each, with generations side by side")
    e.add_argument("--seed", type=int, default=0, help="--domains: seed of the generated arithmetic, math and chat sets")
    e.add_argument("--kv-chunk", type=int, default=32, help="--kv: tokens per forward after the prefill (default 32)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="quantize with several presets and evaluate each (the demo table)")
    c.add_argument("source", nargs="?")
    c.add_argument("--schemes", nargs="+", default=["W8A16", "W8A8", "W4A16_G32_ASYM", "NF4", "MXFP4A16", "NVFP4A16"])
    c.add_argument("--method", default="rtn")
    c.add_argument("--data")
    c.add_argument("--ctx", type=int, default=512)
    c.add_argument("--windows", type=int, default=16)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="one HTML page: quality vs size, per-domain and per-layer error, plans, generations",
                       description="Evaluate each CANDIDATE (a lowbit folder, HF folder or .gguf; or reuse the JSON of "
                                   "`lowbit eval --json` or of an earlier report) and write one self-contained HTML "
                                   "page, its PNGs beside it and its data as OUT.json (redraw: lowbit report OUT.json -o NEW.html).")
    r.add_argument("candidates", nargs="+", metavar="CANDIDATE", help="a model or eval JSON; LABEL=PATH names it in the report")
    r.add_argument("--reference", help="the source (default: each candidate's recorded source)")
    r.add_argument("--data", help="the main evaluation text (default: Python reference manual, evaluation part)")
    r.add_argument("--ctx", type=int, default=512)
    r.add_argument("--windows", type=int, default=16, help="windows of the main text and of each domain (default 16)")
    r.add_argument("--no-domains", action="store_true", help="skip the per-domain scores and generations")
    r.add_argument("--seed", type=int, default=0, help="seed of the generated domain sets")
    r.add_argument("--title", default="lowbit report")
    r.add_argument("--output", "-o", required=True, help="the page, e.g. report.html")
    r.add_argument("--force", action="store_true", help="replace an existing report")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)

    rc = sub.add_parser("recommend", help="quantize the candidates the field suggests for a use, measure them, "
                        "recommend the best within a size budget",
                        description="The field's decision table (per use: the candidates worth trying and the runtime "
                                    "that loads each) as the start; every candidate whose planned size fits --budget is "
                                    "quantized on a small calibration set, written in its runtime's format and "
                                    "evaluated; the lowest measured KLD whose weights file is within the budget wins.")
    rc.add_argument("source", nargs="?", help="HF folder, .gguf file; default: embedded SmolLM2-135M-Instruct")
    rc.add_argument("--for", dest="use", required=True, choices=["cpu", "gpu-serving", "fine-tuning", "max-quality"])
    rc.add_argument("--budget", required=True, help="largest weights file (the .gguf or model.safetensors), e.g. 100MB, 4GiB")
    rc.add_argument("--calib", help="calibration text (default: Python reference manual, calibration part)")
    rc.add_argument("--samples", type=int, default=16, help="calibration windows (default 16: quick)")
    rc.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    rc.add_argument("--data", help="evaluation text (default: Python reference manual, evaluation part)")
    rc.add_argument("--ctx", type=int, default=256, help="tokens per evaluation window (default 256)")
    rc.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--output", "-o", help="keep the recommended candidate here (a .gguf file or a folder)")
    rc.add_argument("--force", action="store_true")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=cmd_recommend)

    g = sub.add_parser("generate", help="reference and candidate text side by side")
    g.add_argument("candidate", nargs="?", help="lowbit folder, HF folder or .gguf (optional with --kv)")
    g.add_argument("--reference")
    g.add_argument("--prompt", required=True)
    _add_kv_flags(g, "generate the candidate's text with a quantized KV cache (without CANDIDATE: the source's weights)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench-infer", help="resident memory, prefill and decode tokens/s against the source",
                       description="Resident memory (measured RSS) and prefill / decode tokens/s of a lowbit output "
                                   "in lowbit's packed runtime, against its full-precision source and, with --gguf, "
                                   "llama.cpp on a GGUF of the same quantization; each model in a fresh process, "
                                   "the same prompt tokens, ratios within the one run.")
    b.add_argument("candidate", help="a lowbit output folder")
    b.add_argument("--reference", help="the full-precision source (default: the candidate's recorded source)")
    b.add_argument("--gguf", help="also run this .gguf with llama.cpp (llama-cpp-python) on the same prompt")
    b.add_argument("--runtime", default="packed", choices=["packed", "decoded"],
                   help="packed (low-bit at rest, torch's int4/int8 kernels; default) or decoded (fp32 copy)")
    _add_kv_flags(b, "the candidate decodes with this quantized KV cache")
    b.add_argument("--compile", action="store_true", help="add a row with torch.compile on the candidate's forward")
    b.add_argument("--data", help="prompt text file (default: Python reference manual, evaluation part)")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--decode-tokens", type=int, default=64)
    b.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    b.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up; the fastest is kept")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_infer)

    ro = sub.add_parser("rotate", help="rotate a model (norms folded, randomized Hadamard) into a plain HF checkpoint "
                                       "of the same architecture and function",
                        description="The rotation `quantize --rotate` applies, saved unquantized: transformers, "
                                    "llama.cpp (after `export --to gguf --type F16`) and vLLM load it unchanged.")
    ro.add_argument("source", nargs="?", help="HF folder, .gguf file; default: embedded SmolLM2-135M-Instruct")
    ro.add_argument("--kind", default="hadamard", choices=["hadamard", "learned"])
    ro.add_argument("--seed", type=int, default=0, help="seed of the random signs (default 0)")
    ro.add_argument("--output", "-o", required=True)
    ro.add_argument("--force", action="store_true")
    ro.add_argument("--json", action="store_true")
    ro.set_defaults(func=cmd_rotate)

    im = sub.add_parser("imatrix", help="an importance matrix for llama-quantize --imatrix (and lowbit quantize --imatrix)",
                        description="Runs the unquantized model on calibration windows and writes, for every Linear, "
                                    "the sum of each input column's squared activation and the token count, in "
                                    "llama.cpp's GGUF imatrix format (or its legacy .dat), keyed by GGUF tensor names.")
    im.add_argument("source", nargs="?", help="HF folder, .gguf file; default: embedded SmolLM2-135M-Instruct")
    im.add_argument("--calib", help="calibration text file (default: the Python reference manual's calibration part)")
    im.add_argument("--samples", type=int, default=128)
    im.add_argument("--seqlen", type=int, default=512)
    im.add_argument("--seed", type=int, default=0)
    im.add_argument("--include", action="append", help="regex of weights to include (default: every Linear)")
    im.add_argument("--exclude", action="append", help="regex of weights to leave out (default: head, embeddings, norms)")
    im.add_argument("--output", "-o", required=True, help="FILE.gguf or FILE.dat")
    im.add_argument("--force", action="store_true")
    im.add_argument("--json", action="store_true")
    im.set_defaults(func=cmd_imatrix)

    i = sub.add_parser("info", help="what a lowbit folder, HF folder or GGUF file holds")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("size", help="memory calculator",
                       description="Weights at each format, plus the KV cache: bytes per token = layers x KV heads x "
                                   "head_dim x 2 (keys, values) x bits/8, plus fp16 scales and KIVI's fp16 window, "
                                   "times --context and --batch (concurrent requests). With --kv, --json prints "
                                   "{weights: [...], kv_cache: [...]}.")
    s.add_argument("params", nargs="?", help="parameter count, e.g. 70B (default with --config FOLDER: counted from "
                                             "its safetensors)")
    s.add_argument("--format", action="append", help="fp32 fp16 int8 int4 int3 int2 nf4 fp8 mxfp4 nvfp4 ... (repeatable)")
    s.add_argument("--group-size", type=int, default=128)
    s.add_argument("--asym", action="store_true")
    s.add_argument("--context", type=int, default=0, help="tokens of KV cache per sequence")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--kv-bits", type=int, default=16)
    s.add_argument("--kv", action="append", choices=("fp16",) + _KV_CHOICES,
                   help="KV cache as lowbit's quantized cache stores it (repeatable; a table compares each with fp16)")
    s.add_argument("--kv-residual", type=int, help="full-precision window in tokens (default 128 for kivi2/kivi4, 0 otherwise)")
    s.add_argument("--kv-sink", type=int, help="first tokens kept in full precision (default 1)")
    s.add_argument("--arch", type=int, nargs=3, metavar=("LAYERS", "KV_HEADS", "HEAD_DIM"))
    s.add_argument("--config", help="model geometry from a config.json or a model folder (instead of --arch)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_size)
    return ap


@contextlib.contextmanager
def _quiet():
    """No progress bars or info logs while a command runs, libraries' own bars included
    (transformers' GGUF reader makes its tqdm directly)."""
    import functools

    import tqdm.std
    from transformers.utils import logging as hf_logging

    verbosity, bars, init = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), tqdm.std.tqdm.__init__
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tqdm.std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = init
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _add_quiet_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--quiet` after the command too (`lowbit eval X --quiet`), not only before it."""
    for sub in parser._subparsers._group_actions[0].choices.values():
        sub.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                         help="no progress bars or notes, only the results")


def _spawn(args, argv: list[str]) -> int:
    """--workers N: the same command as N local ranks (calib.distributed.spawn_workers)."""
    from lowbit.calib.distributed import spawn_workers

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            rest.append(a)
    try:
        return spawn_workers(args.workers, rest)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _add_quiet_everywhere(parser)
    args = parser.parse_args(argv)
    args.progress = not (args.json or args.quiet)
    if getattr(args, "workers", None) is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _spawn(args, list(sys.argv[1:] if argv is None else argv))
    if args.command in ("quantize", "plan", "qat", "qlora", "qlora-merge"):
        sub = parser._subparsers._group_actions[0].choices[args.command]
        args.parser_defaults = {}
        for a in sub._actions:  # argparse keeps the first action's default for a shared dest
            args.parser_defaults.setdefault(a.dest, a.default)
    try:
        from lowbit.calib.distributed import init_from_environment

        init_from_environment()
        with _quiet() if args.quiet else contextlib.nullcontext():
            args.func(args)
    except LowbitError as e:
        if args.debug:
            raise
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
