"""llama.cpp's lattice-grid i-quants (IQ3_S ... IQ1_S): gguf-py decodes lowbit's bytes to lowbit's
values bit for bit, any block bytes survive lowbit's reader and writer unchanged, the encoder's
projection is the exact weighted nearest grid point, GPTQ's joint-vector step, the llama.cpp mixes,
and llama.cpp runs the files."""

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import lowbit
from lowbit.errors import SchemeError
from lowbit.formats.base import make_format
from lowbit.formats.gguf_blocks import from_gguf_bytes, to_gguf_bytes
from lowbit.formats.gguf_iq import IQ_GRID_FORMATS, grid_points
from lowbit.methods.gptq import GPTQOptions, gptq_quantize
from lowbit.plan.gguf_mixes import tensor_type_for
from lowbit.scheme import WeightScheme
from lowbit.tensor import QuantizedTensor, quantize_tensor

# bits per weight, from the smallest
ORDER = ["gguf_iq1_s", "gguf_iq1_m", "gguf_iq2_xxs", "gguf_iq2_xs", "gguf_iq2_s", "gguf_iq3_xxs", "gguf_iq3_s"]


def _ggml(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.removeprefix("gguf_").upper()]


def _weights(rows=16, cols=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[:, 7] *= 8            # an outlier column, and an all-zero super-block
    if rows > 3 and cols > 256:
        W[3, 256:] = 0
    return W


@pytest.mark.parametrize("name", IQ_GRID_FORMATS)
def test_gguf_py_decodes_lowbit_bytes_bit_for_bit(name):
    W = _weights()
    qt = quantize_tensor(W, WeightScheme(name, None, -1))
    data = to_gguf_bytes(qt)
    block, type_size = GGML_QUANT_SIZES[_ggml(name)]
    assert data.shape == (W.shape[0], W.shape[1] // block * type_size)
    ref = gq.dequantize(data, _ggml(name)).reshape(W.shape)
    assert np.array_equal(ref, qt.dequantize().numpy())
    back = from_gguf_bytes(data, name, W.shape)
    assert torch.equal(back.codes, qt.codes)
    assert all(torch.equal(back.params[k], qt.params[k]) for k in qt.params)
    # lowbit's own storage is exactly the GGUF size, and its codes pack and unpack losslessly
    fmt = qt.format
    packed = fmt.pack_codes(qt.codes)
    assert packed.numel() + sum(v.numel() * v.element_size() for v in qt.params.values()) == data.size
    assert torch.equal(fmt.unpack_codes(packed, qt.codes.numel()).reshape(W.shape), qt.codes)
    assert not torch.equal(qt.dequantize()[3, 256:], torch.full((256,), float("nan")))
    assert (qt.dequantize()[3, 256:] == 0).all()


@pytest.mark.parametrize("name", IQ_GRID_FORMATS)
def test_any_block_bytes_read_and_write_back_unchanged(name):
    """Random blocks (a finite fp16 d): lowbit reads every field llama.cpp stores and writes the
    same bytes back, and its values equal gguf-py's."""
    block, type_size = GGML_QUANT_SIZES[_ggml(name)]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(6, 2 * type_size), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-2, size=(6, 2)).astype(np.float16).view(np.uint8).reshape(6, 2, 2)
    for b in range(2):
        if name == "gguf_iq1_m":   # d's four nibbles sit in the top of the last four uint16 scales
            words = data[:, b * type_size + 48: b * type_size + 56].copy().view(np.uint16)
            dbits = d[:, b].copy().view(np.uint16)[:, 0]
            words = (words & 0x0FFF) | (((dbits[:, None] >> (4 * np.arange(4))) & 0xF) << 12).astype(np.uint16)
            data[:, b * type_size + 48: b * type_size + 56] = words.view(np.uint8)
        else:
            data[:, b * type_size: b * type_size + 2] = d[:, b]
    qt = from_gguf_bytes(data, name, (6, 2 * block))
    assert np.array_equal(to_gguf_bytes(qt), data)
    assert np.array_equal(qt.dequantize().numpy(), gq.dequantize(data, _ggml(name)).reshape(6, -1))


@pytest.mark.parametrize("name", ["gguf_iq2_xs", "gguf_iq3_xxs", "gguf_iq1_m", "gguf_iq1_s"])
def test_projection_is_the_weighted_nearest_grid_point(name):
    """Given the scales, each vector's code is the grid point (with its signs / delta) of least
    weighted squared error, found here by enumerating every choice."""
    fmt = make_format(name)
    W = _weights(rows=2, cols=256, seed=3)
    x = W.float()
    s = torch.full((2, 256 // fmt.vector_dim), float(W.abs().max()) / 30)
    w = torch.rand(2, 256, generator=torch.Generator().manual_seed(4)) + 0.1
    codes = fmt.encode_weighted(x, s, w)
    got = fmt.decode(codes, {"scale": s.repeat_interleave(fmt.vector_dim, dim=1)})
    G = grid_points(fmt.grid_class).double()
    D = fmt.vector_dim
    for r in range(2):
        if fmt.signs == "none":   # IQ1: every grid point with either delta (IQ1_S: one delta per 32)
            unit = fmt.encode_unit
            for u in range(0, 256, unit):
                best = None
                for dsign in (1.0, -1.0):
                    err = 0.0
                    for v in range(u, u + unit, D):
                        t = x[r, v: v + D].double() / s[r, 0].double()
                        e = (w[r, v: v + D].double() * (t - (G + dsign * fmt.delta)) ** 2).sum(1)
                        err += float(e.min())
                    best = err if best is None else min(best, err)
                mine = float((w[r, u: u + unit].double() * (x[r, u: u + unit].double() / s[r, 0].double()
                                                            - got[r, u: u + unit].double() / s[r, 0].double()) ** 2).sum())
                assert mine <= best * (1 + 1e-5) + 1e-9
        else:                      # signs fixed by the data (parity: the least important flips)
            for v in range(0, 256, D):
                t = x[r, v: v + D].double() / s[r, 0].double()
                sign = torch.where(got[r, v: v + D] < 0, -1.0, 1.0).double()
                e = (w[r, v: v + D].double() * (t - sign * G) ** 2).sum(1)
                mine = float((w[r, v: v + D].double() * (t - got[r, v: v + D].double() / s[r, 0].double()) ** 2).sum())
                assert mine <= float(e.min()) * (1 + 1e-5) + 1e-9
    if fmt.signs == "parity":      # an even number of negative signs in every group of 8
        _, neg, _ = fmt.split(codes)
        assert (neg.reshape(2, -1, 8).sum(-1) % 2 == 0).all()


def test_more_bits_less_error():
    W = torch.randn(32, 512, generator=torch.Generator().manual_seed(5))
    errs = [float((quantize_tensor(W, WeightScheme(n, None, -1)).dequantize() - W).norm() / W.norm()) for n in ORDER]
    assert errs == sorted(errs, reverse=True), dict(zip(ORDER, errs))
    assert errs[-1] < 0.15 and errs[0] < 0.55


def test_gptq_joint_vectors():
    """GPTQ on correlated inputs beats RTN in the Hessian norm; with a diagonal Hessian no error
    feeds forward, so its codes are the weighted projection on the scales it fitted."""
    g = torch.Generator().manual_seed(6)
    rows, cols = 32, 512
    X = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.1 + torch.eye(cols))
    H = X.T @ X / 1024
    W = torch.randn(rows, cols, generator=g) * 0.02
    for name in ("gguf_iq2_xxs", "gguf_iq1_s"):
        fmt = make_format(name)
        codes, params = gptq_quantize(W, H, fmt, fmt.fixed_group_size, "minmax", 99.9, GPTQOptions())
        q = QuantizedTensor(codes, fmt.store_params(params), fmt, fmt.fixed_group_size, W.shape, False).dequantize()
        r = quantize_tensor(W, WeightScheme(name, None, -1), importance=torch.diag(H)).dequantize()

        def herr(Wq):
            return float(torch.trace((W - Wq) @ H @ (W - Wq).T))

        assert herr(q) < 0.8 * herr(r)
    fmt = make_format("gguf_iq2_xs")
    Hd = torch.diag(torch.rand(cols, generator=g) + 0.5)
    codes, params = gptq_quantize(W, Hd, fmt, 16, "minmax", 99.9, GPTQOptions(act_order=False, damp=0.0))
    s = fmt.load_params(fmt.store_params(params))["scale"].repeat_interleave(16, dim=1)[:, ::8]
    assert torch.equal(codes, fmt.encode_weighted(W, s, torch.diag(Hd)[None, :].expand(rows, cols)))


def test_gptq_refuses_pruning_into_a_grid():
    from lowbit.sparsity import Pattern

    fmt = make_format("gguf_iq2_xxs")
    with pytest.raises(SchemeError, match="8 consecutive columns"):
        gptq_quantize(torch.randn(4, 256), torch.eye(256), fmt, 32, "minmax", 99.9, GPTQOptions(act_order=False),
                      prune=Pattern(2, 4))


def test_iq_mixes_follow_llama_cpp():
    n = 32
    t = lambda mix, name, i, cols=4096, **kw: tensor_type_for(mix, name, i, n, cols, **kw)[0]
    assert t("IQ2_XXS", "blk.9.attn_q.weight", 9) == "IQ2_XXS"
    assert t("IQ2_XXS", "blk.9.attn_v.weight", 9) == "Q2_K" and t("IQ2_XXS", "blk.9.attn_v.weight", 9, n_gqa=4) == "Q4_K"
    assert t("IQ2_XXS", "blk.3.ffn_down.weight", 3) == "Q2_K" and t("IQ2_XXS", "blk.4.ffn_down.weight", 4) == "IQ2_XXS"
    assert t("IQ2_XXS", "output.weight", None) == "Q5_K" and t("IQ2_XXS", "token_embd.weight", None) == "Q2_K"
    assert t("IQ1_S", "blk.9.attn_output.weight", 9) == "IQ2_XXS" and t("IQ1_M", "blk.9.ffn_up.weight", 9) == "IQ1_M"
    assert t("IQ2_S", "blk.9.ffn_up.weight", 9) == "IQ2_XS" and t("IQ2_M", "blk.9.ffn_up.weight", 9) == "IQ2_S"
    assert t("IQ2_M", "blk.9.attn_v.weight", 9) == t("IQ2_M", "blk.9.attn_output.weight", 9) == "IQ3_S"
    assert t("IQ2_M", "token_embd.weight", None) == "IQ3_S"
    assert t("IQ3_XXS", "blk.9.attn_q.weight", 9) == t("IQ3_XXS", "blk.9.attn_k.weight", 9) == "IQ2_S"
    assert t("IQ3_XXS", "blk.9.attn_v.weight", 9) == "IQ3_S"
    assert t("IQ3_XXS", "blk.9.attn_v.weight", 9, imatrix=True) == "IQ3_XXS"
    assert t("IQ3_XXS", "blk.3.ffn_down.weight", 3) == "Q4_K" and t("IQ3_XXS", "blk.9.ffn_down.weight", 9) == "Q3_K"
    assert t("IQ3_XXS", "blk.9.ffn_down.weight", 9, imatrix=True) == "IQ3_XXS"
    assert t("IQ3_XS", "blk.9.ffn_up.weight", 9) == "IQ3_XXS" and t("IQ3_XS", "blk.2.ffn_up.weight", 2) == "IQ3_S"
    assert t("IQ3_M", "blk.9.attn_v.weight", 9) == "Q4_K" and t("IQ3_M", "blk.3.ffn_down.weight", 3) == "Q4_K"
    assert t("IQ3_M", "blk.9.ffn_gate.weight", 9) == "IQ3_S" and t("IQ3_M", "output.weight", None) == "Q6_K"
    assert t("TQ1_0", "blk.9.ffn_gate.weight", 9) == "TQ1_0" and t("TQ2_0", "token_embd.weight", None) == "Q4_K"
    # rows 256 does not divide: llama.cpp's fallback for the i-quants is IQ4_NL, for ternary Q4_0
    assert t("IQ2_XXS", "blk.9.attn_q.weight", 9, cols=576) == "IQ4_NL"
    assert t("TQ1_0", "blk.9.attn_q.weight", 9, cols=576) == "Q4_0"
    assert t("Q4_0", "blk.0.ffn_down.weight", 0, imatrix=True) == "Q4_1"
    assert t("IQ4_XS", "blk.0.ffn_down.weight", 0, imatrix=True) == "IQ4_XS"


@pytest.mark.parametrize("name", ["gguf_iq3_s", "gguf_iq2_xxs", "gguf_iq1_m"])
def test_llama_cpp_runs_iq_grids(default_model, tmp_path, name):
    """A tiny LLaMA quantized into an i-quant grid loads in llama.cpp and gives lowbit's logits up
    to llama.cpp's 8-bit rounding of the activations."""
    from lowbit.api import quantize
    from lowbit.export.gguf import write_gguf
    from tests.test_gguf_export import PROMPT, _llama_logits, _model_logits, _tiny, assert_llama_agrees

    fmt = make_format(name)
    lm = _tiny("llama", default_model.tokenizer, hidden=256, intermediate=512)
    # the 49152-row embedding and head stay F32: a grid search over them would dominate the time
    qm = quantize(lm, lowbit.WeightScheme(format=name, bits=None, group_size=fmt.fixed_group_size),
                  exclude=["lm_head", "embed_tokens"], progress=False)
    path = write_gguf(qm, tmp_path / f"{name}.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == name.removeprefix("gguf_").upper()
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    _, L = _llama_logits(path, ids)
    assert_llama_agrees(L, _model_logits(qm.model, ids))


# lowbit's weighted error over llama.cpp's (same weights, same importance), at most
_VS_LLAMA = {"gguf_iq1_s": 0.95, "gguf_iq1_m": 0.95, "gguf_iq2_xxs": 0.97, "gguf_iq2_xs": 0.97, "gguf_iq2_s": 0.98,
             "gguf_iq3_xxs": 0.99, "gguf_iq3_s": 0.95}


@pytest.mark.parametrize("name", IQ_GRID_FORMATS)
def test_error_below_llama_cpp_quantizer(name):
    """Against llama.cpp's own quantizer (ggml_quantize_chunk) on the same Gaussian rows and
    importance: lowbit's importance-weighted error is lower."""
    pytest.importorskip("llama_cpp")
    from lowbit.eval.llama_quant import llama_cpp_quantize

    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 1024, generator=g) * 0.02
    imp = torch.rand(1024, generator=g) * 2 + 0.1
    gt = _ggml(name)
    ref = torch.from_numpy(gq.dequantize(llama_cpp_quantize(W.numpy(), gt.name, imp.numpy()), gt).reshape(W.shape))
    ours = quantize_tensor(W, WeightScheme(name, None, -1), importance=imp).dequantize()

    def err(Q):
        return float((((W - Q) ** 2) * imp).sum() / ((W ** 2) * imp).sum())

    assert err(ours) <= _VS_LLAMA[name] * err(ref), (err(ours), err(ref))
