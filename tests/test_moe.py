"""Routed experts (transformers 5's stacked 3-D weights) calibrated from the tokens routed to them
(calib.moe): checked against an independent capture of the router's choices and per-expert GPTQ,
on tiny Mixtral and Qwen2-MoE models."""

import pytest
import torch

from lowbit.calib import CalibrationConfig


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    return MixtralForCausalLM(cfg).eval()


def _qwen_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
                         shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
                         decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen2MoeForCausalLM(cfg).eval()


@pytest.fixture
def cal(calib):
    return CalibrationConfig(samples=4, seqlen=32, text=calib.text, expert_min_tokens=16)


def test_each_expert_gets_the_hessian_of_its_own_tokens(tokenizer, cal):
    """Only layer 0's experts quantized, so their inputs are full precision: an independent
    forward with a hook on the experts module gives the same token counts, and GPTQ of each
    expert on the Hessian of its captured tokens gives lowbit's codes exactly."""
    from lowbit.api import quantize
    from lowbit.calib.runner import LowerGram
    from lowbit.methods.gptq import GPTQOptions, _solve
    from lowbit.scheme import WeightScheme

    model = _mixtral()
    experts = model.model.layers[0].mlp.experts
    ref_weights = {n: p.detach().clone() for n, p in experts.named_parameters()}
    captured = []
    hook = experts.register_forward_pre_hook(lambda m, args: captured.append((args[0].detach().clone(), args[1].clone())))
    windows = cal.windows(tokenizer)
    with torch.no_grad():
        for i in range(0, windows.shape[0], cal.batch_size):
            model(windows[i: i + cal.batch_size], use_cache=False)
    hook.remove()

    ws = WeightScheme(bits=3, group_size=32, symmetric=False)
    qm = quantize(model, ws, method="gptq", calibration=cal, tokenizer=tokenizer, progress=False,
                  include=[r"layers\.0\.mlp\.experts\."])
    report = qm.recipe["experts"]["model.layers.0.mlp.experts.gate_up_proj"]
    counts = [int(sum((idx == e).any(-1).sum() for _, idx in captured)) for e in range(4)]
    assert report["tokens"] == counts and sum(counts) == windows.numel() * 2 and report["all_tokens"] == []
    assert qm.recipe["rtn_fallback"] == []

    gate_up = qm.tensors["model.layers.0.mlp.experts.gate_up_proj"]
    decoded_gate_up = gate_up.dequantize()
    fmt = ws.make_format()
    for name, qt in (("gate_up_proj", gate_up), ("down_proj", qm.tensors["model.layers.0.mlp.experts.down_proj"])):
        rows = qt.codes.shape[0] // 4
        for e in range(4):
            X = torch.cat([h[(idx == e).any(-1)] for h, idx in captured])
            if name == "down_proj":   # its input comes through the quantized gate/up projection
                X = experts._apply_gate(X @ decoded_gate_up[e].T)
            G = LowerGram(X.shape[1])
            G.add(X)
            codes, _, _ = _solve(ref_weights[name][e], G.finish(), fmt, ws, GPTQOptions())
            assert torch.equal(codes, qt.codes[e * rows: (e + 1) * rows]), (name, e)


def test_rarely_routed_experts_fall_back_to_every_token(tokenizer, cal):
    import dataclasses

    from lowbit.api import quantize
    from lowbit.scheme import WeightScheme

    qm = quantize(_mixtral(), WeightScheme(bits=4, group_size=32), method="gptq", tokenizer=tokenizer, progress=False,
                  calibration=dataclasses.replace(cal, expert_min_tokens=70))
    for name, rep in qm.recipe["experts"].items():
        assert rep["all_tokens"] == [e for e, n in enumerate(rep["tokens"]) if n < 70], name
        assert sum(rep["tokens"]) == 4 * 32 * 2
    assert any(rep["all_tokens"] for rep in qm.recipe["experts"].values())


def _kld(ref, model, windows):
    with torch.no_grad():
        p = torch.log_softmax(ref(windows).logits.float(), -1)
        q = torch.log_softmax(model(windows).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("make", [_mixtral, _qwen_moe])
def test_calibrated_experts_beat_round_to_nearest(tokenizer, cal, make):
    """Every routed expert (and Qwen-MoE's shared expert) quantized by GPTQ at 3 bits: lower KL
    divergence from the source than RTN on held-out windows, and each expert's tokens recorded."""
    import copy

    from lowbit.api import quantize
    from lowbit.scheme import WeightScheme

    ws = WeightScheme(bits=3, group_size=32, symmetric=False)
    ref = make()
    held_out = CalibrationConfig(samples=4, seqlen=32, text=cal.text, seed=7).windows(tokenizer)
    gptq = quantize(copy.deepcopy(ref), ws, method="gptq", calibration=cal, tokenizer=tokenizer, progress=False)
    rtn = quantize(copy.deepcopy(ref), ws, method="rtn", tokenizer=tokenizer, progress=False)
    experts = [n for n in gptq.tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4 and not set(experts) & set(gptq.recipe["rtn_fallback"])
    assert set(gptq.recipe["experts"]) == set(experts)
    assert _kld(ref, gptq.model, held_out) < _kld(ref, rtn.model, held_out)
