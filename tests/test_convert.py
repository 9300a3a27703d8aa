"""`lowbit convert` and the GGUF grid map: integer grids written as GGUF blocks bit for bit,
zero-points with their codes kept, the rest re-fitted with the added error said."""

import json

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.formats.gguf_blocks import to_gguf_bytes
from lowbit.formats.gguf_map import exact_blocks, nearest_blocks


def _gguf_decode(qt):
    data = to_gguf_bytes(qt)
    t = gguf.GGMLQuantizationType[qt.format.name.removeprefix("gguf_").upper()]
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, t), dtype=np.float32))


W = torch.randn(8, 576, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_symmetric_integers_are_gguf_blocks_exactly(bits, group):
    qt = lowbit.quantize_tensor(W, lowbit.WeightScheme("int", bits, group))
    blocks = exact_blocks(qt)
    assert blocks.format.name == {2: "gguf_q4_0", 3: "gguf_q4_0", 4: "gguf_q4_0", 5: "gguf_q5_0"}.get(bits, "gguf_q8_0")
    assert torch.equal(_gguf_decode(blocks), qt.dequantize())     # 576 = 4 x 128 + 64: the short group too


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_float_minimum_integers_are_q4_1_q5_1_exactly(bits):
    qt = lowbit.quantize_tensor(W, lowbit.WeightScheme("int", bits, 32, False, "float"))
    blocks = exact_blocks(qt)
    assert blocks.format.name == ("gguf_q5_1" if bits == 5 else "gguf_q4_1")
    assert torch.equal(_gguf_decode(blocks), qt.dequantize())


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_integer_zero_points_keep_their_codes(bits):
    qt = lowbit.quantize_tensor(W, lowbit.WeightScheme("int", bits, 64, False))
    assert exact_blocks(qt) is None
    near = nearest_blocks(qt)
    assert torch.equal(near.codes, qt.codes)
    got = _gguf_decode(near)
    assert torch.equal(got, near.dequantize())
    assert (got - qt.dequantize()).norm() / qt.dequantize().norm() < 1e-3   # the fp16 rounding of the min


def test_mxfp4_is_llama_cpps_mxfp4_exactly():
    qt = lowbit.quantize_tensor(W, lowbit.WeightScheme("mxfp4", None, 32))
    blocks = exact_blocks(qt)
    assert blocks.format.name == "gguf_mxfp4" and torch.equal(blocks.codes, qt.codes)
    assert torch.equal(_gguf_decode(blocks), qt.dequantize())


def test_what_no_block_holds_is_not_mapped():
    for ws in (lowbit.WeightScheme("nf4", None, 64), lowbit.WeightScheme("int", 4, 48),
               lowbit.WeightScheme("int", 6, 32, False, "float"), lowbit.WeightScheme("fp8_e4m3", None, -1)):
        qt = lowbit.quantize_tensor(W, ws)
        assert exact_blocks(qt) is None and nearest_blocks(qt) is None, ws


@pytest.fixture(scope="module")
def bpe_llama(default_model, tmp_path_factory):
    """A tiny random LLaMA with the default model's BPE tokenizer, as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bpe-llama")
    config = LlamaConfig(vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    default_model.tokenizer.save_pretrained(folder)
    return folder


def _convert(folder, tmp_path, capsys, *extra):
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert main(["convert", str(folder), "--to", "gguf", "-o", str(out), "--json", *extra]) == 0
    return out, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("flags,how,target", [(["--bits", "4", "--group-size", "32"], "exact", "Q4_0"),
                                              (["--bits", "3", "--group-size", "64", "--asym"], "codes kept", "Q4_1"),
                                              (["--scheme", "NF4"], "re-fitted", "Q5_0")])
def test_convert_lowbit_folder_to_gguf(bpe_llama, tmp_path, capsys, flags, how, target):
    folder = tmp_path / "q"
    assert main(["quantize", str(bpe_llama), *flags, "-o", str(folder), "--json"]) == 0
    out, rep = _convert(folder, tmp_path, capsys)
    assert rep["tensors"][how] == 14 and sum(rep["tensors"].values()) == 14
    assert {r["target"] for r in rep["per_tensor"]} == {target}   # NF4 -> Q4_K; rows of 64 or 128 -> its fallback, Q5_0
    if how == "exact":
        assert rep["max_added_rel_err"] == 0
    qm = lowbit.load(folder, runtime="decoded")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    got = torch.from_numpy(gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data,
                                                  tensors["blk.1.ffn_down.weight"].tensor_type).copy())
    want = qm.tensors["model.layers.1.mlp.down_proj.weight"].dequantize()
    err = float((got - want).norm() / want.norm())
    rec = next(r for r in rep["per_tensor"] if r["name"] == "model.layers.1.mlp.down_proj.weight")
    assert err == pytest.approx(rec["added_rel_err"], abs=1e-6)    # the error it reports is the file's


def test_convert_runs_in_llama_cpp(bpe_llama, default_model, tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = tmp_path / "q"
    assert main(["quantize", str(bpe_llama), "--bits", "4", "--group-size", "32", "-o", str(folder), "--json"]) == 0
    out, rep = _convert(folder, tmp_path, capsys)
    ids = default_model.tokenizer("The capital of France is Paris. The quick brown fox")["input_ids"]
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=64, n_batch=1, verbose=False)
    llm.eval(ids)
    L = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        H = lowbit.load(folder, runtime="decoded").model(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(H).max()
    assert np.abs(L - H).max() < 0.15 * scale and np.abs(L - H).mean() < 0.02 * scale   # Q8_0 activations in llama.cpp


def test_convert_bad_input(bpe_llama, tmp_path, capsys):
    assert main(["convert", str(bpe_llama), "--to", "gguf", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "is not a quantized checkpoint lowbit reads" in err and "not quantized" in err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("to,flags,how,target", [
    ("gptq", ["--bits", "4", "--group-size", "32"], "exact", "Q4_0"),
    ("gptq", ["--bits", "4", "--group-size", "64", "--asym"], "codes kept", "Q4_1"),
    ("awq", ["--bits", "4", "--group-size", "32", "--asym"], "codes kept", "Q4_1"),
    ("compressed-tensors", ["--bits", "4", "--group-size", "32"], "exact", "Q4_0"),
    ("compressed-tensors", ["--bits", "8", "--group-size", "-1"], "exact", "Q8_0")])
def test_convert_checkpoints_of_other_tools_to_gguf(bpe_llama, tmp_path, capsys, to, flags, how, target):
    """GPTQ / AWQ / compressed-tensors folders convert without re-quantizing: the GGUF holds the
    checkpoint's own codes and scales (exact), or its codes with the min rounded to fp16."""
    ck = tmp_path / "ck"
    assert main(["quantize", str(bpe_llama), *flags, "--to", to, "-o", str(ck), "--json"]) == 0
    out, rep = _convert(ck, tmp_path, capsys)
    assert rep["tensors"][how] == 14 and {r["target"] for r in rep["per_tensor"]} == {target}
    imported = __import__(f"lowbit.export.{to.replace('-', '_')}", fromlist=["x"]).import_checkpoint(ck)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    t = tensors["blk.0.ffn_up.weight"]
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    want = imported.tensors["model.layers.0.mlp.up_proj.weight"].dequantize()
    if how == "exact":
        assert torch.equal(got, want)
    else:
        assert (got - want).norm() / want.norm() < 1e-3


@pytest.mark.e2e
def test_convert_the_default_gguf_to_native_keeps_its_blocks(default_model, tmp_path, capsys):
    """The embedded default GGUF (Q4_1 decoder weights, a Q8_0 embedding) read as it is stored:
    the lowbit folder holds the file's own blocks, and runs with the logits transformers gets
    from dequantizing the same file."""
    from lowbit.model.load import default_gguf_path

    out = tmp_path / "native"
    capsys.readouterr()
    assert main(["convert", str(default_gguf_path()), "--to", "native", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tensors"]["exact"] == 211
    qm = lowbit.load(out, runtime="decoded")
    kinds = {qt.format.name for qt in qm.tensors.values()}
    assert kinds == {"gguf_q4_1", "gguf_q8_0"}
    src = {t.name: t for t in gguf.GGUFReader(default_gguf_path()).tensors}
    t = src["blk.3.ffn_down.weight"]
    assert np.array_equal(to_gguf_bytes(qm.tensors["model.layers.3.mlp.down_proj.weight"]).reshape(-1),
                          np.asarray(t.data).view(np.uint8).reshape(-1))
    ids = torch.tensor([default_model.tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        a, b = qm.model(ids).logits, default_model.model(ids).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max()


def test_convert_gguf_q4_0_to_compressed_tensors_and_back(bpe_llama, tmp_path, capsys):
    """A Q4_0 GGUF becomes a compressed-tensors INT4 g32 checkpoint with the file's codes and scales
    (transformers loads it with lowbit's logits), and converting that back gives the same bytes."""
    from transformers import AutoModelForCausalLM

    pytest.importorskip("compressed_tensors")
    folder = tmp_path / "q"
    assert main(["-q", "quantize", str(bpe_llama), "--bits", "4", "--group-size", "32", "-o", str(folder)]) == 0
    first, _ = _convert(folder, tmp_path, capsys)
    ct = tmp_path / "ct"
    assert main(["-q", "convert", str(first), "--to", "compressed-tensors", "-o", str(ct)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 400, 5000, 77, 8]])
    with torch.no_grad():
        a, b = hf(ids).logits, lowbit.load(folder, runtime="decoded").model(ids).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    again = tmp_path / "again.gguf"
    assert main(["-q", "convert", str(ct), "--to", "gguf", "-o", str(again)]) == 0
    x = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(first).tensors}
    y = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(again).tensors}
    assert x.keys() == y.keys() and all(x[k] == y[k] for k in x)


@pytest.mark.parametrize("to,flags", [("gptq", []), ("awq", ["--asym"]), ("compressed-tensors", ["--asym"])])
def test_convert_a_lowbit_folder_to_a_checkpoint_never_loads_it(bpe_llama, tmp_path, capsys, monkeypatch, to, flags):
    """A lowbit folder into GPTQ/AWQ/compressed-tensors is read one tensor at a time (the model
    stays on meta, full-precision tensors are copied as byte ranges): the same folder, byte for
    byte, as the resident export of the loaded model, with the loader never called."""
    from lowbit.export import native, write

    folder = tmp_path / "q"
    assert main(["-q", "quantize", str(bpe_llama), "--bits", "4", "--group-size", "32", *flags, "-o", str(folder)]) == 0
    write(native.load(folder), to, tmp_path / "resident")
    monkeypatch.setattr(native, "load", lambda *a, **k: pytest.fail("convert loaded the whole folder"))
    assert main(["-q", "convert", str(folder), "--to", to, "-o", str(tmp_path / "lazy")]) == 0
    capsys.readouterr()
    files = lambda p: {f.name: f.read_bytes() for f in sorted(p.iterdir())}  # noqa: E731
    assert files(tmp_path / "lazy") == files(tmp_path / "resident")
