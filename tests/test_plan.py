"""The plan layer: activation presets applied for real (against fake quantization written here
from the published formulas), recipes, budgets, `lowbit plan`, the forward_loop API."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from lowbit.api import make_recipe, plan_model, quantize
from lowbit.cli import main
from lowbit.model.load import LoadedModel
from lowbit.plan import Budget, build_plan, recipe_from_dict
from lowbit.plan.recipe import parse_candidate
from lowbit.scheme import QuantScheme, WeightScheme, preset

E2M1_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# --- independent references (published formulas, torch dtypes) --------------------------------
def ref_e2m1(v: torch.Tensor) -> torch.Tensor:
    """OCP E2M1: nearest of the 8 magnitudes, ties to the even code, saturating at 6."""
    a = v.abs().clamp(max=6.0)
    d = (a.unsqueeze(-1) - E2M1_LEVELS).abs()
    best = d.min(dim=-1, keepdim=True).values
    # among equally near levels take the even code (lowest mantissa bit 0)
    codes = torch.arange(8).expand_as(d)
    cand = torch.where(d == best, codes, torch.full_like(codes, 99))
    even = torch.where(cand % 2 == 0, cand, torch.full_like(cand, 99)).min(dim=-1).values
    code = torch.where(even < 99, even, cand.min(dim=-1).values)
    return torch.sign(v) * E2M1_LEVELS[code]


def ref_int8_token(x):
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(x / s).clamp(-127, 127) * s


def ref_int8_static(x, scale):
    return torch.round(x / scale).clamp(-127, 127) * scale


def ref_fp8_token(x):
    s = (x.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12)
    return (x / s).to(torch.float8_e4m3fn).float() * s


def ref_fp8_static(x, scale):
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def ref_mx(x, elem: str):
    """OCP MX v1.0: blocks of 32, X = 2^(floor(log2 amax) - emax_elem), elements cast saturating."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    emax = 8 if elem == "e4m3" else 2
    e = torch.floor(torch.log2(amax)) - emax
    scale = torch.where(amax > 0, torch.exp2(e.clamp(-127, 127)), torch.ones_like(amax))
    scale = scale.to(torch.float8_e8m0fnu).float()   # the E8M0 value (exact powers of two)
    v = b / scale
    q = v.clamp(-448, 448).to(torch.float8_e4m3fn).float() if elem == "e4m3" else ref_e2m1(v)
    return torch.where(amax > 0, q * scale, torch.zeros_like(q)).reshape(x.shape)


def ref_nvfp4(x, global_scale):
    """NVFP4: E4M3 scale per 16 (amax/6 over the global scale), E2M1 elements."""
    b = x.reshape(*x.shape[:-1], -1, 16)
    amax = b.abs().amax(-1, keepdim=True)
    gs = global_scale if global_scale is not None else (x.abs().amax() / (448 * 6)).clamp_min(1e-12)
    bs = (amax / 6 / gs).clamp(max=448).to(torch.float8_e4m3fn).float()
    d = bs * gs
    q = torch.where(d > 0, ref_e2m1(b / torch.where(d > 0, d, torch.ones_like(d))) * d, torch.zeros_like(b))
    return q.reshape(x.shape)


REFERENCES = {
    "W8A8": lambda x, spec: ref_int8_token(x),
    "W4A8": lambda x, spec: ref_int8_token(x),
    "W8A8_STATIC": lambda x, spec: ref_int8_static(x, torch.tensor(spec["scale"])),
    "FP8_DYNAMIC": lambda x, spec: ref_fp8_token(x),
    "FP8": lambda x, spec: ref_fp8_static(x, torch.tensor(spec["scale"])),
    "MXFP8": lambda x, spec: ref_mx(x, "e4m3"),
    "MXFP4": lambda x, spec: ref_mx(x, "e2m1"),
    "NVFP4": lambda x, spec: ref_nvfp4(x, torch.tensor(spec["scale"])),
}
QMAX = {"W8A8_STATIC": 127.0, "FP8": 448.0, "NVFP4": 448.0 * 6}


def _tiny(tiny_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    return LoadedModel(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tokenizer, str(tiny_llama), "hf")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", list(REFERENCES))
def test_activation_presets_are_applied_and_match_the_published_formulas(name, tiny_llama, tokenizer, calib):
    source = _tiny(tiny_llama, tokenizer)
    ids = calib.windows(tokenizer)[:2]
    scheme = preset(name)
    if name == "W4A8":  # the preset's groups of 128 do not fit the tiny model's 96 columns; same inputs
        scheme = QuantScheme(WeightScheme("int", 4, 32), scheme.activations)
    qm = quantize(copy.deepcopy(source), scheme if name == "W4A8" else name, calibration=calib, progress=False)
    assert qm.scheme.activations == scheme.activations
    # the weight-only model with the same weights, and the same weights with the reference
    # fake quantization of every quantized Linear's input
    weight_only = copy.deepcopy(source.model)
    for n, qt in qm.tensors.items():
        weight_only.get_parameter(n).data.copy_(qt.dequantize())
    reference = copy.deepcopy(weight_only)
    specs = {qm.targets[n].module_name: qt.input_quant for n, qt in qm.tensors.items()}
    assert all(s is not None for s in specs.values())
    for module_name, spec in specs.items():
        reference.get_submodule(module_name).register_forward_pre_hook(
            lambda _m, args, spec=spec: (REFERENCES[name](args[0].float(), spec),))
    out, ref, wo = _logits(qm.model, ids), _logits(reference, ids), _logits(weight_only, ids)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), float((out - ref).abs().max())
    assert (out - wo).abs().max() > 1e-3  # the activations really are quantized
    if name in QMAX:  # static scales: the calibration inputs' absmax (minmax observer) / format max
        seen = {}
        hooks = [weight_only.get_submodule(m).register_forward_pre_hook(
            lambda _m, args, m=m: seen.__setitem__(m, max(seen.get(m, 0.0), float(args[0].abs().max()))))
            for m in specs]
        with torch.no_grad():
            windows = calib.windows(tokenizer)
            for i in range(0, len(windows), calib.batch_size):
                weight_only(windows[i: i + calib.batch_size], use_cache=False)
        for h in hooks:
            h.remove()
        for m, spec in specs.items():
            assert spec["scale"] == pytest.approx(seen[m] / QMAX[name], rel=1e-6)


def test_static_observers_clip_less_or_equal_than_minmax(tiny_llama, tokenizer, calib):
    from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme

    scales = {}
    for obs in ("minmax", "percentile", "mse", "kl"):
        act = ActivationScheme("int", 8, "tensor", False, observer=obs)
        qm = quantize(_tiny(tiny_llama, tokenizer), QuantScheme(WeightScheme("int", 8, -1), act), calibration=calib,
                      progress=False)
        scales[obs] = {n: qt.input_quant["scale"] for n, qt in qm.tensors.items()}
        assert all(qt.input_quant["observer"] == obs for qt in qm.tensors.values())
    for obs in ("percentile", "mse", "kl"):
        assert all(scales[obs][n] <= scales["minmax"][n] * (1 + 1e-6) for n in scales["minmax"])
        assert any(scales[obs][n] < scales["minmax"][n] * 0.999 for n in scales["minmax"]), obs


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant", "hqq"])
def test_every_method_applies_the_activation_spec(method, tiny_llama, tokenizer, calib):
    from lowbit.nn.quant_linear import QuantLinear

    scheme = "W8A8"
    if method == "hqq":  # HQQ optimises a float zero-point: W8A8's inputs on asymmetric int8 weights
        scheme = QuantScheme(WeightScheme("int", 8, 32, False, "float"), preset("W8A8").activations)
    qm = quantize(_tiny(tiny_llama, tokenizer), scheme, method=method, calibration=calib, progress=False)
    mods = [qm.model.get_submodule(t.module_name) for t in qm.targets.values()]
    assert all(isinstance(m, QuantLinear) and m.input_quant["format"] == "int" and m.input_quant["dynamic"] for m in mods)
    assert qm.recipe["recipe"]["method"] == method
    assert qm.recipe["recipe"]["scheme"] == ("W8A8" if method != "hqq" else qm.recipe["recipe"]["scheme"])
    assert qm.scheme.activations == preset("W8A8").activations


def test_recipe_yaml_cli_and_api_give_the_same_plan_and_bytes(tiny_llama, tokenizer, calib, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
version: 1
method: gptq
options: {{damp: 0.02}}
calibration: {{text: {calib.text}, samples: 4, seqlen: 32, seed: 0}}
scheme: {{weights: {{format: int, bits: 4, group_size: 32}}}}
groups:
  - name: down in 8 bits, int8 inputs
    targets: ['mlp\\.down_proj']
    scheme: W8A8
""")
    assert main(["plan", str(tiny_llama), "--recipe", str(recipe), "--json"]) == 0
    cli_plan = json.loads(capsys.readouterr().out)
    api_plan = plan_model(str(tiny_llama), str(recipe), progress=False).to_dict()
    assert cli_plan == json.loads(json.dumps(api_plan))
    down = [t for t in cli_plan["tensors"] if "down_proj" in t["name"]]
    assert down and all(t["weights"] == "int8 per-channel sym" and t["activations"] == "int8 per-token dynamic"
                        and "recipe group" in t["reason"] for t in down)
    others = [t for t in cli_plan["tensors"] if "down_proj" not in t["name"]]
    assert all(t["weights"] == "int4 g32 sym" and t["activations"] is None for t in others)
    a, b = tmp_path / "cli", tmp_path / "api"
    assert main(["quantize", str(tiny_llama), "--recipe", str(recipe), "-o", str(a), "--json"]) == 0
    from lowbit.export.native import save

    save(quantize(str(tiny_llama), recipe=str(recipe), progress=False), b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ja, jb = (json.loads((p / "lowbit.json").read_text()) for p in (a, b))
    assert ja == jb and ja["recipe"]["recipe"] == recipe_from_dict(ja["recipe"]["recipe"]).to_dict()
    assert ja["recipe"]["recipe"]["groups"][0]["scheme"] == "W8A8"


@pytest.mark.parametrize("text,msg", [
    ("method: gptq\nscheme: [W4A16\n", "does not parse"),
    ("method: gptq\nschemes: W4A16\n", "unknown key 'schemes'"),
    ("scheme: W4A16\ngroups:\n  - {targets: ['nothing_like_this'], scheme: W8A16}\n", "matches no weight"),
    ("scheme: W4A16\ntargets: ['nope_nope']\n", "matches no weight"),
    ("scheme: {weights: {format: int, bits: 4, sizes: 3}}\n", "unknown key"),
    ("scheme: W4A16\nbudget: {target_bpw: 1.0, candidates: [int4_g32]}\n", "below the smallest"),
])
def test_bad_recipes_exit_2_with_one_line_and_nothing_written(text, msg, tiny_llama, calib, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text.replace("budget: {", f"calibration: {{text: {calib.text}, samples: 4, seqlen: 32}}\nbudget: {{"))
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_llama), "--recipe", str(recipe), "-o", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "lowbit: error" in line]
    assert len(err) == 1 and msg in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_recipe_and_scheme_flags_conflict(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: W8A16\n")
    assert main(["quantize", str(tiny_llama), "--recipe", str(recipe), "--bits", "3", "-o", str(tmp_path / "o")]) == 2
    assert "drop --bits" in capsys.readouterr().err


def test_target_bpw_budget_mixes_schemes_within_the_budget(tiny_llama, tokenizer, calib, tmp_path):
    recipe = make_recipe("W4A16", "rtn", calibration=calib,
                         budget=Budget(target_bpw=4.25, candidates=("int2_g32", "int3_g32", "int4_g32", "int8_ch"),
                                       fisher_windows=2))
    loaded = _tiny(tiny_llama, tokenizer)
    plan = build_plan(loaded, recipe, "native", progress=False)
    assert plan.bits_per_weight <= 4.25
    labels = {t.label for t in plan.tensors.values()}
    assert len(labels) > 1 and labels <= {"int2_g32", "int3_g32", "int4_g32", "int8_ch"}
    assert all(t.reason.startswith("budget") and t.cost is not None for t in plan.tensors.values())
    qm = quantize(loaded, plan=plan, progress=False)
    assert qm.bits_per_weight == pytest.approx(plan.bits_per_weight)  # the plan's sizes are the real ones
    assert {n: qt.format.code_bits for n, qt in qm.tensors.items()} == {
        n: t.weights.make_format().code_bits for n, t in plan.tensors.items()}
    # the predicted cost ranks: a larger budget never predicts more error
    bigger = build_plan(_tiny(tiny_llama, tokenizer), make_recipe("W4A16", "rtn", calibration=calib, budget=Budget(
        target_bpw=6.0, candidates=("int2_g32", "int3_g32", "int4_g32", "int8_ch"), fisher_windows=2)), progress=False)
    assert bigger.budget["predicted_kld_rtn"] <= plan.budget["predicted_kld_rtn"]


def test_budget_candidates_parse():
    assert parse_candidate("int4_g64")[1].group_size == 64 and parse_candidate("int4_g64")[1].symmetric
    assert not parse_candidate("int3_g32_asym")[1].symmetric
    assert parse_candidate("int8_ch")[1].group_size == -1
    assert parse_candidate("Q4_K")[1].format == "gguf_q4_k"
    assert parse_candidate("nf4_g64_dq")[1].double_quant
    with pytest.raises(Exception, match="cannot read the budget candidate"):
        parse_candidate("int9_g7")


def test_forward_loop_calibrates_like_windows(tiny_llama, tokenizer, calib):
    """modelopt's pattern: an in-memory model and the user's own loop give the same model as
    the same data passed as calibration windows."""
    from transformers import AutoModelForCausalLM

    windows = calib.windows(tokenizer)
    a = quantize(_tiny(tiny_llama, tokenizer), "W8A8_STATIC", method="gptq", calibration=calib, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()

    def forward_loop():
        with torch.no_grad():
            for i in range(0, len(windows), calib.batch_size):
                model(windows[i: i + calib.batch_size])

    b = quantize(model, "W8A8_STATIC", method="gptq", forward_loop=forward_loop, progress=False)
    assert b.model is model
    for n in a.tensors:
        assert torch.equal(a.tensors[n].codes, b.tensors[n].codes), n
        assert a.tensors[n].input_quant == b.tensors[n].input_quant
    assert torch.equal(_logits(a.model, windows[:1]), _logits(model, windows[:1]))


def test_gguf_exporter_imports_no_calibration_or_method():
    code = ("import sys, lowbit.export.gguf, lowbit.export.compressed_tensors, lowbit.export.native; "
            "bad = [m for m in sys.modules if m.startswith(('lowbit.calib', 'lowbit.methods', 'lowbit.plan'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gguf_mix_plan_matches_llama_cpp_rules(default_model):
    """The Q4_K_M plan as data: llama.cpp's more-bits layers get Q6_K on attn_v / ffn_down, and
    576-column rows fall back (recorded as the reason)."""
    from lowbit.plan.gguf_mixes import use_more_bits

    plan = build_plan(default_model, make_recipe(gguf_mix="Q4_K_M"), "gguf", progress=False)
    n = default_model.model.config.num_hidden_layers
    for i in range(n):
        v = plan.tensors[f"model.layers.{i}.self_attn.v_proj.weight"]
        assert "llama.cpp mix Q4_K_M" in v.reason
        if not use_more_bits(i, n):
            assert v.label in ("Q4_0", "Q4_1", "Q5_0") and "fallback" in v.reason
    assert plan.tensors["model.embed_tokens.weight"].label is not None   # llama.cpp quantizes token_embd
    with pytest.raises(Exception, match="--to gguf"):
        build_plan(default_model, make_recipe(gguf_mix="Q4_K_M"), "native", progress=False)


def test_budgeted_compressed_tensors_export_loads_in_transformers(tiny_llama, tokenizer, calib, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import export_compressed_tensors

    recipe = make_recipe("W4A16", "gptq", calibration=calib,
                         budget=Budget(target_bpw=6.5, candidates=("int4_g32", "int8_ch"), fisher_windows=2))
    qm = quantize(_tiny(tiny_llama, tokenizer), recipe=recipe, container="compressed-tensors", progress=False)
    assert {t.label for t in qm.plan.tensors.values()} == {"int4_g32", "int8_ch"}   # really mixed
    out = export_compressed_tensors(qm, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(cfg["config_groups"]) == 2
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calib.windows(tokenizer)[:1]
    assert torch.allclose(_logits(loaded, ids), _logits(qm.model, ids), atol=1e-4)
    assert (out / "model.safetensors").stat().st_size <= qm.plan.estimated_file_bytes * 1.02


def test_gguf_refuses_quantized_inputs_with_one_line(tiny_llama, calib, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    argv = ["quantize", str(tiny_llama), "--format", "gguf_q8_0", "--act", "int8", "--to", "gguf", "--type", "Q8_0",
            "-o", str(out)]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "lowbit: error" in line]
    assert len(err) == 1 and ("--act" in err[0] or "quantized inputs" in err[0]) and not out.exists()


def test_cli_max_size_native_fits_and_plan_predicts_it(tiny_llama, calib, tmp_path, capsys):
    common = [str(tiny_llama), "--method", "rtn", "--calib", calib.text, "--samples", "4", "--seqlen", "32",
              "--fisher-windows", "2", "--candidates", "int2_g32,int4_g32,int8_ch"]
    assert main(["plan", *common, "--target-bpw", "8.1", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["estimated_file_bytes"]
    max_size = int(full * 0.8)
    assert main(["plan", *common, "--max-size", str(max_size), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["estimated_file_bytes"] <= max_size and plan["budget"]["max_bytes"] == max_size
    out = tmp_path / "fit"
    assert main(["quantize", *common, "--max-size", str(max_size), "-o", str(out), "--json"]) == 0
    size = (out / "model.safetensors").stat().st_size
    assert size <= max_size and 0 <= plan["estimated_file_bytes"] - size < 0.05 * size   # conservative, close
    recorded = json.loads((out / "lowbit.json").read_text())["recipe"]
    assert recorded["budget"]["choices"] == {t["name"]: t["type"] for t in plan["tensors"]}


@pytest.mark.parametrize("argv,msg", [
    (["--scheme", "MXFP8", "--to", "compressed-tensors"], "compressed-tensors cannot store"),
    (["--scheme", "W8A8", "--to", "gptq"], "holds weights only"),
    (["--scheme", "W8A8", "--act", "fp8"], "already fixes the activations"),
    (["--target-bpw", "4", "--max-size", "1MB"], "not both"),
    (["--candidates", "int4_g32"], "add --target-bpw"),
])
def test_plans_an_output_cannot_hold_are_refused_before_quantizing(argv, msg, tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama), *argv, "-o", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "lowbit: error" in line]
    assert len(err) == 1 and msg in err[0], err
    assert not out.exists()
