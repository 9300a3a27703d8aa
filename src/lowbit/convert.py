"""`lowbit convert`: a quantized model into another runtime's format without quantizing it again
where the grids map, and with each other tensor re-fitted and its added error said.

For GGUF, each tensor is (formats.gguf_map): exact (the same codes and scales as GGUF blocks),
codes kept (an integer zero-point as Q4_1/Q5_1, the min rounded to fp16), or re-fitted from its
decoded values into a GGUF type (llama.cpp's fallback where the row does not fit its blocks).
The other exporters store lowbit's codes and scales as they are, or refuse what they cannot."""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from lowbit.model.quantized import QuantizedModel
from lowbit.tensor import QuantizedTensor


@dataclasses.dataclass
class TensorConversion:
    name: str
    source: str                 # e.g. "int4 g128 sym"
    target: str                 # GGML type, e.g. "Q4_0"
    how: str                    # exact | codes kept | re-fitted
    added_rel_err: float        # ||new - old|| / ||old|| of the decoded weights
    note: str | None = None     # fallback or rounding said in words


# quantization_config.quant_method -> the module whose import_checkpoint reads it
IMPORTERS = {"gptq": "lowbit.export.gptq", "awq": "lowbit.export.awq",
             "compressed-tensors": "lowbit.export.compressed_tensors"}


def read_quantized(path, lazy: bool = False) -> QuantizedModel:
    """A quantized checkpoint as a QuantizedModel: a lowbit folder, a GGUF file, or a GPTQ / AWQ /
    compressed-tensors folder (its codes and scales as stored). lazy=True opens a lowbit folder
    without reading its weights (export.native.open_lazy: for exporters only)."""
    import importlib
    import json
    from pathlib import Path

    from lowbit.errors import SourceError
    from lowbit.model.load import resolve_source

    resolved, kind = resolve_source(path)
    if kind == "lowbit":
        from lowbit.export.native import load, open_lazy

        return open_lazy(resolved) if lazy else load(resolved)
    if kind == "gguf":
        from lowbit.export.gguf import import_gguf

        return import_gguf(resolved)
    method = None
    if kind == "hf":
        config = json.loads((Path(resolved) / "config.json").read_text())
        method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in IMPORTERS:
        raise SourceError(f"{path} is not a quantized checkpoint lowbit reads ({kind}"
                          f"{', quant_method ' + repr(method) if method else ', not quantized'}); `lowbit convert` reads "
                          f"lowbit outputs, GGUF files and {', '.join(IMPORTERS)} folders; "
                          "quantize a full-precision model with `lowbit quantize`")
    return importlib.import_module(IMPORTERS[method]).import_checkpoint(resolved)


def _label(qt: QuantizedTensor) -> str:
    f = qt.format
    if f.name == "int":
        kind = "sym" if f.symmetric else ("asym-fmin" if f.zero_point == "float" else "asym")
        return f"int{f.bits} g{qt.group_size} {kind}"
    return f"{f.name} g{qt.group_size}"


def _rel(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm().clamp_min(1e-12))


def to_gguf_blocks(qm: QuantizedModel, refit: str | None = None,
                   progress: bool = True) -> tuple[QuantizedModel, dict[str, str], list[TensorConversion]]:
    """(qm with every tensor as GGUF blocks, {tensor: float type} for rows no block fits, one
    TensorConversion per tensor). `refit`: the GGML type re-fitted tensors get (default: the
    k-quant of their bits, formats.gguf_map.refit_type)."""
    from lowbit.formats.gguf_blocks import GGUF_TYPES
    from lowbit.formats.gguf_map import exact_blocks, nearest_blocks, refit_type
    from lowbit.plan.gguf_mixes import fallback_type, lowbit_format
    from lowbit.scheme import WeightScheme
    from lowbit.tensor import quantize_tensor

    tensors, float_types, rows = {}, {}, []
    for name, qt in tqdm(qm.tensors.items(), desc="convert", disable=not progress, unit="w"):
        exact = exact_blocks(qt)
        if exact is not None:
            tensors[name] = exact
            wider = exact.format.code_bits > qt.format.code_bits
            rows.append(TensorConversion(name, _label(qt), GGUF_TYPES[exact.format.name].name, "exact", 0.0,
                                         f"{qt.format.code_bits}-bit codes in {exact.format.code_bits}-bit blocks"
                                         if wider else None))
            continue
        old = qt.dequantize(torch.float32)
        near = nearest_blocks(qt)
        if near is not None:
            tensors[name] = near
            rows.append(TensorConversion(name, _label(qt), GGUF_TYPES[near.format.name].name, "codes kept",
                                         _rel(near.dequantize(torch.float32), old), "min = -zero * scale rounded to fp16"))
            continue
        want = (refit or refit_type(qt)).upper()
        t, reason = fallback_type(want, qt.codes.shape[1])
        if lowbit_format(t) is None:   # not even a 32-block fits: keep the decoded values
            tensors[name] = qt
            float_types[name] = t
            rows.append(TensorConversion(name, _label(qt), t, "re-fitted", _rel(old.to(torch.float16).float(), old), reason))
            continue
        new = quantize_tensor(old, WeightScheme(lowbit_format(t), None, 32), transposed=qt.transposed)
        tensors[name] = new
        rows.append(TensorConversion(name, _label(qt), t, "re-fitted", _rel(new.dequantize(torch.float32), old), reason))
    counts = {how: sum(r.how == how for r in rows) for how in ("exact", "codes kept", "re-fitted")}
    recipe = {**qm.recipe, "converted": {"to": "gguf", "tensors": counts, "refit_type": refit}}
    return dataclasses.replace(qm, tensors=tensors, recipe=recipe), float_types, rows


def blocks_as_integers(qm: QuantizedModel) -> QuantizedModel:
    """GGUF Q4_0/Q5_0/Q8_0 (and Q4_1/Q5_1) tensors as the lowbit integer formats with the same
    values, so checkpoint exporters that store integers take them; other tensors as they are."""
    from lowbit.export.native import LazyTensors
    from lowbit.formats.gguf_map import integer_from_blocks

    def integers(qt):
        return integer_from_blocks(qt) or qt

    if isinstance(qm.tensors, LazyTensors):   # a lazily opened folder stays lazy
        return dataclasses.replace(qm, tensors=qm.tensors.mapped(integers))
    return dataclasses.replace(qm, tensors={n: integers(qt) for n, qt in qm.tensors.items()})
