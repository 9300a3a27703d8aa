"""GGUF block formats decode bit for bit like llama.cpp (gguf-py's reference dequantizers)."""

import numpy as np
import pytest
import torch
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import lowbit
from lowbit.errors import SchemeError
from lowbit.formats import make_format
from lowbit.formats.gguf_blocks import GGUF_TYPES, from_gguf_bytes, to_gguf_bytes

NAMES = list(GGUF_TYPES)
LEGACY = [n for n in NAMES if GGML_QUANT_SIZES[GGUF_TYPES[n]][0] == 32]
BLOCK256 = [n for n in NAMES if GGML_QUANT_SIZES[GGUF_TYPES[n]][0] == 256]
KQUANTS = [n for n in BLOCK256 if n.endswith("_k")]


def _scheme(name, **kw):
    return lowbit.WeightScheme(format=name, bits=None, group_size=-1, **kw)


def _shapes(name):
    shapes = [(64, 256), (3, 512)]
    return shapes + ([(16, 576)] if name in LEGACY else [])


def _gguf_dequant(data, name) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gq.dequantize(data, GGUF_TYPES[name]), dtype=np.float32))


def _assert_same_qt(a, b):
    assert torch.equal(a.codes, b.codes)
    assert set(a.params) == set(b.params)
    for k in a.params:
        assert a.params[k].dtype == b.params[k].dtype, k
        assert torch.equal(a.params[k], b.params[k]), k


def test_type_table_covers_twenty_two_types():
    assert len(GGUF_TYPES) == 22
    assert set(LEGACY) == {"gguf_q8_0", "gguf_q4_0", "gguf_q4_1", "gguf_q5_0", "gguf_q5_1", "gguf_iq4_nl", "gguf_mxfp4"}


@pytest.mark.parametrize("name", NAMES)
def test_group_size_is_the_fixed_sub_block(name):
    expected = {"gguf_q2_k": 16, "gguf_q3_k": 16, "gguf_q6_k": 16, "gguf_q4_k": 32, "gguf_q5_k": 32,
                "gguf_tq2_0": 256, "gguf_tq1_0": 256, "gguf_iq2_xs": 16, "gguf_iq2_s": 16, "gguf_iq1_m": 16}.get(name, 32)
    assert _scheme(name).effective_group_size() == expected
    assert lowbit.WeightScheme(format=name, bits=None, group_size=128).effective_group_size() == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [0.02, 3.0])
def test_bytes_decode_exactly_like_gguf(name, scale):
    gen = torch.Generator().manual_seed(NAMES.index(name))
    for shape in _shapes(name):
        w = torch.randn(shape, generator=gen) * scale
        w[0, :40] *= 8  # some outliers
        qt = lowbit.quantize_tensor(w, _scheme(name))
        data = to_gguf_bytes(qt)
        block, type_size = GGML_QUANT_SIZES[GGUF_TYPES[name]]
        assert data.dtype == np.uint8
        assert data.shape == (shape[0], shape[1] // block * type_size)
        assert qt.nbytes == data.size  # stored params are the block's own fields
        ref = _gguf_dequant(data, name)
        assert torch.equal(ref, qt.dequantize().float()), f"{name} {shape}"
        _assert_same_qt(from_gguf_bytes(data, name, shape), qt)
        # quality sanity: relative error well below the signal
        rel = ((qt.dequantize() - w).pow(2).mean() / w.pow(2).mean()).item()
        assert rel < {"gguf_q2_k": 0.2, "gguf_q3_k": 0.05, "gguf_tq2_0": 0.7, "gguf_tq1_0": 0.7,
                          "gguf_iq1_s": 0.3, "gguf_iq1_m": 0.25, "gguf_iq2_xxs": 0.2, "gguf_iq2_xs": 0.1,
                          "gguf_iq2_s": 0.08, "gguf_iq3_xxs": 0.05, "gguf_iq3_s": 0.03}.get(name, 0.02), (name, rel)


@pytest.mark.parametrize("name", NAMES)
def test_stored_params_round_trip_exactly(name):
    """Fitting stores parameters twice (fit_groups, then quantize_tensor); it must be idempotent."""
    gen = torch.Generator().manual_seed(1)
    fmt = make_format(name)
    for scale in (1e-5, 1e-3, 0.05, 20.0):
        w = torch.randn(8, 512, generator=gen) * scale
        w[1] = 0.0  # all-zero rows
        w[2, :256] = w[2, :256].abs()  # positive-only super-block (mins are 0)
        qt = lowbit.quantize_tensor(w, _scheme(name))
        again = fmt.store_params(fmt.load_params(qt.params))
        for k in qt.params:
            assert torch.equal(again[k], qt.params[k]), (name, scale, k)
        assert torch.equal(_gguf_dequant(to_gguf_bytes(qt), name), qt.dequantize())


@pytest.mark.parametrize("name", NAMES)
def test_experts_shape_and_observers(name):
    """3-D (experts) weights; observers (bypassed by the k-quant search) keep decoding exact."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(2, 4, 256, generator=gen)
    for observer in ("minmax", "mse", "percentile"):
        qt = lowbit.quantize_tensor(w, _scheme(name, observer=observer))
        data = to_gguf_bytes(qt)
        assert data.shape[0] == 8
        assert torch.equal(_gguf_dequant(data, name).reshape(w.shape), qt.dequantize())
    back = from_gguf_bytes(data, GGUF_TYPES[name].name, (2, 4, 256))  # GGML type names work too
    assert torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("name", BLOCK256)
def test_kquant_needs_256_columns(name):
    with pytest.raises(SchemeError, match="multiple of 256"):
        lowbit.quantize_tensor(torch.randn(4, 576), _scheme(name))


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_needs_32_columns(name):
    with pytest.raises(SchemeError, match="multiple of 32"):
        lowbit.quantize_tensor(torch.randn(4, 40), _scheme(name))


def test_from_gguf_bytes_rejects_wrong_size_and_type():
    with pytest.raises(SchemeError):
        from_gguf_bytes(np.zeros(10, np.uint8), "gguf_q4_0", (1, 32))
    with pytest.raises(SchemeError):
        from_gguf_bytes(np.zeros(18, np.uint8), "IQ2_XXS", (1, 32))


@pytest.mark.parametrize("name", [n for n in NAMES if GGUF_TYPES[n] in (
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1)])
def test_reference_quantizer_bytes_load_and_decode(name):
    """Bytes from gguf-py's reference quantizer load, decode like gguf, and serialise back unchanged."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 576)) * 0.1).astype(np.float32)
    data = gq.quantize(w, GGUF_TYPES[name])
    qt = from_gguf_bytes(data, name, w.shape)
    assert torch.equal(qt.dequantize(), _gguf_dequant(data, name))
    assert np.array_equal(to_gguf_bytes(qt), data)
    # lowbit's own fit is the same reference quantizer, up to rounding of ties and fp16 scale use
    ours = lowbit.quantize_tensor(torch.from_numpy(w), _scheme(name)).dequantize()
    ref_err = (qt.dequantize() - torch.from_numpy(w)).pow(2).mean()
    assert (ours - torch.from_numpy(w)).pow(2).mean() <= ref_err * 1.05


@pytest.mark.parametrize("name", KQUANTS)
def test_random_kquant_bytes_round_trip(name):
    """Arbitrary valid blocks (any d, any scale integers) load and re-serialise byte for byte."""
    rng = np.random.default_rng(4)
    block, type_size = GGML_QUANT_SIZES[GGUF_TYPES[name]]
    data = rng.integers(0, 256, size=(5, 2 * type_size), dtype=np.uint8)
    # keep the fp16 fields finite: clear the exponent's top bit of each fp16 d/dmin
    fp16_at = {"gguf_q2_k": [80, 82], "gguf_q3_k": [108], "gguf_q4_k": [0, 2], "gguf_q5_k": [0, 2],
               "gguf_q6_k": [208]}[name]
    for b in range(2):
        for off in fp16_at:
            data[:, b * type_size + off + 1] &= 0x3F
    qt = from_gguf_bytes(data, name, (5, 2 * block))
    assert np.array_equal(to_gguf_bytes(qt), data)
    assert torch.equal(qt.dequantize(), _gguf_dequant(data, name))


def _quantize_with(fmt, w, observer="minmax"):
    from lowbit.tensor import QuantizedTensor, encode_matrix, fit_groups

    g = fmt.fixed_group_size
    p = fit_groups(fmt, w, g, observer)
    return QuantizedTensor(encode_matrix(fmt, w, p, g), fmt.store_params(p), fmt, g, tuple(w.shape))


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_search_beats_minmax_and_search_off_is_exact(name):
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(5)) * 0.02

    def rel(qt):
        return ((qt.dequantize() - w).pow(2).mean() / w.pow(2).mean()).item()

    searched = lowbit.quantize_tensor(w, _scheme(name))
    for observer in ("minmax", "mse"):
        plain = _quantize_with(make_format(name, search=False), w, observer)
        assert torch.equal(_gguf_dequant(to_gguf_bytes(plain), name), plain.dequantize())
        assert rel(searched) < rel(plain), (name, observer)


@pytest.mark.parametrize("name", NAMES)
def test_lowbit_packed_round_trip(name):
    from lowbit.tensor import QuantizedTensor

    qt = lowbit.quantize_tensor(torch.randn(4, 512), _scheme(name))
    back = QuantizedTensor.from_packed(qt.meta(), qt.packed_codes(), qt.params)
    _assert_same_qt(back, qt)
    assert back.format == qt.format


@pytest.mark.parametrize("name,shape", [("gguf_q8_0", (49152, 576)), ("gguf_q4_0", (576, 1536)),
                                        ("gguf_q6_k", (576, 1536)), ("gguf_q4_k", (2048, 256))])
def test_model_shapes_decode_exactly(name, shape):
    """SmolLM2's shapes: 49152-row embedding, 576/1536-wide rows."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.05
    qt = lowbit.quantize_tensor(w, _scheme(name))
    assert torch.equal(_gguf_dequant(to_gguf_bytes(qt), name), qt.dequantize().float())


@pytest.mark.parametrize("name", ["gguf_iq4_nl", "gguf_iq4_xs"])
def test_iq4_scale_search_beats_the_range_fit_and_q4_0(name):
    """llama.cpp's IQ4 scale search (ntry 7) fits better than the plain d = max / -127, and the
    non-linear grid beats Q4_0's uniform one on Gaussian weights at the same 4.5 bits."""
    from lowbit.tensor import QuantizedTensor, encode_matrix

    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(9)) * 0.02
    fmt = make_format(name)

    def rel(qt):
        return ((qt.dequantize() - w).pow(2).mean() / w.pow(2).mean()).item()

    searched = lowbit.quantize_tensor(w, _scheme(name))
    blocks = w.reshape(32, -1, 32)
    plain_p = fmt.load_params(fmt.store_params(fmt.params_from_range(blocks.amin(-1), blocks.amax(-1), {})))
    plain = QuantizedTensor(encode_matrix(fmt, w, plain_p, 32), fmt.store_params(plain_p), fmt, 32, tuple(w.shape))
    assert rel(searched) < rel(plain)
    assert rel(searched) < rel(lowbit.quantize_tensor(w, _scheme("gguf_q4_0")))


def test_tq1_0_packs_five_trits_per_byte_and_codes_survive_native_storage():
    """Every base-3 byte value decodes back to its five trits; a TQ1_0 tensor stores 52 + 2 bytes
    per 256 weights natively too (1.6875 bits/weight), and its packed codes unpack exactly."""
    from lowbit.formats.gguf_blocks import _pack_tq1, _unpack_tq1

    gen = np.random.default_rng(0)
    q = gen.integers(0, 3, size=(64, 256)).astype(np.uint8)
    q[0] = 2
    q[1] = 0
    assert np.array_equal(_unpack_tq1(_pack_tq1(q)), q)
    w = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    qt = lowbit.quantize_tensor(w, _scheme("gguf_tq1_0"))
    assert qt.bits_per_weight == 1.6875
    assert torch.equal(qt.format.unpack_codes(qt.packed_codes(), qt.numel).view(3, 768), qt.codes)
