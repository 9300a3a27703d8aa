"""Additive codebooks (AQLM 2x8 / 1x16): the stored words decode to the sum of their codebook
vectors by an independent formula, bits per weight counted from the stored bytes, the Hessian-aware
method beats the format's own k-means rounding, and bad settings are one clear line."""

import dataclasses

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import SchemeError
from lowbit.formats import make_format
from tests.test_awq_smoothquant import _logits, _run, build


@pytest.mark.parametrize("name,M,B", [("aqlm_2x8", 2, 8), ("aqlm_1x16", 1, 16)])
def test_words_decode_to_the_sum_of_codebook_vectors(name, M, B):
    fmt = make_format(name)
    rows, cols = 3, 64
    g = torch.Generator().manual_seed(0)
    vec = torch.randint(0, 1 << B, (rows * cols // 8, M), generator=g)
    C = torch.randn(M, 1 << B, 8, generator=g)
    scale = torch.rand(rows, 1, generator=g) + 0.5
    codes = fmt.spread(vec, rows, cols)
    assert codes.shape == (rows, cols) and int(codes.max()) < 4 and fmt.code_bits == 2
    # independent: the 16-bit word of vector v is its codes' bits side by side, 2 bits per weight
    want = torch.zeros(rows, cols)
    for v in range(vec.shape[0]):
        r, c0 = divmod(v * 8, cols)
        word = sum(int(codes[r, c0 + k]) << (2 * k) for k in range(8))
        parts = [(word >> (m * B)) & ((1 << B) - 1) for m in range(M)]
        assert parts == vec[v].tolist()
        want[r, c0: c0 + 8] = sum(C[m, parts[m]] for m in range(M)) * scale[r]
    assert torch.allclose(fmt.decode(codes, {"scale": scale.expand(rows, cols), "codebooks": C}), want)


def test_bits_per_weight_from_the_stored_bytes():
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(1))
    qt = lowbit.quantize_tensor(w, lowbit.WeightScheme("aqlm_2x8", None, -1))
    stored = qt.packed_codes().numel() + sum(v.numel() * v.element_size() for v in qt.params.values())
    assert qt.nbytes == stored == 96 * 512 * 2 // 8 + 96 * 2 + 2 * 256 * 8 * 2
    again = lowbit.tensor.QuantizedTensor.from_packed(qt.meta(), qt.packed_codes(), qt.params)
    assert torch.equal(again.dequantize(), qt.dequantize())


def test_aqlm_method_beats_its_formats_own_rounding_and_int2(tokenizer, calib):
    more = dataclasses.replace(calib, samples=16)
    ids = more.windows(tokenizer)[:8]
    ref = _logits(build("llama"), ids)
    err = {}
    for key, scheme, method in [("rtn", lowbit.WeightScheme("aqlm_2x8", None, -1), "rtn"),
                                ("aqlm", lowbit.WeightScheme("aqlm_2x8", None, -1), "aqlm"),
                                ("int2", lowbit.WeightScheme("int", 2, 32, False), "gptq")]:
        qm = _run("llama", tokenizer, more, scheme, method)
        err[key] = float((_logits(qm.model, ids) - ref).pow(2).mean())
    assert err["aqlm"] < err["rtn"] and err["aqlm"] < err["int2"]


def quantize_reload_and_refuse(tiny_llama, tmp_path, calib, capsys, method, fmt, bad_cases):
    """`lowbit quantize --method METHOD` of the tiny model: the decoded and packed runtimes agree, every
    tensor is FMT, and each bad case (argv, message) is one error line with nothing written. The folder."""
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama), "--method", method, "--calib", calib.text, "--samples", "4",
                 "--seqlen", "32", "-o", str(out)]) == 0
    qm = lowbit.load(out, runtime="decoded")
    packed = lowbit.load(out, compute_dtype=torch.float32)
    ids = torch.tensor([[3, 14, 15, 9, 26, 53]])
    with torch.no_grad():
        assert torch.allclose(qm.model(ids).logits, packed.model(ids).logits, atol=1e-4)
    assert {qt.format.name for qt in qm.tensors.values()} == {fmt}
    for argv, msg in bad_cases:
        bad = tmp_path / "bad"
        assert main(["quantize", str(tiny_llama), *argv, "--samples", "2", "--seqlen", "16", "-o", str(bad)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("lowbit: error:") and msg in last and not bad.exists()
    return out


def test_aqlm_cli_reloads_and_bad_input_is_one_line(tiny_llama, tmp_path, calib, capsys):
    quantize_reload_and_refuse(tiny_llama, tmp_path, calib, capsys, "aqlm", "aqlm_2x8", [
        (["--method", "aqlm", "--opt", "codebooks=3"], "2x8 and 1x16"),
        (["--method", "gptq", "--format", "aqlm_2x8"], "--method aqlm"),
        (["--method", "aqlm", "--format", "int", "--bits", "2"], "--format aqlm_2x8")])


def test_rows_not_a_multiple_of_eight_are_refused():
    with pytest.raises(SchemeError, match="multiple of 8"):
        lowbit.quantize_tensor(torch.randn(4, 60), lowbit.WeightScheme("aqlm_2x8", None, -1))
