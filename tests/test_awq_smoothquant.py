"""AWQ and SmoothQuant on tiny random LLaMA / Qwen2 / Mistral / GPT-2 / OPT models: scale folding
is exact, AWQ beats RTN where activations have outlier channels, W8A8 runs its activation
quantization and survives save/load."""


import pytest
import torch

from lowbit.api import quantize
from lowbit.calib.runner import InputStats, StatsRequest
from lowbit.export.native import load, save
from lowbit.methods.awq import candidate_scale, clip_search
from lowbit.methods.smoothing import scaled_stats
from lowbit.model.arch import decoder_layer_of, fold_scales, smoothing_groups, weight_matrix
from lowbit.model.load import LoadedModel
from lowbit.model.targets import select_targets
from lowbit.nn import QuantLinear
from lowbit.nn.act_quant import fake_quantize_input, input_quant_spec
from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme
from lowbit.tensor import quantize_tensor

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt"]
# smoothing groups per decoder layer: GQA (qwen2, mistral) has no v_proj -> o_proj group
N_GROUPS = {"llama": 4, "qwen2": 3, "mistral": 3, "gpt2": 2, "opt": 4}
W3 = WeightScheme("int", 3, 32, False)
W8 = WeightScheme("int", 8, -1, True)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model (vocab 96 as the test tokenizer) with non-trivial norm weights."""
    import transformers as tf

    torch.manual_seed(seed)
    V = 96
    llama_like = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like, num_key_value_heads=4))
    elif arch == "qwen2":  # q/k/v with bias, grouped-query attention
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like, num_key_value_heads=2))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**llama_like, num_key_value_heads=2))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                 bos_token_id=0, eos_token_id=0))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                               num_attention_heads=4, word_embed_proj_dim=64,
                                               max_position_embeddings=128))
    else:
        raise ValueError(arch)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _run(arch, tokenizer, calib, scheme, method, model=None, **options):
    model = build(arch) if model is None else model
    return quantize(LoadedModel(model, tokenizer, "x", "hf"), scheme, method=method, calibration=calib,
                    options=options, progress=False)


def _layers(model):
    seen = {}
    for t in select_targets(model):
        name, layer = decoder_layer_of(model, t.module_name)
        seen.setdefault(name, layer)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_scales_keeps_the_function(arch):
    model = build(arch)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    g = torch.Generator().manual_seed(1)
    layers = _layers(model)
    assert len(layers) == 2
    for name, layer in layers.items():
        groups = smoothing_groups(layer, name)
        assert len(groups) == N_GROUPS[arch]
        for group in groups:
            linears = [model.get_submodule(n) for n in group.linears]
            s = torch.rand(weight_matrix(linears[0]).shape[1], generator=g) * 3 + 0.3
            fold_scales(group.prev, linears, s)
            assert torch.allclose(_logits(model, ids), ref, atol=1e-5, rtol=1e-5), group.prev_name


def test_post_norm_opt_and_non_homogeneous_activations_are_not_smoothed():
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                           num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64,
                                           do_layer_norm_before=False, activation_function="gelu"))
    layer = model.model.decoder.layers[0]
    prevs = [g.prev_name for g in smoothing_groups(layer, "model.decoder.layers.0")]
    assert prevs == ["model.decoder.layers.0.self_attn.v_proj"]


def test_scaled_stats_are_the_stats_of_the_scaled_input():
    X = torch.randn(50, 16) * torch.linspace(0.1, 5, 16)
    s = torch.rand(16) + 0.5
    a, b = InputStats(), InputStats()
    req = StatsRequest(hessian=True, sample_rows=20)
    a.add(X, req)
    b.add(X / s, req)
    b.finish()
    c = scaled_stats(a, s)
    for k in ("hessian", "absmax", "abssum", "sample"):
        assert torch.allclose(getattr(c, k), getattr(b, k), rtol=1e-5, atol=1e-6), k


def test_awq_scale_is_normalised():
    s = candidate_scale(torch.tensor([0.01, 1.0, 100.0]), 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(candidate_scale(torch.rand(8), 0.0), torch.ones(8))


def test_clip_search_never_raises_the_output_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    W = torch.randn(16, 64, generator=g)
    W[0, 3] = 8.0  # one outlier weight: its group gains from a smaller range
    H = X.T @ X
    err = lambda V: float(((X @ (W - quantize_tensor(V, W3).dequantize_matrix()).T) ** 2).sum())
    assert err(clip_search(W, H, W3)) < err(W)


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_end_to_end(arch, tokenizer, calib):
    ids = calib.windows(tokenizer)
    ref = _logits(build(arch), ids)
    err_rtn = (_logits(_run(arch, tokenizer, calib, W3, "rtn").model, ids) - ref).pow(2).mean()
    qm = _run(arch, tokenizer, calib, W3, "awq")
    assert qm.recipe["rtn_fallback"] == []
    assert qm.recipe["options"] == {"grid": 20, "clip": True, "rounding": "rtn", "refit": 0}
    err_awq = (_logits(qm.model, ids) - ref).pow(2).mean()
    assert err_awq < err_rtn


def test_awq_without_search_is_rtn(tokenizer, calib):
    rtn = _run("llama", tokenizer, calib, W3, "rtn")
    awq = _run("llama", tokenizer, calib, W3, "awq", grid=1, clip=False)
    for name, qt in rtn.tensors.items():
        assert torch.equal(awq.tensors[name].codes, qt.codes), name


def _with_outlier_channel(model, channel=5, factor=20.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[channel] *= factor
    return model


def test_awq_beats_rtn_with_activation_outliers(tokenizer, calib):
    # random tiny models are noisy (on one seed of four, RTN's errors happen to cancel): sum
    # the logit errors over three seeds
    ids = calib.windows(tokenizer)
    err = {"rtn": 0.0, "awq": 0.0, "awq-gptq": 0.0}
    for seed in range(3):
        ref = _logits(_with_outlier_channel(build("llama", seed)), ids)
        for key, method, opts in (("rtn", "rtn", {}), ("awq", "awq", {}), ("awq-gptq", "awq", {"rounding": "gptq"})):
            if key == "awq-gptq" and seed > 0:
                continue
            qm = _run("llama", tokenizer, calib, W3, method, model=_with_outlier_channel(build("llama", seed)), **opts)
            e = float((_logits(qm.model, ids) - ref).pow(2).mean())
            err[key] += e
            if seed == 0 and key == "rtn":
                rtn0 = e
    assert err["awq"] < 0.6 * err["rtn"], err
    assert err["awq-gptq"] < 0.5 * rtn0, err


def test_awq_with_gptq_rounding_refits_scales_and_refuses_refit_without_it(tokenizer, calib, monkeypatch):
    from lowbit.errors import SchemeError
    from lowbit.methods import gptq

    with pytest.raises(SchemeError, match="add --opt rounding=gptq"):
        _run("llama", tokenizer, calib, W3, "awq", refit=2)
    seen = []
    real = gptq.quantize_weights_sharing_input
    monkeypatch.setattr(gptq, "quantize_weights_sharing_input",
                        lambda mats, H, ws, options, *a, **k: seen.append(options.refit) or real(mats, H, ws, options, *a, **k))
    sym = WeightScheme("int", 4, 32, True)
    qm = _run("llama", tokenizer, calib, sym, "awq", rounding="gptq", refit=2)
    assert qm.recipe["options"]["refit"] == 2 and seen and set(seen) == {2}


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothquant_w8a8_end_to_end(arch, tokenizer, calib, tmp_path):
    ids = calib.windows(tokenizer)[:2]
    ref = _logits(build(arch), ids)
    # no activation spec: smoothquant's default (W8A8's int8 per token); static int8; FP8 per token
    for act in (None, ActivationScheme("int", 8, "tensor", False), ActivationScheme("fp8_e4m3", 8, "token", True)):
        qm = _run(arch, tokenizer, calib, QuantScheme(W8, act), "smoothquant")
        out = _logits(qm.model, ids)
        assert (out - ref).abs().max() < 0.05 * ref.abs().max(), act
        linears = [qm.model.get_submodule(t.module_name) for t in qm.targets.values()]
        assert all(isinstance(m, QuantLinear) and m.input_quant is not None for m in linears)
        spec = linears[0].input_quant
        static = act is not None and not act.dynamic
        assert spec["dynamic"] != static
        assert spec["format"] == (act.format if act is not None else "int")
        assert (spec["scale"] is not None) == static
        # the activation quantization runs: switching it off changes the output
        for m in linears:
            m.input_quant = None
        assert not torch.equal(_logits(qm.model, ids), out)
        for m, t in zip(linears, qm.targets.values()):
            m.input_quant = qm.tensors[t.name].input_quant
        assert torch.equal(_logits(qm.model, ids), out)
        back = load(save(qm, tmp_path / f"{arch}-{None if act is None else act.label()}"))
        assert torch.equal(_logits(back.model, ids), out)
        assert all(back.tensors[n].input_quant == qt.input_quant for n, qt in qm.tensors.items())


def test_smoothing_helps_w8a8_with_activation_outliers(tokenizer, calib):
    ids = calib.windows(tokenizer)
    ref = _logits(_with_outlier_channel(build("llama"), factor=50.0), ids)
    err = {}
    for alpha, grid in ((0.0, 0), (0.5, 0), ("searched", 10)):
        opts = {"alpha_grid": grid} if grid else {"alpha": alpha, "alpha_grid": 0}
        qm = _run("llama", tokenizer, calib, QuantScheme(W8, ActivationScheme("int", 8, "tensor", False)), "smoothquant",
                  model=_with_outlier_channel(build("llama"), factor=50.0), **opts)
        err[alpha] = float((_logits(qm.model, ids) - ref).pow(2).mean())
    assert err[0.5] < 0.5 * err[0.0], err
    assert err["searched"] < 0.5 * err[0.0], err   # the search measures what fixed α = 0.5 guesses


def test_alpha_search_never_loses_to_the_grid_points_on_its_rows():
    from lowbit.methods.smoothquant import search_alpha, smoothing_scale

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    X[:, 3] *= 40.0   # an outlier channel
    W = [torch.randn(32, 64, generator=g) * 0.05, torch.randn(48, 64, generator=g) * 0.05]
    act = ActivationScheme("int", 8, "token", True)
    alpha, errors = search_alpha(X, X.abs().amax(0), W, [W8, W8], act, 10)
    assert len(errors) == 11 and errors[round(alpha * 10)] == min(errors)
    assert 0.0 < alpha and errors[round(alpha * 10)] < errors[0]   # smoothing beats none on outliers
    s = smoothing_scale(X.abs().amax(0), W, alpha)
    assert s[3] == s.max()   # the outlier channel is the one scaled down


def test_activation_fake_quant_matches_references():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-2, 1, 64)
    spec = input_quant_spec(ActivationScheme("int", 8, "token", True))
    q = fake_quantize_input(x, spec)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-3)  # on the per-token grid
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()
    static = input_quant_spec(ActivationScheme("int", 8, "tensor", False), absmax=2.0)
    assert static["scale"] == 2.0 / 127
    assert fake_quantize_input(torch.tensor([5.0, -5.0, 1.0]), static)[:2].tolist() == [2.0, -2.0]
    fp8 = fake_quantize_input(x, input_quant_spec(ActivationScheme("fp8_e4m3", 8, "token", True)))
    s8 = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(fp8, (x / s8).to(torch.float8_e4m3fn).float() * s8)
