"""compressed-tensors checkpoints (what llm-compressor writes, transformers and vLLM load).

Per quantized nn.Linear ``<module>``, by format (compressed-tensors 0.20 naming and dtypes):

- ``pack-quantized`` (INT 2-8 bit, weight only, group or channel strategy):
  ``weight_packed`` int32 (out, ceil(in*bits/32)): unsigned codes (signed value + 2^(bits-1),
  which is exactly lowbit's code) densely packed along the input, code j at bit j*bits;
  ``weight_shape`` int64 [out, in]; ``weight_scale`` fp16 (out, n_groups) (channel: (out, 1));
  asymmetric: ``weight_zero_point`` int32 (ceil(out*bits/32), n_groups), the unsigned zero-points
  packed the same way along the output dimension (compressed-tensors stores zp - 2^(bits-1) as
  int8 and packs it with the same +2^(bits-1) offset, so the packed value is lowbit's zero).
  Decode: w = (code - 2^(bits-1) - zp_signed) * scale = (code - zero) * scale.
- ``float-quantized`` (FP8 E4M3 weights): ``weight`` float8_e4m3fn (out, in) holding lowbit's
  bit patterns, ``weight_scale`` fp32 (out, 1) channel / (out, n_groups) group / (1,) tensor.
- ``nvfp4-pack-quantized``: ``weight_packed`` uint8 (out, in/2), element 2i in the low nibble;
  ``weight_scale`` float8_e4m3fn (out, in/16); ``weight_global_scale`` fp32 (1,) holding the
  *reciprocal* of lowbit's global scale (compressed-tensors decodes with scale / global_scale),
  so decoded values agree within one float32 rounding.
- ``int-quantized`` (INT weights of a Linear whose input is quantized too, W8A8: what
  compressed-tensors' own format inference picks; pack-quantized is not one of vLLM's
  activation-quantization formats): ``weight`` int8 (out, in) holding the signed value code - 2^(bits-1);
  ``weight_scale`` as for pack-quantized; asymmetric: ``weight_zero_point`` int8 (out, n_groups)
  = zero - 2^(bits-1), unpacked.

Input activations (lowbit's ``QuantizedTensor.input_quant``), per module, written as the group's
``input_activations`` QuantizationArgs (the presets W8A8, FP8_DYNAMIC, FP8 and NVFP4):
- int / fp8_e4m3 per token, dynamic: strategy "token", ``dynamic: true``; nothing stored;
- per tensor, dynamic: strategy "tensor", ``dynamic: true``; nothing stored;
- per tensor, static: strategy "tensor", ``dynamic: false`` and ``input_scale`` fp32 (1,) = lowbit's
  scale (x ~ q * scale). compressed-tensors' initialisation also registers an
  ``input_zero_point`` (1,), but its compressors drop it for symmetric inputs (vLLM refuses a zero
  point on symmetric schemes), so none is written;
- nvfp4 (static global scale): strategy "tensor_group", group_size 16, ``dynamic: "local"``
  (block scales from each block at run time) and ``input_global_scale`` fp32 (1,) holding the
  reciprocal of lowbit's global scale, as for the weights.
lowbit's exact specs (observer, percentile, the scale as a Python float) are kept in the
safetensors metadata and restored by the importer when they still match the file.
Run-time differences between the loaders (the file is the same): dynamic INT8 per token divides
the row absmax by 127 in lowbit and in vLLM's kernels, by 127.5 in compressed-tensors' reference
QDQ (transformers), so transformers' int8-dynamic logits differ slightly; INT clamps at -128 in
compressed-tensors / vLLM and at -127 in lowbit (only values past a static scale's range).

Limits: a group size must divide in_features (compressed-tensors' group kernels reshape rows into
whole groups and refuse a last partial group); integer formats with a float minimum, NF4, MX and
GGUF block types have no compressed-tensors form; inputs: fp8_e5m2 (compressed-tensors' 8-bit
float is E4M3), MX (compressed-tensors rounds a block's max to a power of two before taking its
exponent; lowbit follows OCP MX's floor(log2)), NVFP4 with a dynamic global scale, asymmetric
inputs and inputs of non-Linear weights are refused.
Loaders: transformers (default, compressed in memory) loads symmetric INT, FP8 and NVFP4 and runs
input quantization (compressed-tensors' quantized forward); for
asymmetric pack-quantized its compressed-layout setup (compressed-tensors 0.20) allocates an
unpacked zero-point and refuses the packed one, so load those with
``CompressedTensorsConfig(run_compressed=False)`` (dequantize at load), as checked in the tests.
``run_compressed=False`` (= ``dequantize=True``) leaves a dense model: it does NOT quantize inputs.
compressed-tensors 0.20 decompresses NVFP4 weights to bf16 whatever the model dtype, so
transformers runs an NVFP4 checkpoint in bf16 only (an fp32 forward meets a bf16 weight).
"""

from __future__ import annotations

import dataclasses
import os
import re

import torch

from lowbit.errors import SchemeError, SourceError
from lowbit.export import checkpoint as ck
from lowbit.formats.fp8 import FP8E4M3Format
from lowbit.formats.integer import IntFormat
from lowbit.formats.nvfp4 import NVFP4Format
from lowbit.model.quantized import QuantizedModel
from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme
from lowbit.tensor import QuantizedTensor

TARGET = "compressed-tensors"
PACK, INT, FLOAT, NVFP4 = "pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized"
META_INPUT = "input_quant"   # lowbit metadata key: tensor name -> lowbit's exact input spec
_SPEC_KEYS = ("format", "bits", "granularity", "dynamic", "symmetric")


def _strategy(qt: QuantizedTensor, scheme_group: int) -> tuple[str, int | None]:
    """(compressed-tensors strategy, group_size) of one tensor; scheme_group: the group size its
    scheme asked for. A group as long as the row is per channel, unless the scheme asked for
    exactly that group size (mixed models: a per-channel tensor under a g32 model scheme)."""
    cols = qt.codes.shape[1]
    if qt.group_size == 0:
        return "tensor", None
    if qt.group_size == cols and scheme_group != cols:
        return "channel", None
    if cols % qt.group_size:
        raise SchemeError(f"compressed-tensors needs in_features divisible by the group size: {cols} columns, "
                          f"group size {qt.group_size}; choose a group size dividing {cols} or -1 (per channel)")
    return "group", qt.group_size


def _weights_args(qt: QuantizedTensor, scheme_group: int, name: str, quantized_input: bool = False) -> tuple[str, dict]:
    """(format, QuantizationArgs dict) for one tensor; SchemeError when it has no CT form.
    quantized_input: the Linear's input is quantized too (INT weights then use int-quantized)."""
    fmt = qt.format
    if isinstance(fmt, IntFormat):
        if not fmt.symmetric and fmt.zero_point != "int":
            raise SchemeError(f"{name}: compressed-tensors stores integer zero-points, not a float minimum; "
                              "quantize with zero_point='int' or symmetric")
        strategy, g = _strategy(qt, scheme_group)
        if strategy == "tensor":
            raise SchemeError(f"{name}: per-tensor INT weights are not written by lowbit's compressed-tensors "
                              "export; use a group size or -1 (per channel)")
        return INT if quantized_input else PACK, {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
                                                  "group_size": g, "strategy": strategy, "dynamic": False}
    if isinstance(fmt, FP8E4M3Format):
        strategy, g = _strategy(qt, scheme_group)
        return FLOAT, {"num_bits": 8, "type": "float", "symmetric": True, "group_size": g,
                       "strategy": strategy, "dynamic": False}
    if isinstance(fmt, NVFP4Format):
        if qt.codes.shape[1] % 16:
            raise SchemeError(f"{name}: NVFP4 in compressed-tensors needs in_features divisible by 16")
        return NVFP4, {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                       "strategy": "tensor_group", "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    raise SchemeError(f"{name}: format {fmt.name} has no compressed-tensors form; choose int, fp8_e4m3 or nvfp4 "
                      "(or export to gguf/native)")


def _input_args(spec: dict, cols: int, name: str) -> dict:
    """compressed-tensors QuantizationArgs (dict, in its dump order) of lowbit's input spec of
    tensor `name`; SchemeError, naming the tensor and the fix, for what CT cannot hold."""
    where = f"{name}: its input quantization"
    missing = [k for k in _SPEC_KEYS if k not in spec]
    if missing:
        raise SchemeError(f"{where} spec lacks {missing}; give it a complete input_quant (see lowbit.nn.act_quant) "
                          "or export to native")
    fmt, bits, gran, dynamic = spec["format"], spec["bits"], spec["granularity"], spec["dynamic"]
    if spec.get("outlier_threshold") is not None:
        raise SchemeError(f"{where} keeps outlier columns in full precision (LLM.int8), which compressed-tensors "
                          "cannot express; export to native, or quantize with --scheme W8A8")
    if not spec["symmetric"]:
        raise SchemeError(f"{where} is asymmetric, which lowbit does not export to compressed-tensors; "
                          "quantize inputs symmetrically or export to native")
    if fmt.startswith("mx"):
        raise SchemeError(f"{where} is {fmt}: compressed-tensors computes MX block scales by rounding each block's "
                          "max to a power of two before taking its exponent, lowbit uses OCP MX's floor(log2), so "
                          "the loaded model would quantize differently; quantize inputs as int8, fp8_e4m3 or nvfp4, "
                          "or export to native")
    static = not dynamic
    if static and spec.get("scale") is None:
        raise SchemeError(f"{where} is static but has no calibrated scale; calibrate it (static activations) "
                          "or use dynamic input quantization")
    observer = {"observer": "static_minmax"} if static and spec.get("observer", "minmax") == "minmax" else {}
    if fmt == "nvfp4":
        if dynamic:
            raise SchemeError(f"{where} is NVFP4 with a dynamic global scale; compressed-tensors and vLLM keep the "
                              "NVFP4 input global scale static ('local' dynamic): calibrate it (dynamic=False)")
        if cols % 16:
            raise SchemeError(f"{where} is NVFP4, which compressed-tensors quantizes in whole blocks of 16; "
                              f"{name} has {cols} input features: exclude it or use int8/fp8 inputs")
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn", "observer": "static_minmax"}
    if fmt == "int":
        typ = "int"
        if not 2 <= bits <= 8:
            raise SchemeError(f"{where} has {bits}-bit integers; compressed-tensors takes 2..8 bits: use 8")
    elif fmt == "fp8_e4m3":
        typ = "float"
    elif fmt == "fp8_e5m2":
        raise SchemeError(f"{where} is fp8_e5m2; compressed-tensors' 8-bit float is E4M3 only: "
                          "use fp8_e4m3 activations or export to native")
    else:
        raise SchemeError(f"{where} has format {fmt!r}, which has no compressed-tensors form; "
                          "use int8, fp8_e4m3 or nvfp4 inputs or export to native")
    if gran == "token" and dynamic:
        strategy = "token"
    elif gran == "tensor":
        strategy = "tensor"
    else:
        raise SchemeError(f"{where} has granularity {gran!r} (dynamic={dynamic}); compressed-tensors takes "
                          f"{fmt} inputs per token (dynamic) or per tensor: use one of those")
    return {"num_bits": 8 if typ == "float" else bits, "type": typ, "symmetric": True, "group_size": None,
            "strategy": strategy, "dynamic": bool(dynamic), **observer}


def _input_tensors(spec: dict) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of a module's input quantization (local names)."""
    if spec["dynamic"]:
        return {}
    # lowbit computes with the scale in float32 (act_quant), which is what the file holds
    scale = torch.tensor(spec["scale"], dtype=torch.float32)
    if spec["format"] == "nvfp4":  # compressed-tensors divides by the global scale: the reciprocal
        return {"input_global_scale": (1.0 / scale.double()).to(torch.float32).reshape(1)}
    return {"input_scale": scale.reshape(1)}


def int_scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """compressed-tensors gives scales the model's dtype; lowbit's fp16 scales are exact in fp16
    and fp32, so a bf16 (or other) model gets fp32 scales rather than rounded bf16 ones."""
    return torch.float16 if model_dtype == torch.float16 else torch.float32


def _module_tensors(qt: QuantizedTensor, fmt: str, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one module's weight (local names)."""
    rows, cols = qt.codes.shape
    if fmt in (PACK, INT):
        bits = qt.format.bits
        offset = 1 << (bits - 1)
        scale = qt.params["scale"].to(int_scale_dtype(model_dtype)).reshape(rows, -1)
        if fmt == INT:  # signed values as int8, zero-points unpacked (naive compressor layout)
            out = {"weight": (qt.codes.to(torch.int16) - offset).to(torch.int8), "weight_scale": scale}
            if not qt.format.symmetric:
                out["weight_zero_point"] = (qt.params["zero"].reshape(rows, -1).to(torch.int16) - offset).to(torch.int8)
            return out
        out = {"weight_packed": ck.pack_int32_rows(qt.codes, bits),
               "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
               "weight_scale": scale}
        if not qt.format.symmetric:
            out["weight_zero_point"] = ck.pack_int32_cols(qt.params["zero"].reshape(rows, -1), bits)
        return out
    if fmt == FLOAT:
        scale = qt.params["scale"].to(torch.float32)
        scale = scale.reshape(1) if qt.group_size == 0 else scale.reshape(rows, -1)
        return {"weight": qt.codes.contiguous().view(torch.float8_e4m3fn), "weight_scale": scale}
    # NVFP4
    codes = qt.codes.reshape(rows, cols // 2, 2)
    packed = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    gs = qt.params["global_scale"].double()
    return {"weight_packed": packed,
            "weight_scale": qt.params["block_scale"].contiguous().view(torch.float8_e4m3fn),
            "weight_global_scale": (1.0 / gs).to(torch.float32).reshape(1)}


def quantization_config(groups: dict[tuple, list[str]], ignore: list[str], all_linear: bool) -> dict:
    """The config.json quantization_config, field for field as compressed-tensors dumps it.
    groups: (format, weights args items, input args items or None) -> module names."""
    config_groups = {}
    for i, (key, modules) in enumerate(sorted(groups.items(), key=lambda kv: sorted(kv[1])[0])):
        fmt, args_items, input_items = key
        targets = ["Linear"] if all_linear else [f"re:^{re.escape(m)}$" for m in sorted(modules)]
        config_groups[f"group_{i}"] = {"targets": targets, "weights": dict(args_items),
                                       "input_activations": None if input_items is None else dict(input_items),
                                       "output_activations": None, "format": fmt}
    formats = {key[0] for key in groups}
    try:
        import compressed_tensors
        version = compressed_tensors.__version__
    except ImportError:  # the file format does not need the package; its version is informative
        version = None
    cfg = {"config_groups": config_groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
           "global_compression_ratio": None, "ignore": sorted(ignore), "kv_cache_scheme": None,
           "moe_sparsity_config": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
           "sparsity_config": {}, "transform_config": {}}
    if version is not None:
        cfg["version"] = version
    return cfg


def sparsity_config(qm: QuantizedModel, modules: list[str], ignore: list[str]) -> dict:
    """compressed-tensors' record of a pruned model stored dense (its DenseSparsityConfig: the
    zeros are in the quantized weights, loaders need nothing else); {} for a model not pruned.
    The pattern the recipe asked for is checked on every stored weight first."""
    from lowbit.sparsity import follows, parse_pattern

    if qm.method not in ("sparsegpt", "wanda"):
        return {}
    pattern = parse_pattern((qm.recipe.get("options") or {}).get("sparsity", "2:4"))
    zeros = total = 0
    for name, qt in qm.tensors.items():
        W = qt.dequantize_matrix()
        if not follows(W, pattern):
            raise SchemeError(f"{name} does not have the {pattern.label()} zeros its recipe says; re-quantize it")
        zeros, total = zeros + int((W == 0).sum()), total + W.numel()
    return {"format": "dense", "global_sparsity": zeros / max(total, 1),
            "sparsity_structure": f"{pattern.n}:{pattern.m}" if pattern.structured else "unstructured",
            "targets": [f"re:^{re.escape(m)}$" for m in modules], "ignore": ignore,
            "registry_requires_subclass": False}


def _validate(cfg: dict) -> None:
    """Let compressed-tensors itself parse the config when it is installed."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    try:
        QuantizationConfig.model_validate({k: v for k, v in cfg.items()
                                           if k not in ("sparsity_config", "transform_config", "version")})
        if cfg.get("sparsity_config"):
            from compressed_tensors.config import SparsityCompressionConfig

            SparsityCompressionConfig.load_from_registry("dense", **{k: v for k, v in cfg["sparsity_config"].items()
                                                                     if k != "format"})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        first = str(e).strip().splitlines()
        raise SchemeError(f"compressed-tensors refuses the config lowbit built: {' '.join(first[:3])}") from None


def _check_targets(qm: QuantizedModel) -> None:
    """Only nn.Linear weights (and their inputs) map to compressed-tensors' per-module layouts."""
    for name, t in qm.targets.items():
        if t.kind == "linear":
            continue
        qt = qm.tensors.get(name)
        if qt is not None and qt.input_quant is not None:
            raise SchemeError(f"{name} is a {t.kind} weight whose input is quantized at run time; compressed-tensors "
                              "quantizes inputs of nn.Linear modules only: exclude it or export to native")
        raise SchemeError(f"{TARGET} export holds nn.Linear weights only; {name} is a {t.kind} weight: "
                          "quantize with --exclude for it, or export to gguf/native")


def _tensor_args(qm: QuantizedModel, name: str, qt: QuantizedTensor) -> tuple[str, dict, dict | None]:
    """(format, weight args, input args or None) of one tensor; SchemeError for what CT cannot hold."""
    plan = getattr(getattr(qm, "plan", None), "tensors", None) or {}
    ck.module_of(name)
    spec = qt.input_quant
    input_args = None if spec is None else _input_args(spec, qt.codes.shape[1], name)
    ws = plan[name].weights if name in plan else qm.scheme.weights   # the tensor's own scheme
    fmt, args = _weights_args(qt, ws.effective_group_size(), name, quantized_input=spec is not None)
    return fmt, args, input_args


def check(qm: QuantizedModel) -> None:
    """Every refusal of export_compressed_tensors, before anything is packed."""
    _check_targets(qm)
    for name, qt in qm.tensors.items():
        _tensor_args(qm, name, qt)


def export_compressed_tensors(qm: QuantizedModel, output: str | os.PathLike, force: bool = False,
                              max_shard_bytes: int | None = None):
    """Write qm as a compressed-tensors checkpoint (pack-/int-/float-quantized, nvfp4), with
    each Linear's input quantization (W8A8, FP8, NVFP4 W4A4) as its group's input_activations."""
    check(ck.headers(qm))   # nothing is written on a refusal
    model_dtype = next(qm.model.parameters()).dtype
    with ck.tensor_store(output) as tensors:
        groups: dict[tuple, list[str]] = {}
        exact: dict[str, float] = {}
        input_specs: dict[str, dict] = {}
        for name, qt in qm.tensors.items():
            module = ck.module_of(name)
            spec = qt.input_quant
            fmt, args, input_args = _tensor_args(qm, name, qt)
            key = (fmt, tuple(args.items()), None if input_args is None else tuple(input_args.items()))
            groups.setdefault(key, []).append(module)
            for local, t in _module_tensors(qt, fmt, model_dtype).items():
                tensors[f"{module}.{local}"] = t
            if spec is not None:
                for local, t in _input_tensors(spec).items():
                    tensors[f"{module}.{local}"] = t
                input_specs[name] = dict(spec)
            if fmt == NVFP4:  # the reciprocal in the file may not invert exactly; keep lowbit's value
                exact[name] = float(qt.params["global_scale"].double())
        quantized = {ck.module_of(n) for n in qm.tensors}
        linear = [n for n, m in qm.model.named_modules() if isinstance(m, torch.nn.Linear)]
        ignore = [n for n in linear if n not in quantized]
        cfg = quantization_config(groups, ignore, all_linear=len(groups) == 1)
        cfg["sparsity_config"] = sparsity_config(qm, sorted(quantized), ignore)
        _validate(cfg)
        meta = ck.lowbit_metadata(qm, TARGET)
        if exact:
            meta["nvfp4_global_scale"] = exact
        if input_specs:
            meta[META_INPUT] = input_specs
        return ck.write_checkpoint(qm, output, tensors, cfg, meta, force=force,
                                   max_shard_bytes=max_shard_bytes)


# --- import ---------------------------------------------------------------------------------
def _group_for(module: str, cfg: dict) -> dict | None:
    """The config group whose targets match a module (None: not quantized)."""
    if module in cfg.get("ignore", []):
        return None
    for group in cfg["config_groups"].values():
        for t in group["targets"]:
            if t == "Linear" or (t.startswith("re:") and re.match(t[3:], module)) or t == module:
                return group
    return None


def _spec_from_args(args: dict, local: dict[str, torch.Tensor], where: str) -> dict:
    """lowbit's input spec of a module from its input_activations args and input_* tensors."""
    typ, bits, strategy, dynamic = args.get("type", "int"), args.get("num_bits", 8), args.get("strategy"), args.get("dynamic", False)
    if not args.get("symmetric", True):
        raise SourceError(f"{where}: asymmetric input activations are not supported by lowbit (symmetric only)")
    scale = None
    if typ == "float" and bits == 4 and strategy == "tensor_group" and args.get("group_size") == 16:
        if dynamic != "local" or "input_global_scale" not in local:
            raise SourceError(f"{where}: NVFP4 input activations need dynamic 'local' and an input_global_scale")
        fmt, gran, dyn = "nvfp4", "block", False
        scale = float((1.0 / local["input_global_scale"].double()).to(torch.float32).reshape(()))
    elif (typ == "int" or (typ == "float" and bits == 8)) and strategy in ("token", "tensor"):
        fmt, gran, dyn = ("int" if typ == "int" else "fp8_e4m3"), strategy, bool(dynamic)
        if not dyn:
            if "input_scale" not in local:
                raise SourceError(f"{where}: static input activations without an input_scale tensor")
            scale = float(local["input_scale"].float().reshape(()))
    else:
        raise SourceError(f"{where}: input activations {args} have no lowbit form (int/fp8 per token or tensor, NVFP4)")
    act = ActivationScheme(format=fmt, bits=bits, granularity=gran, dynamic=dyn)
    return {**dataclasses.asdict(act), "scale": scale}


def _input_spec(module: str, group: dict, local: dict[str, torch.Tensor], exact: dict | None, cols: int,
                where: str) -> dict | None:
    """The module's input spec: lowbit's recorded one when it still matches the file exactly."""
    args = group.get("input_activations")
    if not args:
        return None
    if exact is not None:
        try:
            same = (_input_args(exact, cols, module) == args and set(_input_tensors(exact)) == set(local)
                    and all(torch.equal(t, local[k]) for k, t in _input_tensors(exact).items()))
        except SchemeError:
            same = False
        if same:
            return dict(exact)
    return _spec_from_args(args, local, where)


def import_checkpoint(path: str | os.PathLike) -> QuantizedModel:
    """A compressed-tensors checkpoint (pack-/int-/float-quantized, nvfp4; input activations) as a
    QuantizedModel."""
    config, stored, meta = ck.read_checkpoint(path)
    cfg = config.get("quantization_config") or {}
    if cfg.get("quant_method") != "compressed-tensors":
        raise SourceError(f"{path} is not a compressed-tensors checkpoint (quant_method {cfg.get('quant_method')!r})")
    if cfg.get("quantization_status") != "compressed":
        raise SourceError(f"{path}: only compressed checkpoints import (status {cfg.get('quantization_status')!r})")
    modules = sorted({k.rsplit(".", 1)[0] for k in stored
                      if k.endswith((".weight_packed", ".weight_scale"))})
    qtensors, first_args, first_input = {}, None, None
    for module in modules:
        group = _group_for(module, cfg)
        if group is None:
            raise SourceError(f"{path}: {module} has quantized tensors but no config group targets it")
        fmt = group.get("format") or cfg.get("format")
        args = group["weights"]
        first_args = first_args or (fmt, args)
        local = {k.rsplit(".", 1)[1]: stored.pop(k) for k in list(stored) if k.rsplit(".", 1)[0] == module
                 and k.rsplit(".", 1)[1].startswith(("weight", "input_"))}
        inputs = {k: local.pop(k) for k in list(local) if k.startswith("input_")}
        qt = _to_lowbit(local, fmt, args, f"{path}: {module}")
        exact_gs = meta.get("nvfp4_global_scale", {}).get(module + ".weight")
        if exact_gs is not None and fmt == NVFP4:
            gs = torch.tensor(exact_gs, dtype=torch.float32)
            # trust lowbit's recorded value only if it still matches the file's reciprocal
            if torch.equal((1.0 / gs.double()).to(torch.float32).reshape(1), local["weight_global_scale"].float().reshape(1)):
                qt.params["global_scale"] = gs.reshape(())
        qt.input_quant = _input_spec(module, group, inputs, meta.get(META_INPUT, {}).get(module + ".weight"),
                                     qt.codes.shape[1], f"{path}: {module}")
        if qt.input_quant is not None and first_input is None:
            first_input = qt.input_quant
        qtensors[module + ".weight"] = qt
    if first_args is None:
        raise SourceError(f"{path}: no quantized tensors found")
    fmt, args = first_args
    if fmt in (PACK, INT):
        ws = WeightScheme("int", args["num_bits"], args["group_size"] or -1, args["symmetric"])
    elif fmt == NVFP4:
        ws = WeightScheme("nvfp4", None, 16)
    else:
        ws = WeightScheme("fp8_e4m3", None, {"tensor": 0, "channel": -1}.get(args["strategy"], args["group_size"]))
    qm = ck.build_model(path, config, stored, qtensors, ws, meta, TARGET)
    if "scheme" not in meta and first_input is not None:  # a foreign checkpoint: say what its inputs do
        fields = {f.name for f in dataclasses.fields(ActivationScheme)}
        act = ActivationScheme(**{k: v for k, v in first_input.items() if k in fields})
        qm = dataclasses.replace(qm, scheme=QuantScheme(qm.scheme.weights, act))
    return qm


def _to_lowbit(local: dict[str, torch.Tensor], fmt: str, args: dict, where: str) -> QuantizedTensor:
    strategy, g = args["strategy"], args.get("group_size")
    if fmt == PACK:
        rows, cols = (int(v) for v in local["weight_shape"])
        bits = args["num_bits"]
        codes = ck.unpack_int32_rows(local["weight_packed"], bits, cols)
        scale = local["weight_scale"].reshape(rows, -1)
        zero = None
        if not args["symmetric"]:
            zero = ck.unpack_int32_cols(local["weight_zero_point"], bits, rows)
        return ck.int_tensor(codes, scale, zero, bits, cols if strategy == "channel" else g)
    if fmt in (INT, "naive-quantized") and args["type"] == "int":
        w = local["weight"]
        if w.dtype != torch.int8:
            raise SourceError(f"{where}: int-quantized weight has dtype {w.dtype}, expected int8")
        rows, cols = w.shape
        bits = args["num_bits"]
        offset = 1 << (bits - 1)
        codes = (w.to(torch.int16) + offset).to(torch.uint8)
        scale = local["weight_scale"].reshape(rows, -1)
        zero = None
        if not args["symmetric"]:
            zero = (local["weight_zero_point"].to(torch.int16).reshape(rows, -1) + offset).to(torch.uint8)
        if strategy == "tensor":
            raise SourceError(f"{where}: per-tensor INT weights are not supported by lowbit's importer")
        return ck.int_tensor(codes, scale, zero, bits, cols if strategy == "channel" else g)
    if fmt in (FLOAT, "naive-quantized") and args["type"] == "float" and args["num_bits"] == 8:
        w = local["weight"]
        if w.dtype != torch.float8_e4m3fn:
            raise SourceError(f"{where}: FP8 weight has dtype {w.dtype}, expected float8_e4m3fn")
        rows, cols = w.shape
        codes = w.view(torch.uint8).clone()
        scale = local["weight_scale"].to(torch.float32)
        group = {"tensor": 0, "channel": cols}.get(strategy, g)
        scale = scale.reshape(1, 1) if strategy == "tensor" else scale.reshape(rows, -1)
        return QuantizedTensor(codes, {"scale": scale}, FP8E4M3Format(), group, (rows, cols), False)
    if fmt == NVFP4:
        packed = local["weight_packed"]
        rows = packed.shape[0]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(rows, -1).to(torch.uint8)
        gs = (1.0 / local["weight_global_scale"].double()).to(torch.float32).reshape(())
        params = {"block_scale": local["weight_scale"].view(torch.uint8).clone(), "global_scale": gs}
        return QuantizedTensor(codes, params, NVFP4Format(), 16, tuple(codes.shape), False)
    raise SourceError(f"{where}: compressed-tensors format {fmt!r} with {args} is not supported by lowbit's importer")
