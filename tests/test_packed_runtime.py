"""Packed runtime: every kernel equals dequantize-then-matmul, on odd shapes; nothing dense at rest;
a lowbit folder loads packed and runs like the decoded model."""

import pytest
import torch

from lowbit import WeightScheme, quantize_tensor
from lowbit.nn.act_quant import input_quant_spec
from lowbit.scheme import ActivationScheme
from lowbit.runtime import packed as packed_mod
from lowbit.runtime.packed import PackedLinear, choose_kernel


def _qt(ws, rows, cols, act=None, absmax=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    qt = quantize_tensor(w, ws)
    if act is not None:
        qt.input_quant = input_quant_spec(act, absmax)
    return qt


def _reference(qt, x, bias, compute_dtype):
    """Dequantize-then-matmul, written from the stored parameters. For bf16 compute, the
    kernel's inputs are what bf16 holds: x and the (scale, offset) pairs rounded to bf16."""
    from lowbit.nn.act_quant import fake_quantize_input

    W = qt.dequantize_matrix()
    if qt.input_quant is not None:
        x = fake_quantize_input(x, qt.input_quant)
    return x @ W.T + bias, W


ODD = [(1536, 576), (576, 1536), (1000, 576), (96, 160)]


@pytest.mark.parametrize("rows,cols", ODD)
@pytest.mark.parametrize("ws", [
    WeightScheme("int", 4, 32, True), WeightScheme("int", 4, 64, False), WeightScheme("int", 4, 128, True),
    WeightScheme("int", 4, 256, False, "float"), WeightScheme("int", 4, -1, True),
    WeightScheme("int", 8, -1, True), WeightScheme("int", 8, -1, False), WeightScheme("int", 8, -1, False, "float"),
    WeightScheme("int", 8, 32, True), WeightScheme("int", 3, 32, False), WeightScheme("int", 4, 48, True),
    WeightScheme("nf4", None, 64), WeightScheme("nvfp4", None, 16), WeightScheme("mxfp4", None, 32),
    WeightScheme("fp8_e4m3", None, -1), WeightScheme("gguf_q4_0", None, 32), WeightScheme("gguf_q4_1", None, 32),
    WeightScheme("gguf_q4_k", None, 32), WeightScheme("gguf_q8_0", None, 32)])
def test_weight_only_kernels_equal_dequantize_then_matmul(ws, rows, cols):
    if ws.group_size > cols or (ws.format == "gguf_q4_k" and cols % 256):
        pytest.skip("group larger than the row / k-quant rows are multiples of 256")
    qt = _qt(ws, rows, cols)
    bias = torch.randn(rows)
    x = torch.randn(3, 7, cols)
    ref, _ = _reference(qt, x, bias, torch.float32)
    exact = PackedLinear(qt, bias, compute_dtype=torch.float32)
    torch.testing.assert_close(exact(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    fast = PackedLinear(qt, bias)   # bf16 inputs to the int4/int8 kernels: bf16 rounding only
    err = (fast(x) - ref).abs().max() / ref.abs().max()
    assert err < (1.5e-2 if fast.kernel in ("int4pack", "int8pack") else 1e-5), (fast.kernel, err)


@pytest.mark.parametrize("rows,cols", [(1536, 576), (1000, 576)])
@pytest.mark.parametrize("ws,act,absmax", [
    (WeightScheme("int", 8, -1, True), ActivationScheme("int", 8, "token", True), None),
    (WeightScheme("int", 8, -1, True), ActivationScheme("int", 8, "tensor", False), 3.0),
    (WeightScheme("int", 4, -1, True), ActivationScheme("int", 8, "token", True), None),
    (WeightScheme("int", 4, 128, True), ActivationScheme("int", 8, "token", True), None),
    (WeightScheme("fp8_e4m3", None, -1), ActivationScheme("fp8_e4m3", 8, "token", True), None),
    (WeightScheme("nvfp4", None, 16), ActivationScheme("nvfp4", 4, "block", True), None)])
@pytest.mark.parametrize("n_tokens", [1, 5, 40])
def test_quantized_input_kernels_equal_fake_quant_reference(ws, act, absmax, rows, cols, n_tokens):
    qt = _qt(ws, rows, cols, act, absmax)
    bias = torch.randn(rows)
    x = torch.randn(n_tokens, cols) * 2
    ref, _ = _reference(qt, x, bias, torch.float32)
    m = PackedLinear(qt, bias)
    y = m(x)
    tol = 1e-5
    if m.kernel == "int_mm" and n_tokens <= packed_mod.INT_MM_GEMV_ROWS:
        tol = 8e-3   # the decode-time GEMV rounds its output to bf16
    elif m.kernel == "int4pack":
        tol = 1.5e-2
    err = (y - ref).abs().max() / ref.abs().max()
    assert err < tol, (m.kernel, err)


@pytest.mark.parametrize("n_tokens", [1, 40])
def test_shared_input_codes_are_reused_only_for_the_same_unchanged_tensor(n_tokens):
    """q/k/v (and gate/up) get one input tensor: its int8 codes are made once; a copy, another
    shape or an in-place change is quantized afresh, and every output equals a fresh call's."""
    ws, act = WeightScheme("int", 8, -1, True), ActivationScheme("int", 8, "token", True)
    a, b = PackedLinear(_qt(ws, 96, 160, act, seed=1), None), PackedLinear(_qt(ws, 64, 160, act, seed=2), None)
    x = torch.randn(n_tokens, 160)
    ya, yb = a(x), b(x)
    cached = packed_mod._SHARED_INPUT[0]
    assert cached is not None and cached[0] is x
    assert torch.equal(ya, a(x.clone())) and torch.equal(yb, b(x.clone()))
    a(x)
    codes = packed_mod._SHARED_INPUT[0][2]
    assert torch.equal(b(x), yb) and packed_mod._SHARED_INPUT[0][2] is codes   # reused, same output
    x.mul_(3)                                           # in place: the codes are made again
    assert torch.equal(b(x), b(x.clone())) and not torch.equal(b(x), yb)
    with torch.inference_mode():                        # no version counter: identity alone
        xi = torch.randn(n_tokens, 160)
        assert torch.equal(a(xi), a(xi.clone())) and torch.equal(b(xi), b(xi.clone()))


def test_kernel_choice_follows_the_format():
    cases = {
        (WeightScheme("int", 4, 32, False), None): "int4pack",
        (WeightScheme("int", 4, 48, True), None): "decode",
        (WeightScheme("int", 8, -1, True), None): "int8pack",
        (WeightScheme("int", 8, 64, True), None): "decode",
        (WeightScheme("int", 8, -1, True), ActivationScheme("int", 8, "token", True)): "int_mm",
        (WeightScheme("int", 8, -1, False), ActivationScheme("int", 8, "token", True)): "int8pack",
        (WeightScheme("fp8_e4m3", None, -1), ActivationScheme("fp8_e4m3", 8, "token", True)): "scaled_mm",
        (WeightScheme("nf4", None, 64), None): "decode",
        (WeightScheme("gguf_q4_0", None, 32), None): "int4pack",   # llama.cpp's 4-bit types are affine too
        (WeightScheme("gguf_q4_k", None, 32), None): "int4pack",
        (WeightScheme("gguf_q6_k", None, 16), None): "decode",
    }
    for (ws, act), kernel in cases.items():
        assert choose_kernel(_qt(ws, 64, 256, act))[0] == kernel, (ws, act)


def test_nothing_dense_at_rest_and_decode_scratch_is_bounded(monkeypatch):
    rows, cols = 1536, 576
    for ws in (WeightScheme("int", 4, 32, True), WeightScheme("int", 8, -1, True), WeightScheme("nf4", None, 64),
               WeightScheme("int", 3, 32, False)):
        qt = _qt(ws, rows, cols)
        m = PackedLinear(qt, None)
        held = [t for t in m.buffers()] + [c for chunk in getattr(m, "chunks", []) for c in [chunk[0], *chunk[1].values()]]
        assert all(not (t.is_floating_point() and t.numel() >= rows * cols) for t in held), ws
        assert m.resident_bytes <= qt.nbytes * 2 + 64 * rows, (ws, m.resident_bytes, qt.nbytes)
    # decode path: at most SCRATCH_ELEMENTS decoded weights live at once, and chunks add up
    monkeypatch.setattr(packed_mod, "SCRATCH_ELEMENTS", 100 * cols)
    qt = _qt(WeightScheme("nf4", None, 64), rows, cols)
    m = PackedLinear(qt, None)
    assert len(m.chunks) == -(-rows // 100)
    assert max(w.numel() for _, w in m.decoded_chunks()) <= 100 * cols
    x = torch.randn(4, cols)
    torch.testing.assert_close(m(x), x @ qt.dequantize_matrix().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme", ["W4A16_G32_ASYM", "W8A8", "NF4"])
def test_lowbit_folder_loads_packed_and_matches_decoded(tiny_llama, tmp_path, scheme):
    from lowbit.api import quantize
    from lowbit.export.native import load, save

    qm = quantize(str(tiny_llama), scheme, progress=False)
    out = save(qm, tmp_path / scheme)
    decoded = load(out)
    exact = load(out, runtime="packed", compute_dtype=torch.float32)
    if scheme == "NF4":   # no kernel: said once, at load
        with pytest.warns(UserWarning, match=r"no CPU kernel and are decoded per call.*nf4"):
            fast = load(out, runtime="packed")
    else:
        fast = load(out, runtime="packed")
    kernels = {m.kernel for m in fast.model.modules() if isinstance(m, PackedLinear)}
    assert kernels == {"W4A16_G32_ASYM": {"int4pack"}, "W8A8": {"int_mm"}, "NF4": {"decode"}}[scheme]
    assert not any(type(m).__name__ == "QuantLinear" for m in fast.model.modules())
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = decoded.model(ids).logits, exact.model(ids).logits, fast.model(ids).logits
    if scheme != "W8A8":   # per-token int8 rounding flips on 1e-7 differences (tested per layer above)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (c - a).abs().max() < 0.1 * a.abs().max()
    # the lazily read tensors are the stored ones, so exporters still work from a packed load
    for name, qt in decoded.tensors.items():
        lazy = fast.tensors[name]
        assert torch.equal(lazy.codes, qt.codes) and all(torch.equal(lazy.params[k], v) for k, v in qt.params.items())
    assert set(fast.tensors) == set(decoded.tensors)


def test_unknown_runtime_is_refused(tiny_llama, tmp_path):
    from lowbit.api import quantize
    from lowbit.errors import SourceError
    from lowbit.export.native import load, save

    out = save(quantize(str(tiny_llama), "W8A16", progress=False), tmp_path / "w8")
    with pytest.raises(SourceError, match="unknown runtime"):
        load(out, runtime="fast")


def test_quantized_embeddings_gather_packed_rows_and_feed_the_tied_head(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.api import quantize
    from lowbit.export.native import load, save
    from lowbit.runtime.packed import PackedEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    recipe = {"scheme": {"weights": {"format": "int", "bits": 4, "group_size": 32, "symmetric": True}},
              "targets": ["self_attn", "mlp", "embed_tokens"], "ignore": ["norm"]}
    qm = quantize(model, recipe=recipe, tokenizer=tokenizer, progress=False)
    assert "model.embed_tokens.weight" in qm.tensors
    out = save(qm, tmp_path / "tied")
    decoded = load(out)
    packed = load(out, runtime="packed", compute_dtype=torch.float32)
    emb = packed.model.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding) and emb.row_packed
    assert isinstance(packed.model.get_output_embeddings(), PackedLinear)
    assert emb.codes.numel() == config.vocab_size * config.hidden_size // 2   # two codes per byte
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    qt = qm.tensors["model.embed_tokens.weight"]
    torch.testing.assert_close(emb(ids)[0], qt.dequantize_matrix()[ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(packed.model(ids).logits, decoded.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_packed_load_saves_and_exports_like_the_decoded_one(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from lowbit.api import quantize
    from lowbit.export.native import WEIGHTS_FILE, load, save

    out = save(quantize(str(tiny_llama), "W4A16_G32_ASYM", progress=False), tmp_path / "a")
    again = save(load(out, runtime="packed"), tmp_path / "b")   # packed buffers are not state: same folder
    a, b = load_file(str(out / WEIGHTS_FILE)), load_file(str(again / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bench_infer_measures_the_candidate_against_its_source(tiny_llama, tmp_path, capsys):
    import json

    from lowbit.api import quantize
    from lowbit.cli import main
    from lowbit.export.native import save

    out = save(quantize(str(tiny_llama), "W4A16_G32_ASYM", progress=False), tmp_path / "w4")
    data = tmp_path / "prompt.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 4)
    assert main(["bench-infer", str(out), "--data", str(data), "--prompt-tokens", "16", "--decode-tokens", "3",
                 "--threads", "1", "--kv", "int8", "--kv-sink", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    source, cand = rows
    assert "error" not in source and "error" not in cand, rows
    assert cand["kernels"] == {"int4pack": 14} and source["model_rss_ratio"] == 1.0
    assert cand["rss_after_run"] >= cand["rss_before_load"] and len(cand["generated"]) == 3
    assert cand["label"] == "candidate (packed, KV int8 per-token sink2)"
    assert main(["bench-infer", str(tiny_llama)]) == 2   # not a lowbit output: one line, exit 2
