"""The full pipeline on tiny random models: seconds, no embedded model needed."""

import json

import pytest
import torch

from lowbit import WeightScheme
from lowbit.api import quantize
from lowbit.cli import main
from lowbit.export.native import load, save
from lowbit.model.load import load_source
from lowbit.model.targets import select_targets
from lowbit.nn import QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 33, 2, 60, 41, 8, 9, 10, 11]])


def test_default_targets_skip_head_embeddings_norms(tiny_llama):
    model = load_source(tiny_llama).model
    names = [t.name for t in select_targets(model)]
    assert len(names) == 2 * 7
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in names)
    only_mlp = select_targets(model, include=[r"mlp"])
    assert len(only_mlp) == 2 * 3


@pytest.mark.parametrize("scheme", ["W4A16_G32_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "NF4", "MXFP4", "NVFP4", "FP8_WEIGHT", "TERNARY"])
def test_quantize_save_load_same_logits(tiny_llama, tmp_path, scheme):
    qm = quantize(tiny_llama, scheme, progress=False)
    assert all(isinstance(qm.model.get_submodule(t.module_name), QuantLinear) for t in qm.targets.values())
    before = _logits(qm.model, IDS)
    out = save(qm, tmp_path / "out")
    back = load(out)
    assert torch.equal(_logits(back.model, IDS), before)
    for name, qt in qm.tensors.items():
        assert torch.equal(back.tensors[name].codes, qt.codes)
        assert all(torch.equal(back.tensors[name].params[k], v) for k, v in qt.params.items())
    assert json.loads((out / "lowbit.json").read_text())["method"] == "rtn"


def test_saving_is_deterministic(tiny_llama, tmp_path):
    a = save(quantize(tiny_llama, "W4A16_G32_ASYM", progress=False), tmp_path / "a")
    b = save(quantize(tiny_llama, "W4A16_G32_ASYM", progress=False), tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_w8_is_close_and_w2_is_not(tiny_llama):
    ref = _logits(load_source(tiny_llama).model, IDS)
    w8 = _logits(quantize(tiny_llama, WeightScheme("int", 8, -1), progress=False).model, IDS)
    w2 = _logits(quantize(tiny_llama, WeightScheme("int", 2, 32, False), progress=False).model, IDS)
    assert (w8 - ref).abs().max() < (w2 - ref).abs().max() / 10


def test_cli_quantize_eval_info(tiny_llama, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama), "--bits", "4", "--group-size", "32", "--asym", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_weight"] == pytest.approx(4.75)
    assert main(["eval", str(out), "--data", str(text), "--ctx", "64", "--windows", "4", "--json", "--layers"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"ppl", "ref_ppl", "kld", "kld_p99", "top1", "bits_per_weight", "size_bytes"}
    assert res["kld"] >= 0 and 0 <= res["top1"] <= 1 and res["n_tokens"] == 4 * 63
    assert len(res["layers"]) == 14
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "lowbit"
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"prompt", "reference", "candidate", "kv"}


def test_eval_of_identical_model_is_zero(tiny_llama, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("abc def ghi " * 300)
    assert main(["eval", str(tiny_llama), "--reference", str(tiny_llama), "--data", str(text), "--ctx", "32", "--windows", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kld"] == pytest.approx(0, abs=1e-6) and res["top1"] == 1.0 and res["ppl"] == pytest.approx(res["ref_ppl"])


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "/no/such/model", "-o", "X"], "does not exist"),
    (["quantize", "TINY", "--bits", "9", "-o", "X"], "2..8 bits"),
    (["quantize", "TINY", "--group-size", "4096", "-o", "X"], "larger than the row"),
    (["quantize", "TINY", "--format", "nf4", "--bits", "3", "-o", "X"], "drop --bits"),
    (["quantize", "TINY", "--include", "nothing-matches", "-o", "X"], "matches no weight"),
])
def test_user_errors_exit_2_with_one_line_and_no_output(tiny_llama, tmp_path, capsys, argv, msg):
    out = tmp_path / "X"
    argv = [str(tiny_llama) if a == "TINY" else (str(out) if a == "X" else a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # earlier lines are progress bars
    assert msg in err[-1] and err[-1].startswith("lowbit: error:") and sum("lowbit: error" in e for e in err) == 1
    assert not out.exists() and not list(tmp_path.glob(".X*"))


def test_empty_or_short_eval_text_is_a_clear_error(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", str(tiny_llama), "--reference", str(tiny_llama), "--data", str(empty), "--ctx", "64"]) == 2
    assert "is empty" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert main(["eval", str(tiny_llama), "--reference", str(tiny_llama), "--data", str(short), "--ctx", "64"]) == 2
    assert "fewer than one window" in capsys.readouterr().err


def test_existing_output_is_refused_then_replaced_with_force(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["quantize", str(tiny_llama), "-o", str(out), "--group-size", "32"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep").exists()
    assert main(["quantize", str(tiny_llama), "-o", str(out), "--group-size", "32", "--force", "--json"]) == 0
    assert not (out / "keep").exists() and (out / "lowbit.json").exists()


def test_size_calculator_reproduces_seed_table(capsys):
    assert main(["size", "70B", "--format", "fp32", "--format", "fp16", "--format", "int8", "--format", "int4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["weight_bytes"] / 1e9 for r in rows] == [280, 140, 70, 35]
    assert main(["size", "70B", "--format", "int4", "--group-size", "128", "--context", "8192", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)[0]
    assert r["scale_bytes"] == pytest.approx(70e9 / 128 * 2)
    # 80 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes per token
    assert r["kv_cache_bytes"] == pytest.approx(80 * 8 * 128 * 2 * 2 * 8192)


def test_gpt2_conv1d_and_moe_experts_are_quantized(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

    from lowbit.model.load import LoadedModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
    ids = torch.randint(0, 100, (1, 12))
    ref = _logits(gpt2, ids)
    qm = quantize(LoadedModel(gpt2, None, "gpt2-tiny", "hf"), WeightScheme("int", 8, 32), progress=False)
    kinds = {t.kind for t in qm.targets.values()}
    assert kinds == {"conv1d"} and len(qm.tensors) == 2 * 4
    assert (_logits(qm.model, ids) - ref).abs().max() < 0.05
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)).eval()
    qm = quantize(LoadedModel(moe, None, "moe-tiny", "hf"), WeightScheme("int", 4, 32), progress=False)
    experts = [n for n, t in qm.targets.items() if t.kind == "experts"]
    assert sorted(n.rsplit(".", 1)[1] for n in experts) == ["down_proj", "gate_up_proj"]
    assert not any(n.endswith("gate.weight") for n in qm.tensors)  # the router stays in full precision
    p = dict(qm.model.named_parameters())[experts[0]]
    assert torch.equal(p.data, qm.tensors[experts[0]].dequantize())
