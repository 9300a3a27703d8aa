import pytest
import torch

from lowbit import WeightScheme, quantize_tensor
from lowbit.errors import SchemeError
from lowbit.formats.packing import pack, packed_nbytes, unpack
from lowbit.observers import AmaxHistory, kl_threshold
from lowbit.tensor import QuantizedTensor


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_packing_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, 29), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    assert torch.equal(unpack(packed, bits, codes.numel()).view(37, 29), codes)


def test_packing_layout_is_little_endian():
    # independent: the first code sits in the low bits of the first byte
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 0, 0, 3], dtype=torch.uint8), 2).tolist() == [0b11000001]
    # 3-bit stream: codes 5 (101), 3 (011), 7 (111) -> bits 101 110 111 (LSB first) -> 0b11011101, 0b1
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 0b1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_exact_on_grid_values(bits, symmetric):
    # weights already on an integer grid with power-of-two scales are reproduced exactly
    g = torch.Generator().manual_seed(0)
    rows, cols, gs = 16, 64, 32
    scale = 2.0 ** torch.randint(-6, -2, (rows, cols // gs), generator=g).float()
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        q = torch.randint(-qmax, qmax + 1, (rows, cols), generator=g).float()
        q[:, ::gs] = qmax  # each group reaches the top of its range
    else:
        q = torch.randint(0, 1 << bits, (rows, cols), generator=g).float()
        q[:, ::gs] = 0
        q[:, 1::gs] = (1 << bits) - 1
        q = q - (1 << (bits - 1))  # zero lies on the grid
    w = q * scale.repeat_interleave(gs, dim=1)
    qt = quantize_tensor(w, WeightScheme("int", bits, gs, symmetric))
    assert torch.equal(qt.dequantize(), w)


@pytest.mark.parametrize("scheme", [WeightScheme("int", 4, 32, True), WeightScheme("int", 3, 128, False),
                                    WeightScheme("int", 8, -1, True), WeightScheme("int", 4, 32, False, "float")])
def test_error_bounded_by_half_scale(scheme):
    w = torch.randn(48, 576, generator=torch.Generator().manual_seed(1))
    qt = quantize_tensor(w, scheme)
    p = qt.float_params()
    scale = p["scale"].repeat_interleave(qt.group_size, dim=1)[:, :576]
    assert ((qt.dequantize() - w).abs() <= scale / 2 + 1e-6).all()


def test_partial_last_group_keeps_shape_and_fits_its_own_values():
    w = torch.randn(8, 576)
    w[:, 512:] *= 100  # the last (partial) group has a much larger range
    qt = quantize_tensor(w, WeightScheme("int", 4, 128, True))
    assert qt.params["scale"].shape == (8, 5)
    assert qt.codes.shape == (8, 576) and qt.dequantize().shape == (8, 576)
    amax_tail = w[:, 512:].abs().amax(dim=1)
    assert torch.allclose(qt.float_params()["scale"][:, 4], amax_tail / 7, rtol=1e-3)
    amax_head = w[:, :128].abs().amax(dim=1)
    assert torch.allclose(qt.float_params()["scale"][:, 0], amax_head / 7, rtol=1e-3)


def test_per_tensor_and_per_channel():
    w = torch.randn(10, 64)
    t = quantize_tensor(w, WeightScheme("int", 8, 0))
    assert t.params["scale"].numel() == 1
    c = quantize_tensor(w, WeightScheme("int", 8, -1))
    assert c.params["scale"].shape == (10, 1)
    assert (c.dequantize() - w).abs().max() <= (t.dequantize() - w).abs().max() + 1e-6


def test_bits_per_weight_counts_scales_and_zeros():
    w = torch.randn(4, 128)
    assert quantize_tensor(w, WeightScheme("int", 4, 32, True)).bits_per_weight == 4 + 16 / 32
    assert quantize_tensor(w, WeightScheme("int", 4, 32, False)).bits_per_weight == 4 + (16 + 8) / 32


def test_mse_observer_lowers_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    w[0, 0] = 20  # an outlier
    e_minmax = (quantize_tensor(w, WeightScheme("int", 3, -1, False)).dequantize() - w).pow(2).sum()
    e_mse = (quantize_tensor(w, WeightScheme("int", 3, -1, False, observer="mse")).dequantize() - w).pow(2).sum()
    assert e_mse < e_minmax


def test_percentile_clips_outliers():
    w = torch.randn(1, 10000, generator=torch.Generator().manual_seed(4))
    w[0, 0] = 1000
    qt = quantize_tensor(w, WeightScheme("int", 8, -1, True, observer="percentile", percentile=99.0))
    assert qt.float_params()["scale"].item() * 127 < 10


def test_kl_threshold_clips_long_tail():
    x = torch.randn(100000, generator=torch.Generator().manual_seed(5))
    x[:10] = 50
    t = kl_threshold(x)
    assert 2 < t < 50


def test_amax_history_uses_past_maximum():
    h = AmaxHistory(length=2, fmt_max=448.0)
    assert h.scale() == 1.0
    h.update(torch.tensor([1.0, -4.0]))
    h.update(torch.tensor([2.0]))
    assert h.scale() == 4.0 / 448
    h.update(torch.tensor([3.0]))  # the 4.0 left the window
    assert h.scale() == 3.0 / 448


def test_storage_round_trip():
    w = torch.randn(12, 100)
    qt = quantize_tensor(w, WeightScheme("int", 3, 32, False))
    back = QuantizedTensor.from_packed(qt.meta(), qt.packed_codes(), qt.params)
    assert torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("kwargs,msg", [(dict(bits=9), "2..8 bits"), (dict(bits=1), "2..8 bits"),
                                        (dict(format="int9"), "unknown format"), (dict(group_size=-3), "group size")])
def test_bad_schemes_are_clear(kwargs, msg):
    with pytest.raises(SchemeError, match=msg):
        WeightScheme(**{"format": "int", **kwargs})


def test_group_larger_than_row():
    with pytest.raises(SchemeError, match="larger than the row"):
        quantize_tensor(torch.randn(4, 64), WeightScheme("int", 4, 128))


def test_3d_and_transposed_layouts():
    w = torch.randn(3, 20, 64)  # stacked experts (E, out, in)
    qt = quantize_tensor(w, WeightScheme("int", 8, 32))
    assert qt.codes.shape == (60, 64) and qt.dequantize().shape == w.shape
    assert (qt.dequantize() - w).abs().max() < 0.05
    wt = torch.randn(64, 20)  # Conv1D (in, out): groups must run along `in` (dim 0)
    qt = quantize_tensor(wt, WeightScheme("int", 8, 32), transposed=True)
    assert qt.codes.shape == (20, 64) and torch.allclose(qt.dequantize(), wt, atol=0.05)
