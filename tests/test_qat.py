"""Fake quantization (STE, LSQ) against the formats' own encode/decode and hand-derived
gradients; prepare/convert on Linear, Conv1D and 3-D experts; QAT end to end with a resume
that gives the same bytes; the `lowbit qat` command's one-line errors."""

import json

import pytest
import torch

from lowbit import WeightScheme, quantize_tensor
from lowbit.cli import main
from lowbit.tensor import expand_groups
from lowbit.train.fake_quant import WeightFakeQuant, grad_scale, representable_range, straight_through

SCHEMES = [WeightScheme("int", 4, 32, True), WeightScheme("int", 3, 32, False),
           WeightScheme("int", 3, 48, False, zero_point="float"), WeightScheme("int", 8, -1, True),
           WeightScheme("int", 2, 64, False), WeightScheme("fp8_e4m3", None, -1), WeightScheme("fp8_e5m2", None, 32),
           WeightScheme("fp4", None, 32), WeightScheme("nf4", None, 64), WeightScheme("nf4", None, 64, double_quant=True),
           WeightScheme("mxfp4", None, 32), WeightScheme("mxfp8", None, 32), WeightScheme("nvfp4", None, 16),
           WeightScheme("ternary", None, -1), WeightScheme("gguf_q4_0", None, 32), WeightScheme("gguf_q4_k", None, 256),
           WeightScheme("gguf_q6_k", None, 256), WeightScheme("gguf_q3_k", None, 256)]


def _weight(shape=(24, 256), seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    return w.T.contiguous() if transposed else w


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("mode", ["dynamic", "fixed", "auto"])
def test_forward_is_the_formats_decode_of_encode_bit_for_bit(scheme, mode):
    w = _weight()
    rtn = quantize_tensor(w, scheme)
    fq = WeightFakeQuant(scheme, tuple(w.shape), False, mode, None if mode == "dynamic" else rtn.params)
    out = fq(w)
    # the format's decode(encode(w)) with the parameters as stored: RTN's result, except NF4 with double
    # quantization, whose RTN encodes with the absmax before its 8-bit storage
    p = rtn.float_params() if not scheme.double_quant else fq.fmt.load_params(fq.fit(w))
    P = expand_groups(p, 256, fq.group_size)
    assert torch.equal(out, fq.fmt.decode(fq.fmt.encode(w, P), P))
    if not scheme.double_quant:
        assert torch.equal(out, rtn.dequantize())
    # after training moves the weights (and learned scales), convert's codes decode to the forward
    with torch.no_grad():
        w2 = w + 0.01 * _weight(seed=1)
        if fq.mode == "lsq":
            fq.scale.mul_(1.07)
    qt = fq.quantized(w2)
    assert torch.equal(qt.dequantize(), fq(w2))
    assert qt.params.keys() == rtn.params.keys() and all(qt.params[k].dtype == rtn.params[k].dtype for k in qt.params)


def test_transposed_and_stacked_layouts():
    scheme = WeightScheme("int", 4, 32, False)
    wt = _weight((40, 64), transposed=True)        # Conv1D (in, out)
    fq = WeightFakeQuant(scheme, tuple(wt.shape), True, "dynamic")
    assert torch.equal(fq(wt), quantize_tensor(wt, scheme, transposed=True).dequantize())
    experts = torch.randn(3, 16, 64) * 0.02        # (experts, out, in)
    fq = WeightFakeQuant(scheme, tuple(experts.shape), False, "auto", quantize_tensor(experts, scheme).params)
    assert torch.equal(fq(experts), quantize_tensor(experts, scheme).dequantize())


def test_ste_passes_the_gradient_and_clips_outside_the_grid():
    scheme = WeightScheme("int", 3, 32, True)
    w = _weight((8, 64)).requires_grad_(True)
    G = torch.randn(8, 64)
    fq = WeightFakeQuant(scheme, (8, 64), False, "dynamic")
    (fq(w) * G).sum().backward()
    assert torch.equal(w.grad, G)
    # fixed parameters from a smaller weight: the larger weight's extremes fall outside the grid
    stored = quantize_tensor(w.detach() * 0.5, scheme).params
    fq = WeightFakeQuant(scheme, (8, 64), False, "fixed", stored, clip_ste=True)
    p = fq.fmt.load_params(stored)
    w.grad = None
    (fq(w) * G).sum().backward()
    lo, hi = representable_range(fq.fmt, p, 64, 32)
    inside = (w.detach() >= lo) & (w.detach() <= hi)
    assert 0 < int((~inside).sum()) < w.numel()
    assert torch.equal(w.grad, G * inside)
    # the range is the grid's: symmetric 3-bit codes decode to -4s..3s
    S = expand_groups(p, 64, 32)["scale"]
    assert torch.equal(lo, -4 * S) and torch.equal(hi, 3 * S)


@pytest.mark.parametrize("kind", ["sym", "int-zero", "float-min"])
def test_lsq_gradients_equal_the_hand_derived_ones(kind):
    scheme = {"sym": WeightScheme("int", 3, 16, True), "int-zero": WeightScheme("int", 3, 16, False),
              "float-min": WeightScheme("int", 3, 16, False, zero_point="float")}[kind]
    w = _weight((4, 32), seed=2).requires_grad_(True)
    p0 = quantize_tensor(w.detach() * 0.8, scheme).params  # some weights beyond the grid
    fq = WeightFakeQuant(scheme, (4, 32), False, "lsq", p0)
    G = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    (fq(w) * G).sum().backward()
    fmt, s = fq.fmt, expand_groups({"scale": fq.scale.detach()}, 32, 16)["scale"]
    W = w.detach()
    if kind == "sym":
        u, offset = W / s + fmt.signed_offset, fmt.signed_offset
    elif kind == "int-zero":
        z = expand_groups({"zero": fq.zero}, 32, 16)["zero"]
        u, offset = W / s + z, z
    else:
        m = expand_groups({"min": fq.min.detach()}, 32, 16)["min"]
        u, offset = (W - m) / s, 0
    q = u.round().clamp(0, fmt.qmax)
    inside = ((u >= 0) & (u <= fmt.qmax)).float()
    q_p = fmt.signed_offset - 1 if kind == "sym" else fmt.qmax
    g = 1 / (16 * q_p) ** 0.5
    # LSQ: d w_hat / d s = (q - offset) - u_centered * inside  (round(w/s) - w/s inside, the clamp level outside)
    dws = (q - offset) - (u - offset) * inside
    expect_s = g * (G * dws).reshape(4, 2, 16).sum(-1)
    assert torch.allclose(fq.scale.grad, expect_s, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w.grad, G * inside, rtol=1e-6, atol=0)  # s * (1/s) is 1 up to rounding
    if kind == "float-min":  # LSQ+: d w_hat / d min = 1 - inside
        expect_m = g * (G * (1 - inside)).reshape(4, 2, 16).sum(-1)
        assert torch.allclose(fq.min.grad, expect_m, rtol=1e-5, atol=1e-7)


def test_autograd_helpers():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))
    x.grad = None
    v = straight_through(x, x.detach().round(), (x.detach() > 0))
    assert torch.equal(v, x.detach().round())
    v.sum().backward()
    assert torch.equal(x.grad, (x.detach() > 0).double())
    # the decode part of LSQ is a smooth function of the parameters: gradcheck it with codes held fixed
    from lowbit.formats import make_format

    fmt = make_format("int", bits=4, symmetric=False, zero_point="float")
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    s = torch.rand(3, 1, dtype=torch.float64) + 0.5
    m = torch.randn(3, 1, dtype=torch.float64)
    torch.autograd.gradcheck(lambda s, m: fmt.decode(codes, {"scale": s.expand(3, 8), "min": m.expand(3, 8)}).double(),
                             (s.requires_grad_(), m.requires_grad_()))


def _tiny_loaded(tiny_llama):
    from lowbit.model.load import load_source

    return load_source(str(tiny_llama))


def _plan(loaded, scheme, method="rtn", calib=None):
    from lowbit.api import make_recipe
    from lowbit.plan import build_plan

    return build_plan(loaded, make_recipe(scheme, method, calibration=calib), "native", progress=False)


def test_prepare_starts_at_the_ptq_model_and_convert_ships_what_trained(tiny_llama):
    from lowbit.api import execute
    from lowbit.train import convert, prepare

    ids = torch.tensor([[3, 14, 15, 9, 26, 53, 5, 8, 9, 7, 9, 3]])
    loaded = _tiny_loaded(tiny_llama)
    plan = _plan(loaded, "W8A8")
    import copy

    student = copy.deepcopy(loaded.model)
    ptq = execute(loaded, plan, progress=False)
    hooks = prepare(student, plan, ptq.tensors)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, ptq.model(ids).logits)  # inputs fake-quantized too (W8A8)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".parametrizations.weight." in n for n in trainable)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = student(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = student(ids).logits
    assert not torch.equal(trained, ptq.model(ids).logits)
    qm = convert(student, plan, loaded.tokenizer, loaded.source, hooks)
    with torch.no_grad():
        assert torch.equal(qm.model(ids).logits, trained)
    assert all(t.input_quant is not None for t in qm.tensors.values())
    assert not any("parametrizations" in n for n, _ in qm.model.named_parameters())


def test_prepare_handles_conv1d_and_experts():
    from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

    from lowbit.model.load import LoadedModel
    from lowbit.train import convert, prepare

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 12))
    for model in (GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=64)),
                  MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))):
        model.eval()
        loaded = LoadedModel(model, None, "tiny", "hf")
        plan = _plan(loaded, WeightScheme("int", 4, 32, False))
        prepare(model, plan)
        with torch.no_grad():
            fake = model(ids).logits
        model(ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        qm = convert(model, plan, None, "tiny")
        with torch.no_grad():
            assert torch.equal(qm.model(ids).logits, fake)
        assert {t.kind for t in qm.targets.values()} >= ({"conv1d"} if "GPT2" in type(model).__name__ else {"experts"})


def _qat_args(tiny_llama, data, out, *extra, **override):
    flags = {"--format": "int", "--bits": "3", "--group-size": "32", "--data": str(data), "--ctx": "32", "--steps": "4",
             "--checkpoint-every": "2", "--lr": "1e-3",
             **{"--data" if k == "train_file" else f"--{k.replace('_', '-')}": v for k, v in override.items()}}
    args = ["qat", str(tiny_llama), "--asym", "-o", str(out)]
    for k, v in flags.items():
        args += [] if v is None else [k, v]
    return args + list(extra)


@pytest.fixture
def train_text(tmp_path):
    import random

    r = random.Random(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]
    path = tmp_path / "train.txt"
    path.write_text(" ".join(r.choice(words) for _ in range(600)))
    return path


def test_qat_cli_end_to_end_and_resume_gives_the_same_bytes(tiny_llama, tmp_path, train_text, capsys, monkeypatch):
    import lowbit.train.qat as qat_module

    full = tmp_path / "full"
    assert main(_qat_args(tiny_llama, train_text, full, "--distill", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["losses"]) == 4 and out["resumed_from"] == 0
    recipe = json.loads((full / "lowbit.json").read_text())
    assert recipe["method"] == "qat" and recipe["recipe"]["qat"]["distill"] is True
    assert not qat_module.checkpoint_dir(full).exists()      # removed once the output is written
    # a run killed after step 3 (checkpoint at step 2), then resumed
    killed = tmp_path / "killed"
    real_step = qat_module.torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(qat_module.torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        main(_qat_args(tiny_llama, train_text, killed, "--distill"))
    monkeypatch.setattr(qat_module.torch.optim.AdamW, "step", real_step)
    assert qat_module.checkpoint_dir(killed).exists() and not killed.exists()
    # a resume with other settings is refused
    assert main(_qat_args(tiny_llama, train_text, killed, "--resume")) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "qat" in err
    assert main(_qat_args(tiny_llama, train_text, killed, "--distill", "--resume", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 2
    for name in ("model.safetensors", "lowbit.json"):
        assert (full / name).read_bytes() == (killed / name).read_bytes()
    # eval reads the output
    assert main(["eval", str(full), "--data", str(train_text), "--ctx", "32", "--windows", "2", "--json"]) == 0


@pytest.mark.parametrize("extra,override,msg", [
    ([], {"steps": "0"}, "--steps must be a positive"),
    ([], {"train_file": "/nonexistent.txt"}, "does not exist"),
    ([], {"ctx": "100000"}, "fewer than one window"),
    ([], {"lr": "1e12"}, "the loss became"),
    (["--resume"], {}, "no checkpoint"),
    ([], {"to": "gguf"}, "lowbit export"),
    ([], {"scales": "lsq", "format": "nf4", "bits": None, "group_size": "64"}, "integer format"),
    (["--clip-ste"], {}, "--clip-ste applies to fixed or dynamic"),
])
def test_qat_bad_input_is_one_clear_line(tiny_llama, tmp_path, train_text, capsys, extra, override, msg):
    out = tmp_path / "out"
    assert main(_qat_args(tiny_llama, train_text, out, *extra, **override)) == 2
    err = capsys.readouterr().err.strip().splitlines()  # after progress bars: one error line
    assert err[-1].startswith("lowbit: error:") and msg in err[-1] and sum("error" in e for e in err) == 1, err
    assert not out.exists()


def test_qlora_adapters_load_in_peft_onto_the_base_with_the_same_logits(tiny_llama, tmp_path, train_text, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lowbit.export.native import load as load_native
    from lowbit.train import qlora

    out = tmp_path / "adapter"
    assert main(["qlora", str(tiny_llama), "--data", str(train_text), "--ctx", "32", "--steps", "6", "--lr", "5e-3",
                 "--rank", "4", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loss_last"] < summary["loss_first"] and summary["adapted_modules"] == 14
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    base = load_native(out / "base", runtime="decoded")
    assert {qt.format.name for qt in base.tensors.values()} == {"nf4"}
    assert all(qt.format.double_quant for qt in base.tensors.values())
    # PEFT on a plain transformers model holding the base's decoded weights
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        for name, qt in base.tensors.items():
            dict(plain.named_parameters())[name].copy_(qt.dequantize())
    ids = torch.tensor([[3, 14, 15, 9, 26, 53, 5, 8, 9, 7, 9, 3]])
    with torch.no_grad():
        unadapted = plain(ids).logits
    peft_model = peft.PeftModel.from_pretrained(plain, str(out)).eval()  # injects the adapters into `plain`
    ours = qlora.load(out)
    with torch.no_grad():
        a, b = peft_model(ids).logits, ours(ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - unadapted).abs().max() > 1e-3   # the adapters change the model

    # merged: the same weights as PEFT's merge_and_unload, then quantized through the plan
    merged = qlora.merge(out)
    peft_merged = peft_model.merge_and_unload()
    for name, p in peft_merged.named_parameters():
        assert torch.allclose(dict(merged.model.named_parameters())[name], p, atol=1e-6), name
    with torch.no_grad():
        assert (merged.model(ids).logits - a).abs().max() < 1e-4
    w8 = tmp_path / "merged-w8"
    assert main(["qlora-merge", str(out), "--bits", "8", "--group-size", "-1", "-o", str(w8), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scheme"].startswith("int8")
    with torch.no_grad():
        requant = load_native(w8, runtime="decoded").model(ids).logits
    assert (requant - a).abs().max() < 0.05 * a.abs().max()
    assert main(["qlora-merge", str(tmp_path), "-o", str(tmp_path / "x")]) == 2   # not a QLoRA output


def test_qlora_backward_decodes_instead_of_keeping_the_base():
    from lowbit import WeightScheme, quantize_tensor
    from lowbit.runtime.packed import PackedLinear
    from lowbit.train.qlora import LoRALinear

    w = torch.randn(40, 64) * 0.05
    qt = quantize_tensor(w, WeightScheme("nf4", None, 64, double_quant=True))
    layer = LoRALinear(PackedLinear(qt, None, torch.float32), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (40, 64) not in saved and (64, 40) not in saved   # autograd keeps no dense base weight
    y.square().sum().backward()
    dense = qt.dequantize_matrix()
    x2 = x.detach().clone().requires_grad_(True)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    (x2 @ dense.T + (x2 @ A.T) @ B.T * 2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


@pytest.mark.parametrize("arch,scheme,method", [("llama", WeightScheme("int", 4, 32, False), "awq"),
                                                ("opt", "W8A8_STATIC", "smoothquant")])
def test_qat_starts_exactly_at_a_ptq_model_that_folds_scales(arch, scheme, method, tokenizer, calib):
    """AWQ / SmoothQuant change norms and biases outside the quantized weights: the student takes them."""
    from lowbit.api import execute, make_recipe
    from lowbit.model.load import LoadedModel
    from lowbit.plan import build_plan
    from lowbit.train import prepare
    from lowbit.train.qat import ptq_start
    from tests.test_awq_smoothquant import build

    ids = calib.windows(tokenizer)[:2]
    loaded = LoadedModel(build(arch), tokenizer, "x", "hf")
    plan = build_plan(loaded, make_recipe(scheme, method, calibration=calib), "native", progress=False)
    reference = execute(LoadedModel(build(arch), tokenizer, "x", "hf"), plan, progress=False)
    init, record = ptq_start(loaded, plan, progress=False)
    prepare(loaded.model, plan, init)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference.model(ids).logits)
    assert record["calibration"]["samples"] == calib.samples


def test_resume_is_bit_identical_with_dropout_and_static_inputs(tokenizer, calib, train_text, tmp_path):
    """GPT-style dropout (masks seeded by the step) and static input scales (kept in the checkpoint)."""
    from lowbit.api import make_recipe
    from lowbit.model.load import LoadedModel
    from lowbit.plan import build_plan
    from lowbit.train import QATConfig, run_qat
    from tests.test_awq_smoothquant import build

    text = train_text.read_text()
    cfg = QATConfig(4, lr=1e-3, ctx=32, checkpoint_every=2, distill=True)

    def run(out, on_step=None, resume=False):
        model = build("opt")
        assert model.config.dropout > 0
        loaded = LoadedModel(model, tokenizer, "x", "hf")
        plan = build_plan(loaded, make_recipe("W8A8_STATIC", "smoothquant", calibration=calib), "native", progress=False)
        return run_qat(loaded, plan, text, "t", cfg, out, resume=resume, progress=False, on_step=on_step)

    full = run(tmp_path / "a")

    def die(step, _loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", die)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.resumed_from == 2 and resumed.losses == full.losses
    for name, qt in full.qm.tensors.items():
        other = resumed.qm.tensors[name]
        assert torch.equal(qt.codes, other.codes) and qt.input_quant == other.input_quant
        assert all(torch.equal(qt.params[k], other.params[k]) for k in qt.params)
    a, b = full.qm.model.state_dict(), resumed.qm.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
