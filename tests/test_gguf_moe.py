"""MoE models to GGUF: transformers 5's stacked experts (E, out, in) become llama.cpp's
ffn_{gate,up,down}_exps (gate_up split in two), the router and a shared expert's gate keep their
roles, the expert hyper-parameters are written, and llama.cpp gives the model's logits."""

import gguf
import numpy as np
import pytest
import torch

import lowbit
import lowbit.api
from lowbit.errors import SchemeError
from lowbit.export.gguf import _split_gate_up, write_gguf
from lowbit.model.load import LoadedModel
from lowbit.plan.gguf_mixes import tensor_type_for
from lowbit.tensor import quantize_tensor

from tests.test_gguf_export import PROMPT, _llama_logits, _model_logits, assert_llama_agrees


def _tiny_moe(kind: str, tokenizer, **over):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  tie_word_embeddings=False, rms_norm_eps=1e-5)
    if kind == "mixtral":
        config, cls = MixtralConfig(num_local_experts=4, **common, **over), MixtralForCausalLM
    else:
        config = Qwen2MoeConfig(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                                **common, **over)
        cls = Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():   # the default init leaves experts and routers near zero: make them matter
        for name, p in model.named_parameters():
            if "experts" in name or "gate" in name:
                p.normal_(0, 0.05)
    return LoadedModel(model, tokenizer, "/nonexistent/hf-folder", "hf")


def test_gate_up_split_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2 * 40, 64, generator=g)
    qt = quantize_tensor(w, lowbit.WeightScheme(format="gguf_q8_0", bits=None, group_size=32))
    gate, up = _split_gate_up(qt)
    assert gate.shape == up.shape == (3, 40, 64)
    full = qt.dequantize().reshape(3, 80, 64)
    assert torch.equal(gate.dequantize().reshape(3, 40, 64), full[:, :40])
    assert torch.equal(up.dequantize().reshape(3, 40, 64), full[:, 40:])
    fg, fu = _split_gate_up(w)
    assert torch.equal(fg, w[:, :40]) and torch.equal(fu, w[:, 40:])


@pytest.mark.parametrize("kind,arch", [("mixtral", "llama"), ("qwen2_moe", "qwen2moe")])
def test_llama_cpp_runs_moe(default_model, tmp_path, kind, arch):
    lm = _tiny_moe(kind, default_model.tokenizer)
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    path = write_gguf(lm, tmp_path / "f32.gguf")
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields[f"{arch}.expert_count"].contents() == 4 and r.fields[f"{arch}.expert_used_count"].contents() == 2
    shapes = {t.name: t.shape.tolist() for t in r.tensors}
    inter = 128 if kind == "mixtral" else 64
    assert shapes["blk.0.ffn_gate_exps.weight"] == shapes["blk.0.ffn_up_exps.weight"] == [64, inter, 4]
    assert shapes["blk.0.ffn_down_exps.weight"] == [inter, 64, 4] and shapes["blk.0.ffn_gate_inp.weight"] == [64, 4]
    if kind == "qwen2_moe":
        assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == [64]
    _, L = _llama_logits(path, ids)
    H = _model_logits(lm.model, ids)
    assert np.abs(L - H).max() < 1e-3 * max(1.0, np.abs(H).max())

    # quantized experts (3-D) and attention, Q8_0: lowbit's logits up to llama.cpp's 8-bit activations
    qm = lowbit.api.quantize(lm, lowbit.WeightScheme(format="gguf_q8_0", bits=None, group_size=32), progress=False)
    path = write_gguf(qm, tmp_path / "q8.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.1.ffn_down_exps.weight"] == "Q8_0"
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"
    _, L = _llama_logits(path, ids)
    assert_llama_agrees(L, _model_logits(qm.model, ids), max_err=0.05)


def test_routing_llama_cpp_cannot_reproduce_is_refused(default_model, tmp_path):
    lm = _tiny_moe("qwen2_moe", default_model.tokenizer, norm_topk_prob=True)
    with pytest.raises(SchemeError, match="norm_topk_prob"):
        write_gguf(lm, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_moe_mix_rules_follow_llama_cpp():
    t = lambda mix, name, i, **kw: tensor_type_for(mix, name, i, 32, 4096, **kw)[0]
    assert t("Q4_K_M", "blk.3.ffn_gate_inp.weight", 3, n_expert=8) == "F32"
    assert t("Q4_K_M", "blk.3.attn_v.weight", 3, n_expert=8) == "Q8_0"
    assert t("Q4_K_M", "blk.3.attn_k.weight", 3, n_expert=8) == "Q8_0"
    assert t("Q4_K_M", "blk.3.attn_output.weight", 3, n_expert=8) == "Q5_K"
    assert t("Q4_K_M", "blk.3.ffn_down_exps.weight", 3, n_expert=8) == "Q6_K"      # more_bits layer
    assert t("Q4_K_M", "blk.7.ffn_gate_exps.weight", 7, n_expert=8) == "Q4_K"
    assert t("Q2_K", "blk.7.attn_output.weight", 7, n_expert=8) == "Q5_K"
    assert t("Q2_K", "blk.7.attn_output.weight", 7, n_expert=4) == "Q3_K"           # only 8 experts change it
    assert t("Q6_K", "blk.7.attn_output.weight", 7, n_expert=8) == "Q6_K"
    assert t("IQ2_XS", "blk.7.attn_v.weight", 7, n_expert=4) == "Q4_K"
    assert t("IQ2_XS", "blk.7.attn_k.weight", 7, n_expert=8) == "Q4_K"
    assert t("IQ2_XS", "blk.7.attn_output.weight", 7, n_expert=8) == "Q5_K"
    assert t("IQ3_M", "blk.9.ffn_down_exps.weight", 9, n_expert=8) == "Q4_K"       # more_bits(9, 32)
    assert t("IQ3_M", "blk.10.ffn_down_exps.weight", 10, n_expert=8) == "IQ3_S"


def test_attention_llama_cpp_cannot_reproduce_is_refused(default_model, tmp_path):
    """Gemma-2 whose query scale is not the one llama.cpp hard-codes for it: one clear error."""
    import transformers as tf

    config = tf.Gemma2Config(vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             query_pre_attn_scalar=256)
    lm = LoadedModel(tf.Gemma2ForCausalLM(config).eval(), default_model.tokenizer, "/nonexistent", "hf")
    with pytest.raises(SchemeError, match="query_pre_attn_scalar=256"):
        write_gguf(lm, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_imatrix_with_an_entry_per_expert(default_model, tmp_path):
    """llama.cpp's importance matrices hold one row per expert for stacked experts: lowbit writes
    and reads them, and RTN fits each expert with its own row (an expert no token reached gets
    ones, as llama-quantize does)."""
    import lowbit.api
    from lowbit.calib import imatrix

    lm = _tiny_moe("mixtral", default_model.tokenizer)
    names = imatrix.gguf_names(lm.model)
    g = torch.Generator().manual_seed(0)
    stats = {}
    for n, p in lm.model.named_parameters():
        if ".experts." in n:
            stats[n] = (torch.rand(p.shape[0], p.shape[-1], generator=g, dtype=torch.float64) * 10,
                        torch.tensor([100.0, 50.0, 10.0, 0.0]))
    path = imatrix.write(tmp_path / "moe.imatrix.gguf", stats, names, 1, 16, "test")
    means = imatrix.read(path).mean_squares()
    gate = means["blk.0.ffn_gate_exps.weight"]
    assert gate.shape == (4, 64) and torch.equal(gate[3], torch.ones(64))
    assert torch.allclose(gate[1], (stats["model.layers.0.mlp.experts.gate_up_proj"][0][1] / 50).float())
    scheme = lowbit.WeightScheme(format="gguf_iq4_nl", bits=None, group_size=32)
    qm = lowbit.api.quantize(lm, scheme, include=[r"experts"], imatrix=str(path), progress=False)
    assert qm.recipe["imatrix"]["weighted"] == 4 and qm.recipe["imatrix"]["no_entry"] == []
    w = dict(_tiny_moe("mixtral", default_model.tokenizer).model.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
    qt = qm.tensors["model.layers.0.mlp.experts.gate_up_proj"]
    rows = qt.codes.shape[0] // 4
    for e in range(4):
        ref = quantize_tensor(w.data[e], scheme, importance=gate[e])
        assert torch.equal(qt.codes[e * rows:(e + 1) * rows], ref.codes), e
    plain = quantize_tensor(w.data, scheme)
    assert not torch.equal(plain.codes, qt.codes)


def test_imatrix_collects_each_experts_routed_tokens(default_model, tmp_path):
    """`lowbit imatrix` on a Mixtral-shaped model: one row per expert, over the tokens its router
    sent it (an independent hook on the experts module recomputes both), down_proj's inputs
    through each expert's gate/up; the fused gate_up is written for both llama.cpp tensors."""
    import subprocess
    import sys

    from lowbit.calib import imatrix

    lm = _tiny_moe("mixtral", default_model.tokenizer)
    folder = tmp_path / "moe"
    lm.model.save_pretrained(folder)
    default_model.tokenizer.save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"The number {i} follows {i - 1} and precedes {i + 1}." for i in range(400)))
    out = tmp_path / "moe.imatrix.gguf"
    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "imatrix", str(folder), "--calib", str(text),
                        "--samples", "4", "--seqlen", "32", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries = imatrix.read(out).entries

    from lowbit.calib import CalibrationConfig

    windows = CalibrationConfig(str(text), 4, 32, 0).windows(default_model.tokenizer)
    experts = lm.model.model.layers[1].mlp.experts
    seen = []
    hook = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0].reshape(-1, 64).double(),
                                                                          args[1].reshape(-1, 2))))
    with torch.no_grad():
        lm.model(windows)
    hook.remove()
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    for e in range(4):
        rows = torch.cat([h[(i == e).any(-1)] for h, i in seen])
        mid = experts._apply_gate(rows.float() @ gate_up[e].T).double()
        for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"):
            sums, counts = entries[name]
            assert sums.shape == (4, 64) and int(counts[e]) == rows.shape[0]
            assert torch.allclose(sums[e], rows.square().sum(0).float().double(), rtol=1e-5)
        sums, counts = entries["blk.1.ffn_down_exps.weight"]
        assert sums.shape == (4, 128) and int(counts[e]) == rows.shape[0]
        assert torch.allclose(sums[e], mid.square().sum(0).float().double(), rtol=1e-4)
    assert sum(int(c) for c in entries["blk.1.ffn_down_exps.weight"][1]) == windows.numel() * 2
    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "imatrix", str(folder), "--calib", str(text),
                        "--samples", "4", "--seqlen", "32", "-o", str(tmp_path / "moe.dat")], capture_output=True, text=True)
    assert r.returncode == 2 and "one per expert" in r.stderr and not (tmp_path / "moe.dat").exists()
