"""LLM.int8(): int8 rows, outlier input columns in full precision. Checked against a formula
written here from the paper / bitsandbytes' description, against bitsandbytes' own
Linear8bitLt where it installs, in lowbit's packed int_mm kernel, and end to end."""

import dataclasses

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import SchemeError
from lowbit.methods import llm_int8
from lowbit.nn.act_quant import input_quant_spec
from lowbit.nn.quant_linear import QuantLinear
from lowbit.runtime.packed import PackedLinear
from lowbit.scheme import ActivationScheme, preset

T = 6.0


def _layer(rows=96, cols=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(rows, cols, generator=g) * 0.05).half().float()   # fp16-exact, as bitsandbytes casts
    b = torch.randn(rows, generator=g).half().float()
    x = torch.randn(7, cols, generator=g)
    x[:, 3] *= 20          # an outlier feature in every token
    x[2, 7] = 7.0          # one value over the threshold: column 7 is an outlier column for the whole call
    x[:, 100] *= 4         # large but mostly below 6: stays int8
    return W, b, x.half().float()


def _formula(W, b, x):
    """LLM.int8 as the paper describes it, with lowbit's fp16 row scales."""
    s_w = (W.abs().amax(1) / 127).half().float()                 # one scale per output row (stored fp16)
    Wq = torch.clamp(torch.round(W / s_w[:, None]), -127, 127) * s_w[:, None]
    outl = (x.abs() >= T).any(0)                                 # columns with an outlier anywhere in the call
    below = torch.where(x.abs() >= T, torch.zeros_like(x), x)    # outlier values do not set the token scales
    s_x = below.abs().amax(1, keepdim=True) / 127
    xq = torch.round(torch.where(outl, torch.zeros_like(x), x) / s_x) * s_x
    return xq @ Wq.T + x[:, outl] @ Wq[:, outl].T + b


def _quantized(W):
    s = preset("LLM_INT8")
    qt = llm_int8.quantize_weight(W, s.weights)
    return dataclasses.replace(qt, input_quant=input_quant_spec(s.activations))


def test_llm_int8_equals_the_formula_in_both_runtimes():
    W, b, x = _layer()
    qt = _quantized(W)
    want = _formula(W, b, x)
    with torch.no_grad():
        fake = QuantLinear(qt, b)(x)
        packed_mod = PackedLinear(qt, b, compute_dtype=torch.float32)
        packed = packed_mod(x)
    assert packed_mod.kernel == "int_mm"
    assert torch.allclose(fake, want, rtol=0, atol=1e-5)
    assert torch.allclose(packed, want, rtol=0, atol=1e-4)
    # the outlier split matters: plain W8A8 on the same weights is further from full precision
    exact = x @ W.T + b
    w8a8 = dataclasses.replace(qt, input_quant=input_quant_spec(ActivationScheme("int", 8, "token", True)))
    with torch.no_grad():
        plain = QuantLinear(w8a8, b)(x)
    assert (fake - exact).abs().max() * 3 < (plain - exact).abs().max()


def test_llm_int8_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    W, b, x = _layer()
    ref = bnb.nn.Linear8bitLt(W.shape[1], W.shape[0], has_fp16_weights=False, threshold=T)
    ref.load_state_dict({"weight": W, "bias": b})
    ref = ref.to("cpu").eval()
    qt = _quantized(W)
    ours_codes = qt.codes.to(torch.int16) - 128
    theirs = ref.weight.data.to(torch.int16)
    # bitsandbytes keeps fp32 row scales; lowbit stores fp16 ones, which moves w / scale by at
    # most 2^-11 relative: codes differ by one step only where w·127/absmax is that close to .5
    exact = W * 127 / W.abs().amax(1, keepdim=True)
    differ = ours_codes != theirs
    assert (ours_codes - theirs).abs().max() <= 1
    assert ((exact[differ].abs() % 1 - 0.5).abs() < 127 * 2 ** -10).all()
    assert differ.float().mean() < 0.03
    with torch.no_grad():
        got, want = QuantLinear(qt, b)(x), ref(x).float()
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.01 * scale and (got - want).abs().mean() < 0.001 * scale


def test_llm_int8_end_to_end_and_refusals(tiny_llama, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama), "--method", "llm_int8", "-o", str(out)]) == 0
    qm = lowbit.load(out, runtime="decoded")
    specs = {n: qt.input_quant for n, qt in qm.tensors.items()}
    assert all(s["outlier_threshold"] == T for s in specs.values()) and len(specs) == 14
    assert all(qt.format.bits == 8 and qt.params["scale"].shape[1] == 1 for qt in qm.tensors.values())
    packed = lowbit.load(out, runtime="packed", compute_dtype=torch.float32)
    ids = torch.tensor([[3, 14, 15, 9, 26, 53, 5]])
    with torch.no_grad():
        a, b = qm.model(ids).logits, packed.model(ids).logits
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    for argv, msg in [(["--method", "llm_int8", "--bits", "4"], "--scheme LLM_INT8"),
                      (["--method", "llm_int8", "--scheme", "W8A8"], "--scheme LLM_INT8")]:
        bad = tmp_path / "bad"
        assert main(["quantize", str(tiny_llama), *argv, "-o", str(bad)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("lowbit: error:") and msg in last and not bad.exists()
    # compressed-tensors cannot express the outlier split: refused, nothing written
    ct = tmp_path / "ct"
    assert main(["export", str(out), "--to", "compressed-tensors", "-o", str(ct)]) == 2
    assert "LLM.int8" in capsys.readouterr().err and not ct.exists()


def test_outlier_threshold_only_with_int8_tokens():
    with pytest.raises(SchemeError, match="int8 per-token"):
        ActivationScheme("fp8_e4m3", 8, "token", True, outlier_threshold=6.0)
    assert "columns reaching 6" in preset("LLM_INT8").label()
