"""The command line's export paths: quantize --to ..., export --to ..., on a tiny model."""

import json

import pytest
import torch

from lowbit.cli import main


@pytest.fixture(scope="module")
def w4_dir(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "w4"
    assert main(["quantize", str(tiny_llama), "--bits", "4", "--group-size", "32", "-o", str(out), "--json"]) == 0
    return out


@pytest.mark.parametrize("target", ["compressed-tensors", "gptq", "awq"])
def test_export_lowbit_dir_to_checkpoints_and_read_back(w4_dir, tmp_path, capsys, target):
    from lowbit.export import checkpoint_exporter  # noqa: F401  (the CLI's lookup)
    from lowbit.export.native import load

    capsys.readouterr()
    out = tmp_path / target
    assert main(["export", str(w4_dir), "--to", target, "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    module = {"compressed-tensors": "compressed_tensors", "gptq": "gptq", "awq": "awq"}[target]
    back = __import__(f"lowbit.export.{module}", fromlist=["import_checkpoint"]).import_checkpoint(out)
    ref = load(w4_dir)
    for name, qt in ref.tensors.items():
        assert torch.equal(back.tensors[name].dequantize(), qt.dequantize()), name


def test_quantize_straight_to_gptq_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_llama), "--method", "gptq", "--samples", "4", "--seqlen", "64",
                 "--bits", "4", "--group-size", "32", "--to", "gptq", "-o", str(out), "--json"]) == 0
    assert (out / "quantize_config.json").exists() or "quantization_config" in json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_bpe(default_model, tmp_path_factory):
    """A tiny random LLaMA with SmolLM2's BPE tokenizer, as an HF folder (GGUF needs BPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bpe")
    config = LlamaConfig(vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    default_model.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.e2e
def test_quantize_to_gguf_mix_and_full_precision(tiny_bpe, tmp_path, capsys):
    import gguf

    tiny_llama = tiny_bpe
    out = tmp_path / "m.gguf"
    assert main(["quantize", str(tiny_llama), "--to", "gguf", "--type", "Q8_0", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert summary["weights_quantized"] > 0
    f32 = tmp_path / "f.gguf"
    assert main(["export", str(tiny_llama), "--to", "gguf", "--type", "F32", "-o", str(f32), "--json"]) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(f32)).tensors} == {"F32"}


def test_gguf_needs_a_type_and_refuses_unreadable_formats(tiny_llama, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama), "--to", "gguf", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "--type" in capsys.readouterr().err
    nf4 = tmp_path / "nf4"   # no GGUF type holds NF4 (int4 g32 sym would be Q4_0 exactly)
    assert main(["quantize", str(tiny_llama), "--scheme", "NF4", "-o", str(nf4), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(nf4), "--to", "gguf", "-o", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "gguf_" in err and "lowbit convert" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))
