"""compressed-tensors, GPTQ and AWQ exports: real loaders accept them, independent unpackers
written here from the published layouts give lowbit's integers back, and imports round-trip."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.api import quantize
from lowbit.errors import SchemeError
from lowbit.export import awq, compressed_tensors as ct_export, gptq

PROMPT = torch.tensor([[5, 17, 40, 3, 60, 22, 9, 31]])
SCHEMES = {
    "w4g32": lowbit.WeightScheme("int", 4, 32, True),
    "w4g32_asym": lowbit.WeightScheme("int", 4, 32, False),
    "w8": lowbit.WeightScheme("int", 8, -1, True),
    "fp8": lowbit.WeightScheme("fp8_e4m3", None, -1),
    "nvfp4": lowbit.WeightScheme("nvfp4", None, 16),
}
_cache = {}


def qmodel(folder, key):
    if key not in _cache:
        _cache[key] = quantize(str(folder), SCHEMES[key], progress=False)
    return _cache[key]


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits.float()


def assert_same_quantized(a, b):
    assert set(a.tensors) == set(b.tensors)
    for name, qa in a.tensors.items():
        qb = b.tensors[name]
        assert torch.equal(qa.codes, qb.codes), name
        assert set(qa.params) == set(qb.params), name
        for p, v in qa.params.items():
            assert qb.params[p].dtype == v.dtype and torch.equal(qb.params[p], v), (name, p)
        assert qa.group_size == qb.group_size and qa.shape == qb.shape


# --- compressed-tensors --------------------------------------------------------------------
needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="compressed-tensors not installed (dev extra)")


@needs_ct
@pytest.mark.parametrize("key", ["w4g32", "w8", "fp8"])
def test_transformers_loads_compressed_tensors_export(tiny_llama, tmp_path, key):
    from transformers import AutoModelForCausalLM

    qm = qmodel(tiny_llama, key)
    out = ct_export.export_compressed_tensors(qm, tmp_path / key)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = (logits(loaded) - logits(qm.model)).abs().max().item()
    assert diff <= 1e-5, diff
    assert_same_quantized(qm, ct_export.import_checkpoint(out))


@needs_ct
def test_asymmetric_pack_quantized_loads_dequantized(tiny_llama, tmp_path):
    """Packed zero-points: transformers' compressed in-memory setup (compressed-tensors 0.20)
    allocates an unpacked zero-point and refuses the file; dequantize-at-load reads it exactly."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    qm = qmodel(tiny_llama, "w4g32_asym")
    out = ct_export.export_compressed_tensors(qm, tmp_path / "asym")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    assert (logits(loaded) - logits(qm.model)).abs().max().item() <= 1e-5
    assert_same_quantized(qm, ct_export.import_checkpoint(out))


@needs_ct
@pytest.mark.parametrize("key", ["w4g32", "w4g32_asym", "w8", "fp8", "nvfp4"])
def test_compressed_tensors_library_decompresses_lowbit_values(tiny_llama, tmp_path, key):
    """compressed-tensors' own compressor for the written format decodes lowbit's weights, and its
    pydantic config parses ours and dumps the same fields."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    qm = qmodel(tiny_llama, key)
    out = ct_export.export_compressed_tensors(qm, tmp_path / key)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    dumped = QuantizationConfig.model_validate(cfg).model_dump()
    for k, v in dumped.items():
        if k in cfg:
            assert cfg[k] == v, k
    group = cfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and cfg["ignore"] == ["lm_head"]
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    stored = load_file(str(out / "model.safetensors"))
    for name, qt in qm.tensors.items():
        module = name[: -len(".weight")]
        local = {k[len(module) + 1:]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == module}
        assert "weight" not in local or local["weight"].dtype == torch.float8_e4m3fn
        w = compressor.decompress(local, scheme)["weight"].float()
        tol = 1e-2 * qt.dequantize().abs().max().item() if key == "nvfp4" else 0  # CT decodes FP4 in bf16
        assert (w - qt.dequantize()).abs().max().item() <= tol, name
    assert_same_quantized(qm, ct_export.import_checkpoint(out))


def test_pack_quantized_layout_is_the_published_one(tiny_llama, tmp_path):
    """Independent reading of pack-quantized: 8 codes per int32 along the input, lowest nibble
    first, code = signed value + 8; packed zero-points along the output dimension."""
    qm = qmodel(tiny_llama, "w4g32_asym")
    out = ct_export.export_compressed_tensors(qm, tmp_path / "asym")
    stored = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    qt, m = qm.tensors[name], name[: -len(".weight")]
    packed, zp = stored[m + ".weight_packed"], stored[m + ".weight_zero_point"]
    rows, cols = qt.codes.shape
    assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
    assert stored[m + ".weight_shape"].tolist() == [rows, cols]
    codes = torch.stack([(packed >> (4 * k)) & 0xF for k in range(8)], dim=-1).reshape(rows, cols)
    assert torch.equal(codes.to(torch.uint8), qt.codes)
    zeros = torch.stack([(zp >> (4 * k)) & 0xF for k in range(8)], dim=1).reshape(rows, -1)
    assert zp.shape == (rows // 8, cols // 32) and torch.equal(zeros.to(torch.uint8), qt.params["zero"])
    assert torch.equal(stored[m + ".weight_scale"], qt.params["scale"].float())


# --- GPTQ ----------------------------------------------------------------------------------
def unpack_gptq_reference(qweight, qzeros, bits, v1):
    """From the AutoGPTQ layout: qweight (in/p, out), input i*p+k at bits k*bits of word [i, j];
    qzeros (groups, out/p), output j*p+k at bits k*bits; v1 stores zero - 1."""
    p, mask = 32 // bits, (1 << bits) - 1
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(q >> (bits * k)) & mask for k in range(p)], dim=1)  # (in/p, p, out)
    codes = codes.reshape(-1, q.shape[1]).t()  # (out, in)
    z = qzeros.to(torch.int64) & 0xFFFFFFFF
    zeros = torch.stack([(z >> (bits * k)) & mask for k in range(p)], dim=-1).reshape(z.shape[0], -1).t()
    return codes, zeros + 1 if v1 else zeros


@pytest.mark.parametrize("key,fmt", [("w4g32", "gptq"), ("w4g32_asym", "gptq_v2"), ("w8", "gptq")])
def test_gptq_export_layout_and_round_trip(tiny_llama, tmp_path, key, fmt):
    qm = qmodel(tiny_llama, key)
    out = gptq.export_gptq(qm, tmp_path / key, checkpoint_format=fmt)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg == cfg and cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == fmt
    ws = qm.scheme.weights
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (ws.bits, ws.group_size, ws.symmetric, False)
    stored = load_file(str(out / "model.safetensors"))
    for name, qt in qm.tensors.items():
        m = name[: -len(".weight")]
        codes, zeros = unpack_gptq_reference(stored[m + ".qweight"], stored[m + ".qzeros"], ws.bits, fmt == "gptq")
        assert torch.equal(codes.to(torch.uint8), qt.codes), name
        expect_zero = torch.full_like(zeros, 1 << (ws.bits - 1)) if ws.symmetric else qt.params["zero"].long()
        assert torch.equal(zeros, expect_zero), name
        assert stored[m + ".scales"].dtype == torch.float16
        assert torch.equal(stored[m + ".scales"], qt.params["scale"].t())
        g = qt.group_size
        assert torch.equal(stored[m + ".g_idx"], (torch.arange(qt.codes.shape[1]) // g).to(torch.int32))
    back = gptq.import_checkpoint(out)
    assert_same_quantized(qm, back)
    assert torch.equal(logits(back.model), logits(qm.model))


def test_gptq_v1_refuses_zero_point_zero(tiny_llama, tmp_path):
    qm = qmodel(tiny_llama, "w4g32_asym")
    qt = next(iter(qm.tensors.values()))
    saved = qt.params["zero"].clone()
    qt.params["zero"][0, 0] = 0
    try:
        with pytest.raises(SchemeError, match="gptq_v2"):
            gptq.export_gptq(qm, tmp_path / "v1")
        assert not (tmp_path / "v1").exists()
    finally:
        qt.params["zero"].copy_(saved)


# --- AWQ -----------------------------------------------------------------------------------
def unpack_awq_reference(packed):
    """From AutoAWQ's GEMM layout: (n, out/8) int32, nibble i holds column 8j + [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    q = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(q.shape[0], q.shape[1] * 8, dtype=torch.int64)
    for i, col in enumerate(order):
        out[:, col::8] = (q >> (4 * i)) & 0xF
    return out


@pytest.mark.parametrize("key", ["w4g32", "w4g32_asym"])
def test_awq_export_layout_and_round_trip(tiny_llama, tmp_path, key):
    qm = qmodel(tiny_llama, key)
    out = awq.export_awq(qm, tmp_path / key)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                   "modules_to_not_convert": None}
    stored = load_file(str(out / "model.safetensors"))
    for name, qt in qm.tensors.items():
        m = name[: -len(".weight")]
        assert torch.equal(unpack_awq_reference(stored[m + ".qweight"]).t().to(torch.uint8), qt.codes), name
        zeros = unpack_awq_reference(stored[m + ".qzeros"]).t()
        expect = torch.full_like(zeros, 8) if qt.format.symmetric else qt.params["zero"].long()
        assert torch.equal(zeros, expect), name
        assert torch.equal(stored[m + ".scales"], qt.params["scale"].t())
    back = awq.import_checkpoint(out)
    assert_same_quantized(qm, back)
    assert torch.equal(logits(back.model), logits(qm.model))


# --- what each format cannot hold ------------------------------------------------------------
def test_group_size_must_divide_rows(tiny_llama, tmp_path):
    qm = quantize(str(tiny_llama), lowbit.WeightScheme("int", 4, 64, True), progress=False)  # 96 % 64 != 0
    for export in (ct_export.export_compressed_tensors, gptq.export_gptq, awq.export_awq):
        with pytest.raises(SchemeError, match="divisible by the group size"):
            export(qm, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_unrepresentable_formats_are_scheme_errors(tiny_llama, tmp_path):
    fp8 = qmodel(tiny_llama, "fp8")
    with pytest.raises(SchemeError, match="integer"):
        gptq.export_gptq(fp8, tmp_path / "g")
    with pytest.raises(SchemeError, match="integer"):
        awq.export_awq(fp8, tmp_path / "a")
    with pytest.raises(SchemeError, match="per-channel"):
        awq.export_awq(quantize(str(tiny_llama), lowbit.WeightScheme("int", 4, -1, True), progress=False), tmp_path / "a")
    with pytest.raises(SchemeError, match="4-bit"):
        awq.export_awq(qmodel(tiny_llama, "w8"), tmp_path / "a")
    fmin = quantize(str(tiny_llama), lowbit.WeightScheme("int", 4, 32, False, zero_point="float"), progress=False)
    for export in (ct_export.export_compressed_tensors, gptq.export_gptq, awq.export_awq):
        with pytest.raises(SchemeError, match="float minimum"):
            export(fmin, tmp_path / "f")


def test_run_time_input_quantization_is_not_dropped(tiny_llama, tmp_path):
    """GPTQ checkpoints hold weights only: a quantized input is refused, not silently dropped;
    compressed-tensors writes it as input_activations (tests/test_ct_activations.py)."""
    import dataclasses

    qm = qmodel(tiny_llama, "w8")
    if not any(f.name == "input_quant" for f in dataclasses.fields(next(iter(qm.tensors.values())))):
        pytest.skip("QuantizedTensor has no input_quant")
    name, qt = next(iter(qm.tensors.items()))
    w8a8 = dataclasses.replace(qm, tensors={**qm.tensors, name: dataclasses.replace(qt, input_quant={"format": "int"})})
    for export in (ct_export.export_compressed_tensors, gptq.export_gptq):
        with pytest.raises(SchemeError, match="input"):
            export(w8a8, tmp_path / "x")
    spec = {"format": "int", "bits": 8, "granularity": "token", "dynamic": True, "symmetric": True,
            "observer": "minmax", "scale": None}
    w8a8 = dataclasses.replace(qm, tensors={**qm.tensors, name: dataclasses.replace(qt, input_quant=spec)})
    with pytest.raises(SchemeError, match="input"):
        gptq.export_gptq(w8a8, tmp_path / "x")
    out = ct_export.export_compressed_tensors(w8a8, tmp_path / "ct")
    inputs = [g["input_activations"] for g in json.loads((out / "config.json").read_text())
              ["quantization_config"]["config_groups"].values()]
    assert len(inputs) == 2 and None in inputs and {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                                    "strategy": "token", "dynamic": True} in inputs
