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

Limits: a group size must divide in_features (compressed-tensors' group kernels reshape rows into
whole groups and refuse a last partial group); integer formats with a float minimum, NF4, MX and
GGUF block types have no compressed-tensors form.
Loaders: transformers (default, compressed in memory) loads symmetric INT, FP8 and NVFP4; for
asymmetric pack-quantized its compressed-layout setup (compressed-tensors 0.20) allocates an
unpacked zero-point and refuses the packed one, so load those with
``CompressedTensorsConfig(run_compressed=False)`` (dequantize at load), as checked in the tests.
"""

from __future__ import annotations

import os
import re

import torch

from lowbit.errors import SchemeError, SourceError
from lowbit.export import checkpoint as ck
from lowbit.formats.fp8 import FP8E4M3Format
from lowbit.formats.integer import IntFormat
from lowbit.formats.nvfp4 import NVFP4Format
from lowbit.model.quantized import QuantizedModel
from lowbit.scheme import WeightScheme
from lowbit.tensor import QuantizedTensor

TARGET = "compressed-tensors"
PACK, FLOAT, NVFP4 = "pack-quantized", "float-quantized", "nvfp4-pack-quantized"


def _strategy(qt: QuantizedTensor, scheme_group: int) -> tuple[str, int | None]:
    """(compressed-tensors strategy, group_size) of one tensor."""
    cols = qt.codes.shape[1]
    if qt.group_size == 0:
        return "tensor", None
    if qt.group_size == cols and scheme_group == -1:
        return "channel", None
    if cols % qt.group_size:
        raise SchemeError(f"compressed-tensors needs in_features divisible by the group size: {cols} columns, "
                          f"group size {qt.group_size}; choose a group size dividing {cols} or -1 (per channel)")
    return "group", qt.group_size


def _weights_args(qt: QuantizedTensor, scheme_group: int, name: str) -> tuple[str, dict]:
    """(format, QuantizationArgs dict) for one tensor; SchemeError when it has no CT form."""
    fmt = qt.format
    if isinstance(fmt, IntFormat):
        if not fmt.symmetric and fmt.zero_point != "int":
            raise SchemeError(f"{name}: compressed-tensors stores integer zero-points, not a float minimum; "
                              "quantize with zero_point='int' or symmetric")
        strategy, g = _strategy(qt, scheme_group)
        if strategy == "tensor":
            raise SchemeError(f"{name}: per-tensor INT weights are not written by lowbit's compressed-tensors "
                              "export; use a group size or -1 (per channel)")
        return PACK, {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "group_size": g,
                      "strategy": strategy, "dynamic": False}
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


def int_scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """compressed-tensors gives scales the model's dtype; lowbit's fp16 scales are exact in fp16
    and fp32, so a bf16 (or other) model gets fp32 scales rather than rounded bf16 ones."""
    return torch.float16 if model_dtype == torch.float16 else torch.float32


def _module_tensors(qt: QuantizedTensor, fmt: str, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one module (local names)."""
    rows, cols = qt.codes.shape
    if fmt == PACK:
        bits = qt.format.bits
        out = {"weight_packed": ck.pack_int32_rows(qt.codes, bits),
               "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
               "weight_scale": qt.params["scale"].to(int_scale_dtype(model_dtype)).reshape(rows, -1)}
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
    """The config.json quantization_config, field for field as compressed-tensors dumps it."""
    config_groups = {}
    for i, ((fmt, args_items), modules) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        targets = ["Linear"] if all_linear else [f"re:^{re.escape(m)}$" for m in sorted(modules)]
        config_groups[f"group_{i}"] = {"targets": targets, "weights": dict(args_items), "input_activations": None,
                                       "output_activations": None, "format": fmt}
    formats = {fmt for fmt, _ in groups}
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


def _validate(cfg: dict) -> None:
    """Let compressed-tensors itself parse the config when it is installed."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    QuantizationConfig.model_validate({k: v for k, v in cfg.items()
                                       if k not in ("sparsity_config", "transform_config", "version")})


def export_compressed_tensors(qm: QuantizedModel, output: str | os.PathLike, force: bool = False):
    """Write qm as a compressed-tensors checkpoint (pack-quantized / float-quantized / nvfp4)."""
    ck.check_linear(qm, TARGET)
    if qm.scheme.activations is not None:
        raise SchemeError("compressed-tensors export writes weight-only schemes for now; activation "
                          "quantization (W8A8, FP8 dynamic) is not exported yet: quantize without activations")
    scheme_group = qm.scheme.weights.effective_group_size()
    model_dtype = next(qm.model.parameters()).dtype
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    exact: dict[str, float] = {}
    for name, qt in qm.tensors.items():
        module = ck.module_of(name)
        fmt, args = _weights_args(qt, scheme_group, name)
        groups.setdefault((fmt, tuple(args.items())), []).append(module)
        for local, t in _module_tensors(qt, fmt, model_dtype).items():
            tensors[f"{module}.{local}"] = t
        if fmt == NVFP4:  # the reciprocal in the file may not invert exactly; keep lowbit's value
            exact[name] = float(qt.params["global_scale"].double())
    quantized = {ck.module_of(n) for n in qm.tensors}
    linear = [n for n, m in qm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore = [n for n in linear if n not in quantized]
    cfg = quantization_config(groups, ignore, all_linear=len(groups) == 1)
    _validate(cfg)
    meta = ck.lowbit_metadata(qm, TARGET)
    if exact:
        meta["nvfp4_global_scale"] = exact
    return ck.write_checkpoint(qm, output, tensors, cfg, meta, force=force)


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


def import_checkpoint(path: str | os.PathLike) -> QuantizedModel:
    """A compressed-tensors checkpoint (pack-quantized, float-quantized, nvfp4) as a QuantizedModel."""
    config, stored, meta = ck.read_checkpoint(path)
    cfg = config.get("quantization_config") or {}
    if cfg.get("quant_method") != "compressed-tensors":
        raise SourceError(f"{path} is not a compressed-tensors checkpoint (quant_method {cfg.get('quant_method')!r})")
    if cfg.get("quantization_status") != "compressed":
        raise SourceError(f"{path}: only compressed checkpoints import (status {cfg.get('quantization_status')!r})")
    modules = sorted({k.rsplit(".", 1)[0] for k in stored
                      if k.endswith((".weight_packed", ".weight_scale"))})
    qtensors, first_args = {}, None
    for module in modules:
        group = _group_for(module, cfg)
        if group is None:
            raise SourceError(f"{path}: {module} has quantized tensors but no config group targets it")
        fmt = group.get("format") or cfg.get("format")
        args = group["weights"]
        first_args = first_args or (fmt, args)
        local = {k.rsplit(".", 1)[1]: stored.pop(k) for k in list(stored) if k.rsplit(".", 1)[0] == module
                 and k.rsplit(".", 1)[1].startswith("weight")}
        qt = _to_lowbit(local, fmt, args, f"{path}: {module}")
        exact_gs = meta.get("nvfp4_global_scale", {}).get(module + ".weight")
        if exact_gs is not None and fmt == NVFP4:
            gs = torch.tensor(exact_gs, dtype=torch.float32)
            # trust lowbit's recorded value only if it still matches the file's reciprocal
            if torch.equal((1.0 / gs.double()).to(torch.float32).reshape(1), local["weight_global_scale"].float().reshape(1)):
                qt.params["global_scale"] = gs.reshape(())
        qtensors[module + ".weight"] = qt
    if first_args is None:
        raise SourceError(f"{path}: no quantized tensors found")
    fmt, args = first_args
    if fmt == PACK:
        ws = WeightScheme("int", args["num_bits"], args["group_size"] or -1, args["symmetric"])
    elif fmt == NVFP4:
        ws = WeightScheme("nvfp4", None, 16)
    else:
        ws = WeightScheme("fp8_e4m3", None, {"tensor": 0, "channel": -1}.get(args["strategy"], args["group_size"]))
    return ck.build_model(path, config, stored, qtensors, ws, meta, TARGET)


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
