import pytest
import torch

from lowbit import WeightScheme, quantize_tensor
from lowbit.errors import SchemeError
from lowbit.formats.integer import IntFormat
from lowbit.methods.hqq import _group_mean, hqq_optimize, quantize_weight, shrink_lp
from lowbit.tensor import fit_groups, group_index


def heavy_tailed(shape=(256, 576), scale=1.0, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample(shape) * scale


def lp_objective(err, p=0.7):
    return err.abs().pow(p).sum().item()


@pytest.mark.parametrize("scale", [1.0, 0.02])
@pytest.mark.parametrize("group", [64, 128])  # 576 = 4*128 + 64: group 128 has a partial last group
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_beats_rtn_minmax(bits, group, scale):
    w = heavy_tailed(scale=scale)
    scheme = WeightScheme("int", bits, group, False, "float")
    hqq = quantize_weight(w, scheme).dequantize()
    rtn = quantize_tensor(w, scheme).dequantize()
    for name, metric in [("frobenius", lambda e: e.norm().item()), ("lp0.7", lp_objective),
                         ("l1", lambda e: e.abs().mean().item())]:
        h, r = metric(w - hqq), metric(w - rtn)
        assert h < 0.99 * r, f"{name}: hqq {h:.5g} vs rtn {r:.5g}"


def test_result_deterministic_and_well_formed():
    w = heavy_tailed(seed=1)
    scheme = WeightScheme("int", 3, 128, False, "float")
    a, b = quantize_weight(w, scheme), quantize_weight(w, scheme)
    assert torch.equal(a.codes, b.codes)
    assert a.params.keys() == b.params.keys() == {"scale", "min"}
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
        assert a.params[k].dtype == torch.float16
        assert a.params[k].shape == (256, 5)  # 4 full groups + the partial one
    assert a.format == IntFormat(3, symmetric=False, zero_point="float")
    assert a.codes.dtype == torch.uint8 and a.codes.shape == (256, 576)
    assert int(a.codes.max()) <= 7
    assert a.dequantize().shape == w.shape
    # codes are exactly what the stored parameters encode to (encode and decode agree)
    fmt = a.format
    pe = {k: v[:, group_index(576, 128)] for k, v in a.float_params().items()}
    assert torch.equal(fmt.encode(w, pe), a.codes)


def test_transposed_and_stacked_layouts():
    w = heavy_tailed((2, 48, 96), seed=2)  # stacked experts (E, out, in)
    q = quantize_weight(w, WeightScheme("int", 4, 32, False, "float"))
    assert q.dequantize().shape == w.shape
    wt = heavy_tailed((96, 48), seed=3)  # Conv1D-style (in, out)
    qt = quantize_weight(wt, WeightScheme("int", 4, 32, False, "float"), transposed=True)
    assert qt.codes.shape == (48, 96) and qt.dequantize().shape == wt.shape
    assert (qt.dequantize() - wt).abs().max() < (wt.max() - wt.min()) / 15


@pytest.mark.parametrize("group", [-1, 0])
def test_per_channel_and_per_tensor(group):
    w = heavy_tailed((64, 128), seed=4)
    scheme = WeightScheme("int", 4, group, False, "float")
    h = (w - quantize_weight(w, scheme).dequantize()).norm()
    r = (w - quantize_tensor(w, scheme).dequantize()).norm()
    assert h <= r


def test_constant_and_zero_groups_stay_finite():
    w = heavy_tailed((8, 64), seed=5)
    w[0] = 0.0
    w[1] = 0.25
    q = quantize_weight(w, WeightScheme("int", 2, 32, False, "float"))
    out = q.dequantize()
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], w[0], atol=1e-3) and torch.allclose(out[1], w[1], atol=1e-3)


@pytest.mark.parametrize("kwargs, hint", [
    (dict(symmetric=True), "--asym"),
    (dict(symmetric=False, zero_point="int"), "--zero-point float"),
])
def test_rejects_schemes_without_float_zero(kwargs, hint):
    w = heavy_tailed((16, 64))
    with pytest.raises(SchemeError, match=hint) as e:
        quantize_weight(w, WeightScheme("int", 4, 32, **kwargs))
    assert "\n" not in str(e.value)


def test_rejects_non_integer_formats():
    with pytest.raises(SchemeError, match="integer"):
        quantize_weight(heavy_tailed((16, 64)), WeightScheme("nf4", None, 64))


def test_group_mean_uses_only_each_groups_columns():
    X = torch.arange(2 * 10, dtype=torch.float32).view(2, 10)
    gidx = group_index(10, 4)  # groups of 4, 4, 2
    got = _group_mean(X, gidx, 3, 2)
    want = torch.stack([X[:, 0:4].mean(1), X[:, 4:8].mean(1), X[:, 8:10].mean(1)], dim=1)
    assert torch.allclose(got, want)
    # one parameter row (per-tensor): averaged over rows too
    want1 = torch.stack([X[:, 0:4].mean(), X[:, 4:8].mean(), X[:, 8:10].mean()]).unsqueeze(0)
    assert torch.allclose(_group_mean(X, gidx, 3, 1), want1)


def test_shrink_lp():
    x = torch.tensor([-2.0, -0.01, 0.0, 0.01, 2.0])
    y = shrink_lp(x, beta=10.0, p=0.7)
    assert y[1] == 0 and y[2] == 0 and y[3] == 0  # small residuals are treated as noise
    assert torch.allclose(y[4], torch.tensor(2.0 - 0.1 * 2.0 ** -0.3)) and torch.allclose(y[0], -y[4])
    assert torch.allclose(shrink_lp(x, 10.0, 1.0), torch.sign(x) * torch.relu(x.abs() - 0.1))


def test_hqq_optimize_keeps_the_best_iterate_per_group():
    W = heavy_tailed((64, 200), seed=6)  # 200 = 3*64 + 8: a short last group
    fmt = IntFormat(3, symmetric=False, zero_point="float")
    gidx = group_index(200, 64)
    p = fit_groups(fmt, W, 64)
    z0 = -p["min"] / p["scale"]
    z = hqq_optimize(W, p["scale"], z0, 3, gidx)
    assert z.shape == z0.shape == (64, 4)

    def group_l1(zero):
        s, zx = p["scale"][:, gidx], zero[:, gidx]
        Wr = (torch.round(W / s + zx).clamp(0, 7) - zx) * s
        return _group_mean((W - Wr).abs(), gidx, 4, 64)

    e0, e = group_l1(z0), group_l1(z)
    assert (e <= e0).all()
    assert e.sum() < 0.97 * e0.sum()
    assert torch.equal(hqq_optimize(W, p["scale"], z0, 3, gidx, iters=0), z0)
