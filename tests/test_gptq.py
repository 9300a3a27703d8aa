"""GPTQ against independent expectations: RTN on a diagonal Hessian, lower output error on
correlated inputs, every format through the same solver."""

import dataclasses

import pytest
import torch

from lowbit import WeightScheme, quantize_tensor
from lowbit.errors import SchemeError
from lowbit.methods.gptq import Options, gptq_quantize, quantize_weights_sharing_input, to_quantized_tensor
from lowbit.tensor import expand_params, group_index


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d**0.5
    # channels of very different magnitude, like real activations, in no particular order
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    return (torch.randn(n, d, generator=g) @ A + 0.3 * torch.randn(n, d, generator=g)) * scales


def _dequant(codes, params, scheme, cols):
    fmt = scheme.make_format()
    g = scheme.effective_group_size() if scheme.effective_group_size() > 0 else cols
    return fmt.decode(codes, expand_params(params, group_index(cols, g)))


@pytest.mark.parametrize("scheme", [WeightScheme("int", 4, 32, False), WeightScheme("int", 3, -1, True),
                                    WeightScheme("nf4", None, 64)])
def test_diagonal_hessian_equals_rtn(scheme):
    W = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    H = torch.diag(torch.rand(128) + 0.5)
    codes, params = gptq_quantize(W, H, scheme.make_format(), scheme.group_size if scheme.group_size > 0 else 128,
                                  options=Options(act_order=False, damp=0.0))
    rtn = quantize_tensor(W, scheme)
    assert torch.equal(codes, rtn.codes)


@pytest.mark.parametrize("scheme", [WeightScheme("int", 4, 32, False), WeightScheme("int", 3, 32, False),
                                    WeightScheme("int", 4, 128, True), WeightScheme("nf4", None, 64),
                                    WeightScheme("fp4", None, 32), WeightScheme("mxfp4", None, 32),
                                    WeightScheme("nvfp4", None, 16), WeightScheme("fp8_e4m3", None, -1),
                                    WeightScheme("gguf_q4_0", None, -1), WeightScheme("gguf_q4_k", None, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error_vs_rtn(scheme, act_order):
    d = 256
    X = _correlated_inputs(2048, d)
    W = torch.randn(64, d, generator=torch.Generator().manual_seed(2)) * 0.05
    H = X.T @ X
    [(codes, params, g)] = quantize_weights_sharing_input([W], H, scheme, Options(act_order=act_order))
    qt = to_quantized_tensor(codes, params, g, scheme, W.shape, False)
    rtn = quantize_tensor(W, scheme)
    err_gptq = (X @ (W - qt.dequantize()).T).norm()
    err_rtn = (X @ (W - rtn.dequantize()).T).norm()
    assert err_gptq < 0.9 * err_rtn


def test_partial_group_and_stacked_rows_match_separate_solves():
    d = 96  # group 64: one full group and one of 32
    X = _correlated_inputs(512, d, seed=3)
    H = X.T @ X
    scheme = WeightScheme("int", 4, 64, False)
    Wa, Wb = torch.randn(8, d), torch.randn(5, d)
    stacked = quantize_weights_sharing_input([Wa, Wb], H, scheme, Options())
    alone = quantize_weights_sharing_input([Wb], H, scheme, Options())
    assert torch.equal(stacked[1][0], alone[0][0])
    assert stacked[0][1]["scale"].shape == (8, 2)


def test_act_order_keeps_contiguous_groups():
    d = 128
    X = _correlated_inputs(1024, d, seed=4)
    scheme = WeightScheme("int", 4, 32, True)
    W = torch.randn(16, d)
    [(codes, params, g)] = quantize_weights_sharing_input([W], X.T @ X, scheme, Options(act_order=True))
    assert g == 32 and params["scale"].shape == (16, 4)
    # static groups: the scales are RTN's min-max scales of the original weights
    assert torch.equal(params["scale"], quantize_tensor(W, scheme).float_params()["scale"])


@pytest.mark.parametrize("fmt_name,observer", [("gguf_q4_k", "minmax"), ("gguf_q3_k", "minmax"), ("int", "mse")])
def test_importance_weighted_fit_lowers_weighted_error(fmt_name, observer):
    from lowbit.tensor import fit_groups, encode_matrix

    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 256, generator=g)
    importance = torch.ones(256)
    importance[torch.randperm(256, generator=g)[:32]] = 100.0  # a few columns matter much more
    scheme = WeightScheme(fmt_name, 3 if fmt_name == "int" else None, 32 if fmt_name == "int" else -1, False, observer=observer)
    fmt, gs = scheme.make_format(), scheme.effective_group_size()

    def weighted_err(imp):
        p = fit_groups(fmt, W, gs, observer, tensor_params=None, importance=imp)
        Wq = fmt.decode(encode_matrix(fmt, W, p, gs), expand_params(p, group_index(256, gs)))
        return float(((Wq - W) ** 2 * importance).sum())

    assert weighted_err(importance) < weighted_err(None)


def test_staged_propagation_uses_quantized_weights(tiny_llama, calib):
    """A batch parked inside a module while it is quantized must finish with the quantized weights:
    after staged GPTQ the layer outputs fed forward equal those of the quantized model itself."""
    import lowbit.calib.runner as runner
    from lowbit.api import quantize

    fed = []
    original = runner._staged_layer

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        fed.append([o.clone() for o in out])
        return out

    runner._staged_layer = spy
    try:
        qm = quantize(str(tiny_llama), WeightScheme("int", 3, 32, False), method="gptq", calibration=calib, progress=False)
    finally:
        runner._staged_layer = original
    windows = calib.windows(qm.tokenizer)
    captured = []
    h = qm.model.model.layers[0].register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        qm.model(windows[:calib.batch_size], use_cache=False)
    h.remove()
    assert torch.allclose(fed[0][0], captured[0], atol=1e-5)


@pytest.mark.parametrize("d", [48, 1000])  # 1000: row panels of the lower triangle
def test_gram_accumulation_fp32_is_exact_and_symmetric(d):
    from lowbit.calib.runner import LowerGram

    X = torch.randn(300, d, dtype=torch.float64).float() * torch.linspace(0.01, 4, d)
    G = LowerGram(d)
    G.add(X[:120])
    G.add(X[120:])
    H = G.finish()
    ref = X.double().T @ X.double()
    assert H.dtype == torch.float32 and torch.equal(H, H.T)
    assert float((H.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def _bf16_gram(X):
    Xb = X.bfloat16().double()
    return Xb.T @ Xb


@pytest.mark.parametrize("path", [None, "fp32-emulated", "onednn-bf16"])  # None: as probed on this CPU
@pytest.mark.parametrize("n,d", [(2000, 800), (20, 12)])  # 800: row panels; 12: small enough for torch to use MKL
def test_bf16_gram_is_the_gram_of_bf16_inputs(monkeypatch, path, n, d):
    """bf16 products round the inputs only: the result is (to fp32 accumulation) the Gram matrix
    of bf16(X), so it stays positive semi-definite; with damping GPTQ's Cholesky succeeds. The
    inputs are rounded before the product, so this holds on every path and every CPU, also when
    the fast path is forced where oneDNN ignores the bf16 hint (AVX512-BF16 without AMX, no bf16)."""
    import lowbit.calib.runner as runner
    from lowbit.methods.gptq import prepare_hessian_inverse

    if path is not None:
        monkeypatch.setattr(runner, "_bf16_gram_path", lambda _device_type: path)
    g = torch.Generator().manual_seed(0)
    rank = min(40, d // 2)
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)  # rank-deficient: only the damping makes it definite
    G = runner.LowerGram(d)
    G.add(X[: n // 2], "bf16")
    G.add(X[n // 2:], "bf16")
    H = G.finish()
    ref = _bf16_gram(X)
    assert torch.equal(H, H.T)
    assert float((H.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    # and it is not the fp32 Gram: the test would not see inputs left unrounded otherwise
    assert float((H.double() - X.double().T @ X.double()).abs().max() / ref.abs().max()) > 1e-5
    prepare_hessian_inverse(H, 0.01)


def test_the_hessian_does_not_depend_on_how_batches_are_grouped():
    """One process adds batches 1..4 in turn; two data-parallel ranks add 1-2 and 3-4 and sum the
    two: float64 sums of the same float32 products, so the float32 Hessians are equal bit for bit
    (a float32 accumulator differs here)."""
    from lowbit.calib.runner import LowerGram

    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(256, 800, generator=g) * torch.linspace(0.01, 4, 800) for _ in range(4)]

    def summed(parts):
        G = LowerGram(800)
        for b in parts:
            G.add(b)
        return G

    one = summed(batches)
    assert len(one.panels) == 4   # 800 columns: row panels
    first, second = summed(batches[:2]), summed(batches[2:])
    for p, q in zip(first.panels, second.panels):   # what all_reduce does between two ranks
        p.add_(q)
    assert torch.equal(one.finish(), first.finish())
    # the same products summed in float32 in the two groupings differ
    f32 = [sum((b.T @ b for b in part), torch.zeros(800, 800)) for part in (batches, batches[:2], batches[2:])]
    assert not torch.equal(f32[0], f32[1] + f32[2])


def test_the_hessian_does_not_depend_on_the_thread_count():
    """MKL splits a Gram panel's token dimension over threads (4096 tokens, 800 columns: a float32
    product on 2 threads differs from 1); LowerGram's products run on one thread, so a process
    with every core and ranks with one each sum the same numbers."""
    from lowbit.calib.runner import LowerGram

    X = torch.randn(4096, 800, generator=torch.Generator().manual_seed(5))
    saved = torch.get_num_threads()
    out = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            G = LowerGram(800)
            G.add(X)
            out.append(G.finish())
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(out[0], out[1])


def test_hessian_inverse_does_not_depend_on_the_thread_count():
    """LAPACK's factorizations round differently with other thread counts; prepare_hessian_inverse
    runs them on one thread, so a process with 2 threads and ranks with 1 agree."""
    from lowbit.methods.gptq import prepare_hessian_inverse

    X = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.1, 3, 1024)
    H = X.T @ X
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = prepare_hessian_inverse(H, 0.01)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = prepare_hessian_inverse(H, 0.01)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, many)


def test_hessian_precision_names():
    from lowbit.calib.runner import check_hessian_precision

    assert check_hessian_precision("bf16") == "bf16"
    assert check_hessian_precision("fp32") == "fp32"
    with pytest.raises(Exception, match="unknown Hessian precision"):
        check_hessian_precision("fp8")


def _chunked_bf16_outputs(X, chunk=16):
    Xb = X.bfloat16()
    return sum((Xb[i:i + chunk].T @ Xb[i:i + chunk]).float() for i in range(0, X.shape[0], chunk))


@pytest.mark.parametrize("product,expected", [
    (lambda X: _bf16_gram(X).float(), "onednn-bf16"),              # bf16 inputs, fp32 (or better) accumulation
    (lambda X: X.T @ X, "fp32-emulated"),                           # hint ignored: float32 products of raw inputs
    (lambda X: (X.bfloat16().T @ X.bfloat16()).float(), "fp32-emulated"),  # output rounded to bf16
    (_chunked_bf16_outputs, "fp32-emulated"),                       # partial sums rounded to bf16
    (lambda X: _bf16_gram(X).float() * (1 + 1e-4), "fp32-emulated"),  # off by more than the tolerance
    (lambda X: _bf16_gram(X).float() * float("nan"), "fp32-emulated"),
    (lambda X: torch.ones(()).expand(5), "fp32-emulated"),          # wrong shape: an error, not a crash
], ids=["exact", "fp32", "bf16-output", "bf16-partial-sums", "inexact", "nan", "error"])
def test_bf16_probe_accepts_only_the_gram_of_bf16_inputs(product, expected):
    from lowbit.calib.runner import probe_bf16_products

    assert probe_bf16_products(product) == expected


def test_bf16_gram_path_matches_this_cpu():
    """The probe's verdict agrees with an independent look at this CPU: a float32 product under
    oneDNN's bf16 hint, at another shape, is the Gram of bf16 inputs exactly when the path is
    onednn-bf16 (Intel with AMX); on AVX512-BF16 without AMX (AMD EPYC) oneDNN 3.12 keeps its
    float32 kernel, and without bf16 hardware the hint cannot apply, so those get fp32-emulated."""
    import lowbit.calib.runner as runner

    path = runner.bf16_gram_path()
    assert path in (runner.BF16_ONEDNN, runner.BF16_EMULATED)
    assert runner.bf16_gram_path("cpu") == path and runner.bf16_gram_path(torch.device("cpu")) == path
    assert runner.bf16_gram_path("meta") == runner.BF16_EMULATED  # only the CPU has a probed fast path
    X = torch.randn(512, 320, generator=torch.Generator().manual_seed(1))
    matmul = torch.backends.mkldnn.matmul
    saved, matmul.fp32_precision = matmul.fp32_precision, "bf16"
    try:
        H = X.T @ X
    finally:
        matmul.fp32_precision = saved
    ref = _bf16_gram(X)
    rounds_inputs = float((H.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert path == (runner.BF16_ONEDNN if rounds_inputs else runner.BF16_EMULATED)
    cpu = torch.cpu
    if not (cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported()):
        assert path == runner.BF16_EMULATED


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recipe_records_the_hessian_path(tiny_llama, calib, precision):
    from lowbit.api import quantize
    from lowbit.calib.runner import bf16_gram_path

    qm = quantize(str(tiny_llama), WeightScheme("int", 4, 32, False), method="gptq",
                  calibration=dataclasses.replace(calib, hessian_precision=precision), progress=False)
    assert qm.recipe["calibration"]["hessian_precision"] == precision
    assert qm.recipe["calibration"]["hessian_precision_path"] == ("fp32" if precision == "fp32" else bf16_gram_path())


def test_error_inside_a_staged_batch_propagates_and_cleans_up(tiny_llama, calib):
    """A failure in the middle of a parked forward reaches the caller; no hooks stay behind."""
    from lowbit.api import quantize
    from lowbit.model.load import load_source

    loaded = load_source(str(tiny_llama))
    mlp = loaded.model.model.layers[1].mlp
    calls = []

    def fail_second_batch(_m, _args):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom in batch 2")

    h = mlp.down_proj.register_forward_pre_hook(fail_second_batch)
    with pytest.raises(ValueError, match="boom in batch 2"):
        quantize(loaded, WeightScheme("int", 4, 32, False), method="gptq",
                 calibration=dataclasses.replace(calib, batch_size=1), progress=False)
    h.remove()
    leftover = [m for m in loaded.model.modules() if m._forward_pre_hooks]
    assert leftover == []



@pytest.mark.parametrize("scheme", [WeightScheme("gguf_iq4_nl", None, 32), WeightScheme("gguf_q4_0", None, 32),
                                    WeightScheme("int", 3, 32, True)])
def test_refit_scales_are_the_least_squares_scales(scheme):
    """refit_scales against an independent solve: per row, the block-diagonal matrix of the code
    values times the Cholesky factor of H, torch.linalg.lstsq, then the format's fp16 storage."""
    from lowbit.methods.gptq import refit_scales

    d, g = 128, 32
    X = _correlated_inputs(1024, d).double()
    H = X.T @ X
    W = torch.randn(6, d, generator=torch.Generator().manual_seed(3)) * 0.05
    fmt = scheme.make_format()
    codes, params = gptq_quantize(W, H.float(), fmt, g)
    fitted = refit_scales(fmt, W, H.float(), codes, params, g)
    V = fmt.decode(codes, {"scale": torch.ones(codes.shape)}).double()
    L = torch.linalg.cholesky(H)
    for r in range(W.shape[0]):
        B = torch.zeros(d, d // g, dtype=torch.float64)
        for b in range(d // g):
            B[b * g:(b + 1) * g, b] = V[r, b * g:(b + 1) * g]
        s = torch.linalg.lstsq(L.T @ B, L.T @ W[r].double()).solution
        assert torch.equal(fitted["scale"][r], s.to(torch.float16).float()), r


def test_refit_rounds_lower_the_output_error_and_refuse_other_formats():
    from lowbit.methods.gptq import _solve, output_error
    from lowbit.tensor import expand_groups

    X = _correlated_inputs(2048, 256)
    H = X.T @ X
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.05

    def error(scheme, refit):
        fmt = scheme.make_format()
        codes, params, g = _solve(W, H, fmt, scheme, Options(refit=refit))
        return codes, output_error(W, H, fmt.decode(codes, expand_groups(params, 256, g)))

    nl = WeightScheme("gguf_iq4_nl", None, 32)
    (_, plain), (_, refit) = error(nl, 0), error(nl, 3)
    assert refit < 0.97 * plain
    asym = WeightScheme("int", 4, 32, False)   # a zero-point: not scale x f(code), so refit is refused
    with pytest.raises(SchemeError, match="drop --opt refit"):
        error(asym, 3)
    from lowbit.methods.sparsegpt import Options as SparseOptions

    with pytest.raises(SchemeError, match="drop --opt refit"):   # pruning keeps its zeros: no refit there
        SparseOptions(refit=2)


def test_hessian_used_up_in_place_gives_the_same_factor_in_the_same_memory():
    """consume=True permutes, factors and inverts XᵀX in its own memory (no second 485 MB
    matrix on a 11008-wide input) and gives the bits of the copying path. A matrix that does not
    factor: used up, the error names float32 and --damp."""
    from lowbit.methods.gptq import _permute_symmetric_, prepare_hessian_inverse

    X = _correlated_inputs(3000, 2500)
    H = X.T @ X
    perm = torch.randperm(2500, generator=torch.Generator().manual_seed(1))
    P = H.clone()
    assert torch.equal(_permute_symmetric_(P, perm), H[perm[:, None], perm])   # two slabs of rows, many cycles
    for p in (None, perm):
        expect = prepare_hessian_inverse(H, 0.01, p)
        own = H.clone()
        got = prepare_hessian_inverse(own, 0.01, p, consume=True)
        assert torch.equal(got, expect)
        assert got.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
    # one negative eigenvalue: no precision factors it (the same on every CPU's LAPACK); the
    # copying path tries float64 too, the used-up one says float32 and --damp
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    bad = ((Q * torch.cat([torch.ones(63, dtype=torch.float64), -torch.ones(1, dtype=torch.float64)])) @ Q.T).float()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(SchemeError, match="even after dampening"):
        prepare_hessian_inverse(bad, 0.0, perm)
    with pytest.raises(SchemeError, match="not positive definite in float32.*raise --damp"):
        prepare_hessian_inverse(bad.clone(), 0.0, perm, consume=True)
