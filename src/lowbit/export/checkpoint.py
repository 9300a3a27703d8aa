"""Shared pieces of the Hugging Face checkpoint exporters (compressed-tensors, GPTQ, AWQ):
int32 bit packing, which weights an integer checkpoint can hold, writing a transformers
folder (config.json with its quantization_config, tokenizer, one safetensors file) and
rebuilding a QuantizedModel from such a folder.

Every exporter serialises QuantizedTensor codes and stored parameters as they are; nothing
here rounds or fits values again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lowbit.errors import SchemeError, SourceError
from lowbit.export.native import _full_precision_state, staged_output_dir
from lowbit.export.safetensors_io import SpilledTensors, write_sharded
from lowbit.formats.integer import IntFormat
from lowbit.formats.packing import pack, unpack
from lowbit.model.quantized import QuantizedModel, install_quantized
from lowbit.model.targets import WeightTarget
from lowbit.scheme import QuantScheme, WeightScheme
from lowbit.tensor import QuantizedTensor

WEIGHTS_FILE = "model.safetensors"
LOWBIT_META_KEY = "lowbit"


# --- int32 packing ---------------------------------------------------------------------------
def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (rows, cols) along cols into int32 words (rows, ceil(cols*bits/32)):
    code j of a row sits at bit j*bits of the row's little-endian bit stream (a code may straddle
    two words when 32 % bits != 0). For 4 bits: word k holds codes 8k..8k+7, lowest nibble first."""
    rows, cols = codes.shape
    n_words = -(-cols * bits // 32)
    if (cols * bits) % 32 == 0:  # rows end on word boundaries: one bit stream for the whole matrix
        b = pack(codes, bits).numpy().reshape(rows, n_words * 4)
        return torch.from_numpy(b.view("<i4").astype(np.int32))
    out = np.zeros((rows, n_words * 4), dtype=np.uint8)
    for r in range(rows):  # rows are few thousand at most; each is one vectorised pack
        b = pack(codes[r], bits).numpy()
        out[r, : b.size] = b
    return torch.from_numpy(out.view("<i4").astype(np.int32))


def unpack_int32_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_int32_rows: uint8 codes (rows, cols)."""
    words = packed.numpy().astype("<i4")
    as_bytes = torch.from_numpy(words.view(np.uint8).reshape(words.shape[0], -1).copy())
    if (cols * bits) % 32 == 0:
        return unpack(as_bytes, bits, as_bytes.shape[0] * cols).reshape(-1, cols)
    return torch.stack([unpack(row, bits, cols) for row in as_bytes]) if len(as_bytes) else \
        torch.zeros((0, cols), dtype=torch.uint8)


def pack_int32_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (rows, cols) along rows: the transpose of pack_int32_rows of the transpose."""
    return pack_int32_rows(codes.t().contiguous(), bits).t().contiguous()


def unpack_int32_cols(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    return unpack_int32_rows(packed.t().contiguous(), bits, rows).t().contiguous()


# --- what an integer checkpoint can hold ---------------------------------------------------
def check_linear(qm: QuantizedModel, target: str) -> None:
    """Only nn.Linear weights map to the per-module layouts of these checkpoints."""
    for name, t in qm.targets.items():
        if t.kind != "linear":
            raise SchemeError(f"{target} export holds nn.Linear weights only; {name} is a {t.kind} weight: "
                              "quantize with --exclude for it, or export to gguf/native")
    for name, qt in qm.tensors.items():
        # run-time input quantization (W8A8) would be silently dropped: what was evaluated must ship
        if getattr(qt, "input_quant", None) is not None:
            raise SchemeError(f"{target} export writes weight-only checkpoints; {name} also quantizes its input "
                              "at run time (W8A8/SmoothQuant), which is not exported yet: export to native")


def int_tensors(qm: QuantizedModel, target: str, allowed_bits: tuple[int, ...]) -> None:
    """Every quantized tensor is an IntFormat with an integer zero-point and allowed bits."""
    check_linear(qm, target)
    for name, qt in qm.tensors.items():
        fmt = qt.format
        if not isinstance(fmt, IntFormat):
            raise SchemeError(f"{target} export stores integer weights; {name} is {fmt.name}: "
                              "use --to compressed-tensors (fp8, nvfp4) or gguf/native")
        if not fmt.symmetric and fmt.zero_point != "int":
            raise SchemeError(f"{target} export needs an integer zero-point; {name} uses a float minimum "
                              "(zero_point='float'): quantize with zero_point='int' or symmetric")
        if fmt.bits not in allowed_bits:
            raise SchemeError(f"{target} export supports {'/'.join(map(str, allowed_bits))}-bit weights; "
                              f"{name} has {fmt.bits} bits")


def uniform_group_size(qm: QuantizedModel, target: str) -> int:
    """The checkpoint-wide group size: -1 for per-channel, else a size dividing every row."""
    sizes = set()
    for name, qt in qm.tensors.items():
        cols = qt.codes.shape[1]
        if qt.group_size in (0,):
            raise SchemeError(f"{target} export has no per-tensor integer scale; {name} is per tensor: "
                              "quantize with a group size or -1 (per channel)")
        g = -1 if qt.group_size == cols and qm.scheme.weights.effective_group_size() == -1 else qt.group_size
        if g != -1 and cols % g:
            raise SchemeError(f"{target} export needs in_features divisible by the group size; {name} has "
                              f"{cols} columns and group size {g}: choose a group size dividing {cols} or -1")
        sizes.add(g)
    if len(sizes) != 1:
        raise SchemeError(f"{target} export needs one group size for all weights, found {sorted(sizes)}")
    return sizes.pop()


def int_params(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, uint8 zero) per group (rows, n_groups); a symmetric zero is 2^(bits-1)."""
    fmt: IntFormat = qt.format  # type: ignore[assignment]
    scale = qt.params["scale"].to(torch.float16)
    if fmt.symmetric:
        zero = torch.full(scale.shape, fmt.signed_offset, dtype=torch.uint8)
    else:
        zero = qt.params["zero"].to(torch.uint8)
    return scale, zero


def int_tensor(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               group_size: int) -> QuantizedTensor:
    """A lowbit QuantizedTensor for an nn.Linear weight from integer codes and parameters."""
    symmetric = zero is None
    fmt = IntFormat(bits=bits, symmetric=symmetric, zero_point="int")
    params = {"scale": scale.to(torch.float16).contiguous()}
    if not symmetric:
        params["zero"] = zero.to(torch.uint8).contiguous()
    return QuantizedTensor(codes.to(torch.uint8).contiguous(), params, fmt, group_size, tuple(codes.shape), False)


def module_of(name: str) -> str:
    if not name.endswith(".weight"):
        raise SchemeError(f"cannot export {name}: a checkpoint stores quantized Linear weights named '<module>.weight'")
    return name[: -len(".weight")]


def headers(qm: QuantizedModel) -> QuantizedModel:
    """qm for an exporter's checks, which read shapes, formats and parameters only: tensors read
    lazily come without their codes, so the checks' passes do not read every weight again."""
    from lowbit.export.native import tensor_headers

    return dataclasses.replace(qm, tensors=tensor_headers(qm.tensors))


# --- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def tensor_store(output):
    """Where an exporter puts the tensors it builds: in memory up to a bound, then spilled to a
    hidden folder beside `output` (a 7B model's packed weights need not fit), removed after."""
    output = Path(output)
    folder = output.parent / f".{output.name}.spill-{os.getpid()}"
    try:
        yield SpilledTensors(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def lowbit_metadata(qm: QuantizedModel, target: str) -> dict:
    """What lowbit records about the export (read back by the importers)."""
    return {"target": target, "source": qm.source, "method": qm.method, "scheme": qm.scheme.to_dict()}


def write_checkpoint(qm: QuantizedModel, output, tensors: dict[str, torch.Tensor], quantization_config: dict,
                     meta: dict, extra_files: dict[str, dict] | None = None, force: bool = False,
                     max_shard_bytes: int | None = None) -> Path:
    """Write a transformers folder: full-precision tensors + `tensors`, config.json with
    `quantization_config`, tokenizer, extra JSON files; temp dir first, renamed when complete."""
    with staged_output_dir(output, force) as tmp:
        state = _full_precision_state(qm)  # quantized weights are not in it (QuantLinear holds codes)
        clash = set(state) & set(tensors)
        if clash:
            raise SchemeError(f"tensor names clash in the checkpoint: {sorted(clash)[:3]}")
        all_tensors = dict(sorted({**state, **tensors}.items()))   # both hold contiguous tensors or byte ranges
        # lowbit's writer: the safetensors library orders metadata keys arbitrarily (not the same bytes twice)
        write_sharded(tmp, all_tensors, {"format": "pt", LOWBIT_META_KEY: json.dumps(meta, sort_keys=True)},
                      max_shard_bytes)
        qm.model.config.save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["quantization_config"] = quantization_config
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for fname, content in (extra_files or {}).items():
            (tmp / fname).write_text(json.dumps(content, indent=2, sort_keys=True))
        if qm.tokenizer is not None:
            qm.tokenizer.save_pretrained(tmp)
    return Path(output)


# --- reading ---------------------------------------------------------------------------------
def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config.json dict, all tensors of the folder's safetensors files, lowbit metadata or {})."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise SourceError(f"{path} has no config.json; pass a checkpoint folder")
    config = json.loads(cfg_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{path} has no .safetensors files; only safetensors checkpoints can be imported")
    tensors, meta = {}, {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            m = sf.metadata() or {}
            if LOWBIT_META_KEY in m:
                meta = json.loads(m[LOWBIT_META_KEY])
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    return config, tensors, meta


def build_model(path, config: dict, fp_state: dict[str, torch.Tensor], qtensors: dict[str, QuantizedTensor],
                scheme: WeightScheme, meta: dict, fmt_name: str) -> QuantizedModel:
    """A runnable QuantizedModel: float32 model from config, full-precision tensors, QuantLinears."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise SourceError(f"{path}/config.json has no model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg_dict)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    targets = {}
    for name, qt in qtensors.items():
        module = module_of(name)
        try:
            linear = model.get_submodule(module)
        except AttributeError:
            raise SourceError(f"{path}: quantized tensor {name} names no module of the {model_type} model") from None
        if not isinstance(linear, torch.nn.Linear) or tuple(linear.weight.shape) != qt.shape:
            raise SourceError(f"{path}: {name} has shape {qt.shape}, the model's module expects "
                              f"{tuple(getattr(linear, 'weight', torch.empty(0)).shape)}")
        targets[name] = WeightTarget(name, module, "weight", "linear", False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in fp_state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise SourceError(f"{path}: unexpected tensors {unexpected[:3]}; the checkpoint does not match its config.json")
    model.tie_weights()
    for name, qt in qtensors.items():
        install_quantized(model, targets[name], qt)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        pass  # a checkpoint without a tokenizer still imports
    scheme_obj = QuantScheme.from_dict(meta["scheme"]) if "scheme" in meta else QuantScheme(scheme)
    return QuantizedModel(model, tokenizer, scheme_obj, qtensors, targets, meta.get("source", str(path)),
                          meta.get("method", f"imported-{fmt_name}"), {"imported_from": fmt_name})
