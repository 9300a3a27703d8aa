"""AWQ GEMM checkpoints (AutoAWQ layout, read by transformers' AWQ path and vLLM).

Per quantized nn.Linear ``<module>`` (in = in_features, out = out_features), 4-bit only:
- ``qweight`` int32 (in, out / 8): packed along the *output* dimension; word [i, j] holds outputs
  8j .. 8j+7 of input i in AWQ's interleaved order: nibble k (bits 4k..4k+3) holds output
  8j + ORDER[k], ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
- ``qzeros``  int32 (n_groups, out / 8): zero-points, same packing and order, stored as is;
- ``scales``  fp16 (n_groups, out); ``bias`` if the Linear has one.
w = (code - zero) * scale; symmetric lowbit weights are written with zero = 8 (AWQ has no
symmetric variant in its GEMM kernels: zero_point stays true).

Limits: 4 bits; a positive group size dividing in (AWQ has no per-channel mode); out divisible
by 8. Anything else is a SchemeError naming the weight.
"""

from __future__ import annotations

import os

import torch

from lowbit.errors import SchemeError, SourceError
from lowbit.export import checkpoint as ck
from lowbit.model.quantized import QuantizedModel
from lowbit.scheme import WeightScheme

TARGET = "awq"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(n, m) 4-bit values -> int32 (n, m / 8) in AWQ's interleaved nibble order."""
    n, m = values.shape
    blocks = values.reshape(n, m // 8, 8)[:, :, list(ORDER)]  # nibble k holds output ORDER[k]
    return ck.pack_int32_rows(blocks.reshape(n, m), BITS)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    n, w = packed.shape
    nibbles = ck.unpack_int32_rows(packed, BITS, w * 8).reshape(n, w, 8)
    inverse = [ORDER.index(c) for c in range(8)]
    return nibbles[:, :, inverse].reshape(n, w * 8).contiguous()


def check(qm: QuantizedModel) -> int:
    """Every refusal of export_awq, before anything is packed: the group size."""
    ck.int_tensors(qm, TARGET, (BITS,))
    group_size = ck.uniform_group_size(qm, TARGET)
    if group_size == -1:
        raise SchemeError("AWQ GEMM checkpoints need a positive group size (no per-channel mode); "
                          "quantize with --group-size 128 (or 64/32)")
    for name, qt in qm.tensors.items():
        if qt.codes.shape[0] % 8:
            raise SchemeError(f"AWQ packs 8 outputs per int32: {name} has {qt.codes.shape[0]} outputs; "
                              "exclude it from the targets")
    return group_size


def export_awq(qm: QuantizedModel, output: str | os.PathLike, force: bool = False,
               max_shard_bytes: int | None = None):
    """Write qm as an AWQ GEMM checkpoint (qweight/qzeros/scales)."""
    group_size = check(ck.headers(qm))
    with ck.tensor_store(output) as tensors:
        for name, qt in qm.tensors.items():
            module = ck.module_of(name)
            scale, zero = ck.int_params(qt)  # (out, n_groups)
            tensors[f"{module}.qweight"] = pack_awq(qt.codes.t().contiguous())
            tensors[f"{module}.qzeros"] = pack_awq(zero.t().contiguous())
            tensors[f"{module}.scales"] = scale.t().contiguous()
        qcfg = {"quant_method": "awq", "bits": BITS, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
        return ck.write_checkpoint(qm, output, tensors, qcfg, ck.lowbit_metadata(qm, TARGET), force=force,
                                   max_shard_bytes=max_shard_bytes)


def import_checkpoint(path: str | os.PathLike) -> QuantizedModel:
    """An AWQ GEMM checkpoint as a QuantizedModel (symmetric when lowbit wrote it symmetric)."""
    config, stored, meta = ck.read_checkpoint(path)
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "awq":
        raise SourceError(f"{path} is not an AWQ checkpoint (quant_method {qcfg.get('quant_method')!r})")
    if qcfg.get("bits", 4) != BITS or str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise SourceError(f"{path}: only 4-bit AWQ GEMM checkpoints import (got {qcfg.get('bits')}-bit "
                          f"{qcfg.get('version')})")
    group_size = qcfg["group_size"]
    sym = bool(meta.get("scheme", {}).get("weights", {}).get("symmetric", False))
    qtensors = {}
    for key in [k for k in stored if k.endswith(".qweight")]:
        module = key[: -len(".qweight")]
        codes = unpack_awq(stored.pop(key)).t().contiguous()  # (out, in)
        zero = unpack_awq(stored.pop(f"{module}.qzeros")).t().contiguous()
        scale = stored.pop(f"{module}.scales").t().contiguous()
        if sym and not bool((zero == 8).all()):
            sym = False  # recorded as symmetric but zero-points differ: keep them
        qtensors[module + ".weight"] = (codes, scale, zero)
    if not qtensors:
        raise SourceError(f"{path}: no qweight tensors found")
    qtensors = {n: ck.int_tensor(c, s, None if sym else z, BITS, group_size) for n, (c, s, z) in qtensors.items()}
    ws = WeightScheme("int", BITS, group_size, sym)
    return ck.build_model(path, config, stored, qtensors, ws, meta, TARGET)
