"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, read by transformers' GPTQ path and vLLM).

Per quantized nn.Linear ``<module>`` (in = in_features, out = out_features, p = 32 // bits):
- ``qweight`` int32 (in / p, out): packed along the *input* dimension: word [i, j] holds the codes
  of inputs i*p .. i*p+p-1 of output j, input i*p+k at bits k*bits (lowest first);
- ``qzeros``  int32 (n_groups, out / p): zero-points packed along the *output* dimension the same
  way; checkpoint_format "gptq" (v1) stores zero - 1 (the historical convention, undone by every
  loader on read), "gptq_v2" stores the zero itself;
- ``scales``  fp16 (n_groups, out); ``g_idx`` int32 (in,) = i // group_size (desc_act false: lowbit
  groups are contiguous columns);
- ``bias`` if the Linear has one.
w = (code - zero) * scale; symmetric lowbit weights have zero = 2^(bits-1).

Limits: 2, 4 and 8 bits (3 bits packs across words in a scheme lowbit does not write); in and
out divisible by 32 // bits; in divisible by the group size (GPTQ kernels); in v1 a zero-point
of 0 cannot be stored (zero - 1 = -1 fills the whole word with ones in the historic packers and
loaders add 1 back per nibble): SchemeError, use checkpoint_format="gptq_v2".
"""

from __future__ import annotations

import os

import torch

from lowbit.errors import SchemeError, SourceError
from lowbit.export import checkpoint as ck
from lowbit.model.quantized import QuantizedModel
from lowbit.scheme import WeightScheme

TARGET = "gptq"
BITS = (2, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) unsigned values -> int32 (n / p, m): value [i*p + k, j] at bits k*bits of word [i, j]."""
    return ck.pack_int32_cols(values, bits)


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return ck.unpack_int32_cols(packed, bits, packed.shape[0] * (32 // bits))


def check(qm: QuantizedModel, checkpoint_format: str = "gptq") -> tuple[int, int, bool]:
    """Every refusal of export_gptq, before anything is packed: (bits, group size, sym)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise SchemeError(f"GPTQ checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    ck.int_tensors(qm, TARGET, BITS)
    group_size = ck.uniform_group_size(qm, TARGET)
    bits = {qt.format.bits for qt in qm.tensors.values()}
    sym = {qt.format.symmetric for qt in qm.tensors.values()}
    if len(bits) != 1 or len(sym) != 1:
        raise SchemeError("GPTQ export needs one bit width and one symmetry for all weights")
    p = 32 // min(bits)
    for name, qt in qm.tensors.items():
        out_f, in_f = qt.codes.shape
        if in_f % p or out_f % p:
            raise SchemeError(f"GPTQ packs {p} codes per int32: {name} is {out_f}x{in_f}, both must be "
                              f"multiples of {p}; exclude it from the targets")
        if checkpoint_format == "gptq" and bool((ck.int_params(qt)[1] == 0).any()):
            raise SchemeError(f"{name} has a zero-point of 0, which GPTQ v1 (stores zero - 1) cannot hold; "
                              "export with checkpoint_format='gptq_v2' or quantize symmetric")
    return bits.pop(), group_size, sym.pop()


def export_gptq(qm: QuantizedModel, output: str | os.PathLike, checkpoint_format: str = "gptq",
                force: bool = False, max_shard_bytes: int | None = None):
    """Write qm as a GPTQ checkpoint (qweight/qzeros/scales/g_idx, quantize_config.json)."""
    bits, group_size, sym = check(ck.headers(qm), checkpoint_format)
    with ck.tensor_store(output) as tensors:
        for name, qt in qm.tensors.items():
            module = ck.module_of(name)
            in_f = qt.codes.shape[1]
            scale, zero = ck.int_params(qt)  # (out, n_groups)
            stored_zero = zero - 1 if checkpoint_format == "gptq" else zero
            tensors[f"{module}.qweight"] = pack_along_rows(qt.codes.t().contiguous(), bits)
            tensors[f"{module}.qzeros"] = ck.pack_int32_rows(stored_zero.t().contiguous(), bits)
            tensors[f"{module}.scales"] = scale.t().contiguous()
            g = in_f if group_size == -1 else group_size
            tensors[f"{module}.g_idx"] = (torch.arange(in_f) // g).to(torch.int32)
        qcfg = {"bits": bits, "group_size": group_size, "desc_act": False, "sym": sym,
                "true_sequential": True, "static_groups": False, "lm_head": False,
                "quant_method": "gptq", "checkpoint_format": checkpoint_format,
                "modules_in_block_to_quantize": None, "damp_percent": 0.01,
                "meta": {"quantizer": ["lowbit"], "lowbit_method": qm.method}}
        return ck.write_checkpoint(qm, output, tensors, qcfg, ck.lowbit_metadata(qm, TARGET),
                                   extra_files={"quantize_config.json": qcfg}, force=force, max_shard_bytes=max_shard_bytes)


def import_checkpoint(path: str | os.PathLike) -> QuantizedModel:
    """A GPTQ checkpoint (v1 or v2, desc_act false or a trivial g_idx) as a QuantizedModel."""
    config, stored, meta = ck.read_checkpoint(path)
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq":
        raise SourceError(f"{path} is not a GPTQ checkpoint (quant_method {qcfg.get('quant_method')!r})")
    bits, group_size, sym = qcfg["bits"], qcfg["group_size"], qcfg.get("sym", True)
    fmt = qcfg.get("checkpoint_format", "gptq")
    if bits not in BITS:
        raise SourceError(f"{path}: {bits}-bit GPTQ is not supported (2, 4, 8)")
    qtensors = {}
    for key in [k for k in stored if k.endswith(".qweight")]:
        module = key[: -len(".qweight")]
        codes = unpack_along_rows(stored.pop(key), bits).t().contiguous()  # (out, in)
        out_f, in_f = codes.shape
        zeros = ck.unpack_int32_rows(stored.pop(f"{module}.qzeros"), bits, out_f).t().to(torch.int32)
        if fmt == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1
        scale = stored.pop(f"{module}.scales").t().contiguous()
        g_idx = stored.pop(f"{module}.g_idx", None)
        g = in_f if group_size == -1 else group_size
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_f) // g):
            raise SourceError(f"{path}: {module} has a permuted g_idx (desc_act); lowbit keeps contiguous groups")
        if sym:
            if not bool((zeros == (1 << (bits - 1))).all()):
                raise SourceError(f"{path}: {module} is marked sym but its zero-points are not {1 << (bits - 1)}")
            zero = None
        else:
            if bool((zeros > (1 << bits) - 1).any()):
                raise SourceError(f"{path}: {module} has zero-points out of range (a v1 zero of 0 was written)")
            zero = zeros.to(torch.uint8)
        qtensors[module + ".weight"] = ck.int_tensor(codes, scale, zero, bits, g)
    if not qtensors:
        raise SourceError(f"{path}: no qweight tensors found")
    ws = WeightScheme("int", bits, group_size, sym)
    return ck.build_model(path, config, stored, qtensors, ws, meta, TARGET)
