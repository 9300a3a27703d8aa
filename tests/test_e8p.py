"""E8P (QuIP#'s 2-bit lattice codebook) with incoherence: the 2^16 codewords equal the paper's
construction enumerated here, the nearest search equals brute force over all of them, decode is
U W̃ Vᵀ by an independent formula, BlockLDLQ beats plain rounding on the layer's loss, bits per
weight come from the stored bytes, and `--method quip` runs end to end."""

import dataclasses
import itertools

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import SchemeError
from lowbit.formats.e8p import E8P, NORM12, OPT_SCALE, abs_grid, decode_words, nearest_words
from lowbit.hadamard import rotation
from lowbit.methods import quip
from tests.test_aqlm import quantize_reload_and_refuse
from tests.test_awq_smoothquant import _logits, _run, build

ALL = torch.arange(1 << 16)


def _in_e8(v: torch.Tensor) -> torch.Tensor:
    """Rows of v in E8 = D8 ∪ (D8 + 1/2): all integers or all half-integers, with an even sum."""
    twice = v * 2
    integral = (twice.remainder(2) == 0).all(1)
    half = (twice.remainder(2) == 1).all(1)
    even = v.sum(1).round().remainder(2) == 0
    return (integral | half) & even & (twice == twice.round()).all(1)


def test_codebook_is_the_papers_construction():
    # D̂8 = D8 + 1/2 inside the ball of squared radius 10, enumerated over its coordinates
    half = [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    pts = torch.tensor(list(itertools.product(half, repeat=8)))
    pts = pts[(pts.sum(1).round().remainder(2) == 0) & (pts.pow(2).sum(1) <= 10)]
    patterns = {tuple(p) for p in pts.abs().tolist()}
    assert len(patterns) == 227
    grid = abs_grid()
    assert {tuple(p) for p in grid[:227].tolist()} == patterns
    # the 29 added patterns: five 3/2 and three 1/2 (squared norm 12), none repeated
    extra = grid[227:]
    assert extra.shape == (29, 8) and len({tuple(p) for p in extra.tolist()}) == 29
    assert ((extra == 1.5).sum(1) == 5).all() and ((extra == 0.5).sum(1) == 3).all()
    assert torch.equal(extra * 2, torch.tensor(NORM12, dtype=torch.float32))
    # every sign pattern with an even sum, shifted by ±1/4: 256 * 2^7 * 2 codewords
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=8)))
    built = []
    for a in grid:
        sa = signs * a
        sa = sa[sa.sum(1).round().remainder(2) == 0]
        assert sa.shape[0] == 128
        built += [sa + 0.25, sa - 0.25]
    built = torch.cat(built)
    decoded = decode_words(ALL)
    assert torch.unique(decoded, dim=0).shape[0] == 1 << 16
    assert {tuple(v) for v in decoded.tolist()} == {tuple(v) for v in built.tolist()}
    assert _in_e8(decoded - 0.25).all()


def test_word_layout():
    # pattern 0 is (1/2, ..., 1/2) (sum 4, even): no signs, shift bit set -> all 3/4
    assert torch.equal(decode_words(torch.tensor([1 << 15])), torch.full((1, 8), 0.75))
    # sign bit of coordinate 0 set: the sum turns odd, so coordinate 7 is negated too; shift -1/4
    v = decode_words(torch.tensor([1 << 8]))[0]
    assert torch.equal(v, torch.tensor([-0.75, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, -0.75]))


def test_nearest_equals_brute_force_over_all_codewords():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 8, generator=g) * torch.tensor([0.5, 1.0, 2.0]).repeat_interleave(1000)[:, None]
    words = nearest_words(X)
    C = decode_words(ALL)
    d = (X.pow(2).sum(1, keepdim=True) - 2 * X @ C.T + C.pow(2).sum(1)).min(1).values
    got = (X - decode_words(words)).pow(2).sum(1)
    assert torch.allclose(got, d.clamp_min(0), atol=1e-4)


def test_gaussian_distortion_beats_scalar_two_bits():
    # E8P at its scale: ~0.091 per coordinate on a unit Gaussian, below the 2-bit Lloyd-Max
    # scalar quantizer's 0.1175 (the published optimum of any 2-bit scalar grid)
    X = torch.randn(40000, 8, generator=torch.Generator().manual_seed(1))
    best = OPT_SCALE
    mse = {m: float((decode_words(nearest_words(X * m)) / m - X).pow(2).mean()) for m in (0.9, best, 1.2)}
    assert mse[best] < 0.095 < 0.1175
    assert mse[best] < mse[0.9] and mse[best] < mse[1.2]


def test_decode_is_the_rotated_codewords_and_bits_are_counted():
    rows, cols = 48, 96      # 48 = 4 * 12 (Paley), 96 = 8 * 12
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2))
    codes, params = quip.quantize_matrix(W, torch.eye(cols), "w", quip.Options())
    qt = lowbit.tensor.QuantizedTensor(codes, params, E8P(), cols, (rows, cols))
    seeds = int(params["row_seed"]), int(params["col_seed"])
    U, V = rotation(rows, seeds[0])[0], rotation(cols, seeds[1])[0]
    words = sum(codes.reshape(-1, 8).long()[:, k] << (2 * k) for k in range(8))
    Wt = decode_words(words).reshape(rows, cols).double() * params["scale"].double()
    assert torch.allclose(qt.dequantize().double(), U @ Wt @ V.T, atol=1e-5)
    # 2 bits per weight, an fp16 scale per row, two int64 seeds
    assert qt.nbytes == rows * cols * 2 // 8 + rows * 2 + 16 == qt.packed_codes().numel() + rows * 2 + 16
    again = lowbit.tensor.QuantizedTensor.from_packed(qt.meta(), qt.packed_codes(), qt.params)
    assert torch.equal(again.dequantize(), qt.dequantize())
    # incoherence is what makes the lattice fit: the relative error is near the Gaussian figure
    rel = float((qt.dequantize() - W).pow(2).mean() / W.pow(2).mean())
    assert rel < 0.12


def test_block_ldlq_beats_plain_rounding_on_the_layer_loss():
    g = torch.Generator().manual_seed(3)
    rows, cols = 32, 64
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(512, 8, generator=g) @ torch.randn(8, cols, generator=g) + 0.1 * torch.randn(512, cols, generator=g)
    H = X.T @ X
    codes, params = quip.quantize_matrix(W, H, "w", quip.Options())
    ldlq = E8P().decode(codes, E8P().load_params(params))
    plain = E8P().decode(E8P().encode(W, E8P().load_params(params)), E8P().load_params(params))

    def loss(Q):
        E = (W - Q).double()
        return float(torch.einsum("ij,jk,ik->", E, H.double(), E))

    assert loss(ldlq) < 0.7 * loss(plain)


def test_quip_method_beats_the_formats_plain_rounding(tokenizer, calib):
    more = dataclasses.replace(calib, samples=16)
    ids = more.windows(tokenizer)[:8]
    ref = _logits(build("llama"), ids)
    err = {}
    for key, scheme, method in [("quip", lowbit.WeightScheme("e8p", None, -1), "quip"),
                                ("rtn", lowbit.WeightScheme("e8p", None, -1), "rtn")]:
        qm = _run("llama", tokenizer, more, scheme, method)
        err[key] = float((_logits(qm.model, ids) - ref).pow(2).mean())
    # (against GPTQ's int2 at the same storage on a real model: bench/methods.py; this tiny random
    # model's Gaussian weights are incoherent already, so it says nothing about that)
    assert err["quip"] < 0.5 * err["rtn"], err


def test_quip_cli_reloads_packed_and_bad_input_is_one_line(tiny_llama, tmp_path, calib, capsys):
    out = quantize_reload_and_refuse(tiny_llama, tmp_path, calib, capsys, "quip", "e8p", [
        (["--method", "gptq", "--format", "e8p"], "--method quip (or rtn)"),
        (["--method", "quip", "--format", "int", "--bits", "2"], "--format e8p")])
    for to in ("gguf", "compressed-tensors", "gptq", "awq"):     # only lowbit decodes U W̃ Vᵀ
        dest = tmp_path / f"out-{to}"
        assert main(["export", str(out), "--to", to, "-o", str(dest)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "e8p" in err[0] and not dest.exists(), (to, err)


def test_rtn_is_nearest_rounding_and_rows_not_a_multiple_of_eight_are_refused():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    qt = lowbit.quantize_tensor(W, lowbit.WeightScheme("e8p", None, -1))
    p = qt.float_params()
    assert (int(p["row_seed"]), int(p["col_seed"])) == (0, 1)
    assert torch.equal(qt.codes, E8P().encode(W, {**p, "scale": p["scale"].expand(16, 64)}))
    with pytest.raises(SchemeError, match="multiple of 8"):
        lowbit.quantize_tensor(torch.randn(4, 60), lowbit.WeightScheme("e8p", None, -1))
