"""compressed-tensors export and import of activation (input) quantization: W8A8 INT8 (dynamic per
token, static per tensor), FP8 (dynamic per token, static per tensor), NVFP4 W4A4 and mixed
precision. References: compressed-tensors' own presets and format inference for the config,
transformers (with compressed-tensors) running the checkpoint for the numbers, and a reference
written here from compressed-tensors' published QDQ where its arithmetic differs from lowbit's."""

import dataclasses
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.api import quantize
from lowbit.errors import SchemeError
from lowbit.export import compressed_tensors as ct_export
from lowbit.model.quantized import install_quantized
from lowbit.nn.act_quant import fake_quantize_input
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import quantize_tensor

pytestmark = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                                reason="compressed-tensors not installed (dev extra)")

PROMPT = torch.tensor([[5, 17, 40, 3, 60, 22, 9, 31, 70, 2, 11, 90]])
INT8 = lowbit.WeightScheme("int", 8, -1, True)
FP8 = lowbit.WeightScheme("fp8_e4m3", None, -1)
NVFP4 = lowbit.WeightScheme("nvfp4", None, 16)


def spec(fmt, granularity, dynamic, scale=None, bits=None):
    return {"format": fmt, "bits": bits or (4 if fmt == "nvfp4" else 8), "granularity": granularity,
            "dynamic": dynamic, "symmetric": True, "observer": "minmax", "scale": scale}


# case -> (weights, input spec from the calibrated input absmax of the module, CT preset or None)
CASES = {
    "w8a8_int8_dynamic": (INT8, lambda amax: spec("int", "token", True), "W8A8"),
    "w8a8_int8_static": (INT8, lambda amax: spec("int", "tensor", False, amax / 127), None),
    "fp8_dynamic": (FP8, lambda amax: spec("fp8_e4m3", "token", True), "FP8_DYNAMIC"),
    "fp8_static": (FP8, lambda amax: spec("fp8_e4m3", "tensor", False, amax / 448), "FP8"),
    "nvfp4_w4a4": (NVFP4, lambda amax: spec("nvfp4", "block", False, amax / (448 * 6)), "NVFP4"),
}
FORMATS = {"w8a8_int8_dynamic": "int-quantized", "w8a8_int8_static": "int-quantized",
           "fp8_dynamic": "float-quantized", "fp8_static": "float-quantized", "nvfp4_w4a4": "nvfp4-pack-quantized"}


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits.float()


def input_absmax(model) -> dict[str, float]:
    """Per QuantLinear module: 1.25 x the absmax of its input on PROMPT (the static calibration).
    The margin keeps every input inside the static range once earlier inputs are quantized too:
    past it lowbit clamps INT at +-127, compressed-tensors (and vLLM) at -128..127."""
    amax: dict[str, float] = {}

    def hook(name):
        return lambda mod, args: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    logits(model)
    for h in hooks:
        h.remove()
    return {n: 1.25 * a for n, a in amax.items()}


def with_inputs(qm, spec_of):
    """Give every quantized tensor (module -> spec or None) its input spec and install it."""
    for name, qt in list(qm.tensors.items()):
        s = spec_of(name[: -len(".weight")])
        if s is not None:
            qm.tensors[name] = dataclasses.replace(qt, input_quant=s)
            install_quantized(qm.model, qm.targets[name], qm.tensors[name])
    return qm


def quantized_with_inputs(folder, case):
    """(qm with input quantization, weight-only logits of the same weights)."""
    ws, make_spec, _ = CASES[case]
    qm = quantize(str(folder), lowbit.QuantScheme(ws), method="rtn", progress=False)
    weight_only = logits(qm.model)
    amax = input_absmax(qm.model)
    return with_inputs(qm, lambda m: make_spec(amax[m])), weight_only


def assert_round_trip(qm, out):
    back = ct_export.import_checkpoint(out)
    assert set(back.tensors) == set(qm.tensors)
    for name, qa in qm.tensors.items():
        qb = back.tensors[name]
        assert torch.equal(qa.codes, qb.codes), name
        assert set(qa.params) == set(qb.params), name
        for p, v in qa.params.items():
            assert qb.params[p].dtype == v.dtype and torch.equal(qb.params[p], v), (name, p)
        assert qa.group_size == qb.group_size and qa.shape == qb.shape
        assert qb.input_quant == qa.input_quant, name
    assert back.scheme == qm.scheme
    assert torch.equal(logits(back.model), logits(qm.model))
    return back


def load_transformers(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def ct_modules(model):
    return {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_tensors_are_compressed_tensors_own(tiny_llama, tmp_path, case):
    """input_activations equals compressed-tensors' preset (W8A8, FP8_DYNAMIC, FP8, NVFP4), the
    format is what its own inference picks, its pydantic config parses and dumps the same fields,
    and the per-module input tensors have its names, dtypes and shapes (no symmetric zero-point)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    qm, _ = quantized_with_inputs(tiny_llama, case)
    out = ct_export.export_compressed_tensors(qm, tmp_path / case)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert list(cfg["config_groups"]) == ["group_0"] and cfg["format"] == FORMATS[case]
    group = cfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == FORMATS[case] and cfg["ignore"] == ["lm_head"]
    dumped = QuantizationConfig.model_validate(cfg).model_dump()
    for k, v in dumped.items():
        if k in cfg:
            assert cfg[k] == v, k
    preset = CASES[case][2]
    if preset is not None:
        ref = preset_name_to_scheme(preset, ["Linear"]).model_dump()
        assert group["input_activations"] == ref["input_activations"]
        if preset != "FP8":   # the FP8 preset has per-tensor weights, lowbit's here are per channel
            assert group["weights"] == ref["weights"]
    else:  # static INT8 per tensor, as llm-compressor writes it
        ref = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False,
                               observer="static_minmax").model_dump()
        assert group["input_activations"] == ref
    scheme = QuantizationScheme.model_validate(group)
    assert infer_module_format(torch.nn.Linear, scheme).value == FORMATS[case]
    stored = load_file(str(out / "model.safetensors"))
    for name, qt in qm.tensors.items():
        m = name[: -len(".weight")]
        local = {k[len(m) + 1:]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == m}
        inputs = {k: v for k, v in local.items() if k.startswith("input_")}
        s = qt.input_quant
        if s["dynamic"]:
            assert inputs == {}, name
        elif s["format"] == "nvfp4":
            gs = inputs.pop("input_global_scale")
            assert gs.dtype == torch.float32 and gs.shape == (1,) and inputs == {}
            assert gs.item() == pytest.approx(1 / s["scale"], rel=1e-6)
        else:
            scale = inputs.pop("input_scale")
            assert scale.dtype == torch.float32 and scale.shape == (1,) and inputs == {}
            assert scale.item() == torch.tensor(s["scale"], dtype=torch.float32).item()
        if FORMATS[case] == "int-quantized":   # signed int8 values, the layout vLLM's W8A8 kernels load
            assert local["weight"].dtype == torch.int8
            assert torch.equal(local["weight"].to(torch.int16) + 128, qt.codes.to(torch.int16))


def ct_int_dynamic_reference(model, bits=8):
    """compressed-tensors' dynamic per-token INT QDQ (independent of lowbit's): scale = row absmax
    / ((2^bits - 1) / 2), round half to even, clamp to [-2^(bits-1), 2^(bits-1) - 1]."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))

    def qdq(mod, args):
        x = args[0]
        s = x.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
        return (torch.round(x / s).clamp(qmin, qmax) * s,)

    return [m.register_forward_pre_hook(qdq) for m in model.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize("case", [c for c in CASES if c != "nvfp4_w4a4"])
def test_transformers_runs_the_input_quantization(tiny_llama, tmp_path, case):
    """transformers (compressed-tensors, compressed in memory on CPU) loads the checkpoint, quantizes
    each Linear's input at run time, and computes lowbit's logits:
    - int8 static, fp8 dynamic, fp8 static: max abs diff 0.0 measured (tolerance 1e-5);
    - int8 dynamic per token: compressed-tensors' reference QDQ divides the row absmax by 127.5
      (its int range 255 / 2), lowbit and vLLM's int8 kernels by 127: max abs diff 0.0089 measured
      on logits up to 0.75 (tolerance 2e-2), and 0.0 (tolerance 1e-5) against a reference of
      compressed-tensors' QDQ written in this file on lowbit's weight-only model."""
    qm, weight_only = quantized_with_inputs(tiny_llama, case)
    out = ct_export.export_compressed_tensors(qm, tmp_path / case)
    loaded = load_transformers(out)
    modules = ct_modules(loaded)
    assert set(modules) == {n[: -len(".weight")] for n in qm.tensors}
    assert all(m.quantization_scheme.input_activations is not None for m in modules.values())
    got, ref = logits(loaded), logits(qm.model)
    diff = (got - ref).abs().max().item()
    effect = (ref - weight_only).abs().max().item()   # what input quantization changes in lowbit
    if case == "w8a8_int8_dynamic":
        assert diff <= 2e-2, diff
        wo = quantize(str(tiny_llama), CASES[case][0], progress=False)
        hooks = ct_int_dynamic_reference(wo.model)
        ct_ref = logits(wo.model)
        for h in hooks:
            h.remove()
        assert (got - ct_ref).abs().max().item() <= 1e-5
    else:
        assert diff <= 1e-5, diff
    # the activation quantization really ran in transformers: its logits are not weight-only ones
    assert (got - weight_only).abs().max().item() >= 0.5 * effect > 1e-3
    assert_round_trip(qm, out)


def test_transformers_runs_nvfp4_w4a4(tiny_llama, tmp_path):
    """NVFP4 W4A4 (static input global scale, E4M3 block scales from each block of 16 at run time).
    compressed-tensors 0.20 decompresses NVFP4 weights to bf16 (unpack_fp4_from_uint8's default
    dtype) whatever the model dtype, so an fp32 forward fails (float input, bf16 weight): the test
    decompresses first and casts those weights to fp32 (their values stay bf16-rounded, 0.26% of
    the weight range). Measured: compressed-tensors' input QDQ vs lowbit's on the same (CT)
    weights 1.8e-7 (tolerance 1e-5); logits vs lowbit 0.079 (tolerance 0.15) on logits up to
    0.75, the bf16 weight rounding amplified by 4-bit activations (weight-only it is 0.0014,
    tolerance 1e-2); the 4-bit inputs move transformers' logits by 0.077 (asserted > 0.05)."""
    qm, weight_only = quantized_with_inputs(tiny_llama, "nvfp4_w4a4")
    out = ct_export.export_compressed_tensors(qm, tmp_path / "nvfp4")
    loaded = load_transformers(out)
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    modules = ct_modules(loaded)
    assert set(modules) == {n[: -len(".weight")] for n in qm.tensors}
    for name, m in modules.items():
        assert m.quantization_scheme.input_activations.dynamic == "local"
        assert m.input_global_scale.item() == pytest.approx(1 / qm.tensors[name + ".weight"].input_quant["scale"], rel=1e-6)
        m.weight.data = m.weight.data.float()
    got = logits(loaded)
    assert (got - logits(qm.model)).abs().max().item() <= 0.15
    # the same weights with lowbit's input QDQ instead of compressed-tensors'
    hooks = []
    for name, m in modules.items():
        m.quantization_enabled = False
        s = qm.tensors[name + ".weight"].input_quant
        hooks.append(m.register_forward_pre_hook(lambda mod, args, s=s: (fake_quantize_input(args[0], s),)))
    assert (logits(loaded) - got).abs().max().item() <= 1e-5
    for h in hooks:
        h.remove()
    ct_weight_only = logits(loaded)   # quantization disabled: weights only
    assert (ct_weight_only - weight_only).abs().max().item() <= 1e-2
    assert (got - ct_weight_only).abs().max().item() > 5e-2   # 4-bit inputs really ran
    assert_round_trip(qm, out)


def test_mixed_precision_groups_load_in_transformers(tiny_llama, tmp_path):
    """Attention int4 g32 weight-only (pack-quantized), gate/up int8 per channel with static int8
    inputs (int-quantized), down fp8 per channel with dynamic fp8 inputs (float-quantized), in two
    layers: three config groups, format mixed-precision; transformers computes lowbit's logits
    (max abs diff 0.0 measured, tolerance 1e-5). The per-tensor schemes are set here with
    quantize_tensor (RTN) rather than through the planner, so the test holds whatever plans them."""
    from compressed_tensors.quantization import QuantizationConfig

    w4 = lowbit.WeightScheme("int", 4, 32, True)
    qm = quantize(str(tiny_llama), lowbit.QuantScheme(w4), method="rtn", progress=False)
    original = load_file(str(tiny_llama / "model.safetensors"))
    names = list(qm.tensors)
    for n in names:
        ws = INT8 if ("gate_proj" in n or "up_proj" in n) else FP8 if "down_proj" in n else None
        if ws is not None:
            qm.tensors[n] = quantize_tensor(original[n], ws)
            install_quantized(qm.model, qm.targets[n], qm.tensors[n])
    amax = input_absmax(qm.model)
    qm = with_inputs(qm, lambda m: (spec("int", "tensor", False, amax[m] / 127) if m.endswith(("gate_proj", "up_proj"))
                                    else spec("fp8_e4m3", "token", True) if m.endswith("down_proj") else None))
    out = ct_export.export_compressed_tensors(qm, tmp_path / "mixed")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(cfg)
    assert cfg["format"] == "mixed-precision"
    by_format = {g["format"]: g for g in cfg["config_groups"].values()}
    assert set(by_format) == {"pack-quantized", "int-quantized", "float-quantized"}
    assert by_format["pack-quantized"]["input_activations"] is None
    assert by_format["pack-quantized"]["weights"]["group_size"] == 32
    assert by_format["int-quantized"]["input_activations"]["strategy"] == "tensor"
    # per channel (not a group as long as the row) although the model's scheme is g32: vLLM's W8A8
    # and FP8 kernels take channel or tensor weight scales only
    assert by_format["int-quantized"]["weights"]["strategy"] == "channel"
    assert by_format["float-quantized"]["weights"]["strategy"] == "channel"
    assert by_format["float-quantized"]["input_activations"]["strategy"] == "token"
    targets = {f: sorted(t[len("re:^"):-1].replace("\\", "") for t in g["targets"]) for f, g in by_format.items()}
    assert targets["int-quantized"] == sorted(n[:-7] for n in names if "gate_proj" in n or "up_proj" in n)
    assert targets["float-quantized"] == sorted(n[:-7] for n in names if "down_proj" in n)
    assert len(targets["pack-quantized"]) == 8
    loaded = load_transformers(out)
    assert (logits(loaded) - logits(qm.model)).abs().max().item() <= 1e-5
    assert_round_trip(qm, out)


def test_same_weights_different_inputs_are_separate_groups(tiny_llama, tmp_path):
    """One weight format, two input specs (layer 0 dynamic, layer 1 static): two groups, one
    format; the import gives each module its own spec back."""
    qm = quantize(str(tiny_llama), INT8, progress=False)
    amax = input_absmax(qm.model)
    qm = with_inputs(qm, lambda m: spec("int", "token", True) if ".layers.0." in m else spec("int", "tensor", False, amax[m] / 127))
    out = ct_export.export_compressed_tensors(qm, tmp_path / "two")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized" and len(cfg["config_groups"]) == 2
    assert sorted(g["input_activations"]["dynamic"] for g in cfg["config_groups"].values()) == [False, True]
    assert_round_trip(qm, out)


def test_import_without_lowbit_metadata_reads_the_config(tiny_llama, tmp_path):
    """A checkpoint written by another tool (no lowbit metadata): input_quant comes from
    input_activations and the input_* tensors (static scale as stored, float32)."""
    qm, _ = quantized_with_inputs(tiny_llama, "w8a8_int8_static")
    out = ct_export.export_compressed_tensors(qm, tmp_path / "foreign")
    stored = load_file(str(out / "model.safetensors"))
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    back = ct_export.import_checkpoint(out)
    for name, qt in qm.tensors.items():
        got, want = back.tensors[name].input_quant, qt.input_quant
        assert {k: got[k] for k in want if k != "scale"} == {k: want[k] for k in want if k != "scale"}
        assert got["scale"] == torch.tensor(want["scale"], dtype=torch.float32).item()
        assert torch.equal(back.tensors[name].codes, qt.codes)
    assert back.scheme.activations is not None and not back.scheme.activations.dynamic
    assert torch.equal(logits(back.model), logits(qm.model))


@pytest.mark.parametrize("bad,match", [
    (spec("mxfp8", "block", True), "mxfp8.*int8, fp8_e4m3 or nvfp4"),
    (spec("mxfp4", "block", True, bits=4), "mxfp4"),
    (spec("fp8_e5m2", "token", True), "E4M3"),
    ({**spec("int", "token", True), "symmetric": False}, "asymmetric"),
    (spec("int", "tensor", False, None), "no calibrated scale"),
    (spec("nvfp4", "block", True), "dynamic global scale"),
    ({"format": "int"}, "lacks"),
])
def test_unstorable_input_quantization_is_refused(tiny_llama, tmp_path, bad, match):
    """One SchemeError line naming the tensor and the fix; nothing at the output path."""
    qm = quantize(str(tiny_llama), NVFP4 if bad.get("format") == "nvfp4" else INT8, progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = {**qm.tensors, name: dataclasses.replace(qm.tensors[name], input_quant=bad)}
    with pytest.raises(SchemeError, match=match) as err:
        ct_export.export_compressed_tensors(dataclasses.replace(qm, tensors=tensors), tmp_path / "x")
    assert name in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_input_quantization_of_a_non_linear_is_refused(tiny_llama, tmp_path):
    qm = quantize(str(tiny_llama), INT8, progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = {**qm.tensors, name: dataclasses.replace(qm.tensors[name], input_quant=spec("int", "token", True))}
    targets = {**qm.targets, name: dataclasses.replace(qm.targets[name], kind="conv1d")}
    with pytest.raises(SchemeError, match="nn.Linear modules only") as err:
        ct_export.export_compressed_tensors(dataclasses.replace(qm, tensors=tensors, targets=targets), tmp_path / "x")
    assert name in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())
