"""Sparsity: N:M and unstructured masks, SparseGPT's joint prune + quantize (reduces to magnitude
pruning under an identity Hessian; beats Wanda on real calibration statistics), Wanda, exact
zeros in the stored codes, and refusals for patterns a format or a shape cannot hold."""

import dataclasses

import pytest
import torch

from lowbit import WeightScheme
from lowbit.cli import main
from lowbit.errors import SchemeError
from lowbit.methods.gptq import Options, gptq_quantize
from lowbit.sparsity import Pattern, check_shape, follows, parse_pattern, prune_mask
from tests.test_awq_smoothquant import _logits, _run, build


def test_patterns_parse_and_masks_follow_them():
    assert parse_pattern("2:4") == Pattern(2, 4) and parse_pattern(0.5) == Pattern(fraction=0.5)
    for bad in ("4:2", "0:4", "1.5", "x", "2:x"):
        with pytest.raises(SchemeError):
            parse_pattern(bad)
    scores = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    m24 = prune_mask(scores, Pattern(2, 4))
    assert torch.equal(m24.reshape(8, 16, 4).sum(-1), torch.full((8, 16), 2))
    # the two lowest of each group of four are the ones dropped
    g = scores.reshape(8, 16, 4)
    kept_min = g.masked_fill(m24.reshape(8, 16, 4), float("inf")).amin(-1)
    dropped_max = g.masked_fill(~m24.reshape(8, 16, 4), -float("inf")).amax(-1)
    assert (dropped_max <= kept_min).all()
    half = prune_mask(scores, Pattern(fraction=0.5))
    assert torch.equal(half.sum(-1), torch.full((8,), 32))
    assert follows(scores.masked_fill(m24, 0), Pattern(2, 4)) and not follows(scores, Pattern(2, 4))
    with pytest.raises(SchemeError, match="multiple of 4"):
        check_shape(Pattern(2, 4), 66, "w")


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning_then_rounding():
    """With H = I the inverse Hessian is diagonal: no error reaches other columns, and OBS
    saliency is w²; so SparseGPT 2:4 int8 per-channel = drop the two smallest |w| of every four,
    round the rest with the row's absmax / 127 (fp16 scale)."""
    from lowbit.formats import make_format

    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    fmt = make_format("int", bits=8, symmetric=True)
    codes, params = gptq_quantize(W, torch.eye(64), fmt, 64, options=Options(act_order=False, damp=0.0),
                                  prune=Pattern(2, 4))
    got = fmt.decode(codes, {k: v.expand(-1, 64) if v.ndim else v for k, v in params.items()})
    drop = prune_mask(W.abs(), Pattern(2, 4))
    s = (W.abs().amax(1, keepdim=True) / 127).half().float()
    want = torch.where(drop, torch.zeros_like(W), torch.round(W / s) * s)
    assert torch.equal(got, want)


@pytest.mark.parametrize("scheme", [WeightScheme("int", 4, 32, True), WeightScheme("int", 4, 32, False),
                                    WeightScheme("fp8_e4m3", None, -1)])
def test_sparsegpt_beats_wanda_and_stores_exact_zeros(scheme, tokenizer, calib):
    more = dataclasses.replace(calib, samples=32)
    ids = more.windows(tokenizer)[:8]
    ref = _logits(build("llama"), ids)
    err = {}
    for method in ("wanda", "sparsegpt"):
        qm = _run("llama", tokenizer, more, scheme, method, sparsity="2:4")
        assert len(qm.tensors) == 14
        for name, qt in qm.tensors.items():
            assert follows(qt.dequantize_matrix(), Pattern(2, 4)), name
        err[method] = float((_logits(qm.model, ids) - ref).pow(2).mean())
    assert err["sparsegpt"] < err["wanda"]


def test_unstructured_sparsegpt_halves_every_row(tokenizer, calib):
    qm = _run("qwen2", tokenizer, calib, WeightScheme("int", 8, -1, True), "sparsegpt", sparsity="0.5")
    for name, qt in qm.tensors.items():
        W = qt.dequantize_matrix()
        assert ((W == 0).sum(1) >= W.shape[1] // 2).all(), name


@pytest.mark.parametrize("argv,msg", [
    (["--method", "sparsegpt", "--asym", "--zero-point", "float", "--group-size", "32"], "exact zero"),
    (["--method", "wanda", "--asym", "--zero-point", "float", "--group-size", "32"], "exact zeros"),
    (["--method", "sparsegpt", "--opt", "sparsity=4:2"], "0 < N < M"),
    (["--method", "sparsegpt", "--opt", "act_order=true"], "in order"),
])
def test_bad_sparsity_input_is_one_clear_line(tiny_llama, tmp_path, capsys, argv, msg):
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama), *argv, "--samples", "2", "--seqlen", "16", "-o", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowbit: error:") and msg in last and not out.exists()


def test_sparse_24_int4_checkpoint_loads_in_transformers(tiny_llama, tmp_path, calib):
    """2:4 + INT4 g32 sym as compressed-tensors (pack-quantized weights holding the zeros, the
    structure recorded in its sparsity_config): transformers loads it with lowbit's logits and
    every group of four still has two zeros."""
    import json

    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    import lowbit

    out = tmp_path / "ct"
    assert main(["-q", "quantize", str(tiny_llama), "--method", "sparsegpt", "--opt", "sparsity=2:4", "--bits", "4",
                 "--group-size", "32", "--calib", calib.text, "--samples", "4", "--seqlen", "32",
                 "--to", "compressed-tensors", "-o", str(out)]) == 0
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == "2:4" and sc["global_sparsity"] >= 0.5
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[3, 14, 15, 9, 26, 53, 5, 8]])
    native = tmp_path / "native"
    assert main(["-q", "quantize", str(tiny_llama), "--method", "sparsegpt", "--opt", "sparsity=2:4", "--bits", "4",
                 "--group-size", "32", "--calib", calib.text, "--samples", "4", "--seqlen", "32", "-o", str(native)]) == 0
    qm = lowbit.load(native, runtime="decoded")
    a, b = _logits(hf, ids), _logits(qm.model, ids)
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    checked = [name for name, mod in hf.named_modules() if name.endswith(("q_proj", "down_proj"))
               and follows(mod.weight.float(), Pattern(2, 4))]
    assert len(checked) == 4
