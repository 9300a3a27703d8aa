"""Quantized KV cache: exact against DynamicCache at 16 bits, codecs against references written
here from the formulas, KIVI-2's layout on hand-made tensors, measured bytes, sizing figures, CLI."""

import dataclasses
import json

import pytest
import torch

from lowbit.runtime import kv_quant as Q
from lowbit.runtime.kv_cache import KVCacheSpec, QuantizedKVCache, _LAYERS

F16_TINY = torch.finfo(torch.float16).tiny


@pytest.fixture(scope="module")
def model():
    """A tiny random LLaMA, head_dim 64 (two int4/KIVI groups of 32), 2 KV heads of 4 query heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def _ids(batch=2, n=40, seed=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _prefill_then_decode(model, ids, cache, prefill=24):
    """Logits of a prefill of `prefill` tokens followed by single-token decode steps."""
    out = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def _states(shape=(2, 3, 11, 64), seed=0, outlier_channel=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 3
    if outlier_channel is not None:
        x[..., outlier_channel] *= 40
    return x


# ---- 16 bits: exactly DynamicCache --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_precision_cache_equals_dynamic_cache(model, dtype):
    from transformers import DynamicCache

    m = model.to(dtype)
    try:
        ids = _ids()
        ref = _prefill_then_decode(m, ids, DynamicCache(config=m.config))
        for kind in ("none", "fp16"):
            cache = QuantizedKVCache(kind, m.config)
            assert torch.equal(_prefill_then_decode(m, ids, cache), ref)
            assert cache.get_seq_length() == ids.shape[1]
        with torch.no_grad():
            g_ref = m.generate(ids[:, :12], max_new_tokens=8, do_sample=False)
            g = m.generate(ids[:, :12], max_new_tokens=8, do_sample=False, cache=QuantizedKVCache("none", m.config))
        assert torch.equal(g, g_ref)
    finally:
        model.to(torch.float32)


# ---- codecs against the formulas ----------------------------------------------------------------

def _absmax_reference(x, kind, scale):
    s = scale.float()
    if kind == "int8":
        return torch.round(x / s).clamp(-127, 127) * s
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["token", "head", "group"])
def test_absmax_layers_match_formula(kind, granularity):
    x = _states(outlier_channel=5)
    layer = _LAYERS[kind](KVCacheSpec(kind, granularity=granularity, group_size=16, sink=0, new_tokens="stored"))
    qmax = 127 if kind == "int8" else 448
    layer.update(x[..., :7, :], -x[..., :7, :])          # a prefill...
    k, v = layer.update(x[..., 7:, :], -x[..., 7:, :])   # ...then more tokens
    if granularity == "group":  # one scale per token per 16 channels
        xg = x.reshape(2, 3, 11, 4, 16)
        scale = (xg.abs().amax(-1, keepdim=True) / qmax).clamp_min(F16_TINY).half()
        assert torch.equal(k, _absmax_reference(xg, kind, scale).reshape(x.shape))
        assert torch.equal(v, _absmax_reference(-xg, kind, scale).reshape(x.shape))
        assert layer.stored["k_scale"].shape == (2, 3, 11, 4) and layer.stored["k_codes"].shape == x.shape
        return
    if granularity == "token":  # one scale per token per head, over head_dim
        scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(F16_TINY).half()
    else:  # one per head, from the prefill's tokens; later tokens saturate to it
        scale = (x[..., :7, :].abs().amax((-2, -1), keepdim=True) / qmax).clamp_min(F16_TINY).half()
    assert torch.equal(k, _absmax_reference(x, kind, scale))
    assert torch.equal(v, _absmax_reference(-x, kind, scale))
    codes = layer.stored["k_codes"]
    assert codes.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn) and codes.shape == x.shape
    assert layer.stored["k_scale"].dtype == torch.float16
    assert layer.stored["k_scale"].shape == ((2, 3, 11, 1) if granularity == "token" else (2, 3, 1, 1))


def _minmax_reference(x, bits, dim):
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(F16_TINY).half().float()
    lo = lo.half().float()
    return torch.round((x - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo


def test_int4_groups_match_formula_and_pack_two_per_byte():
    x = _states()
    layer = _LAYERS["int4"](KVCacheSpec("int4", sink=0, new_tokens="stored"))
    layer.update(x[..., :4, :], x[..., :4, :])
    k, _ = layer.update(x[..., 4:, :], x[..., 4:, :])
    ref = _minmax_reference(x.reshape(2, 3, 11, 2, 32), 4, -1).reshape(x.shape)
    assert torch.equal(k, ref)
    codes = layer.stored["k_codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 11, 32)       # two 4-bit codes per byte
    assert layer.stored["k_scale"].shape == (2, 3, 11, 2) and layer.stored["k_min"].dtype == torch.float16
    # low nibble holds channel 2i, high nibble channel 2i+1
    scale, lo = layer.stored["k_scale"].float(), layer.stored["k_min"].float()
    first = torch.round((x[0, 0, 0, :2] - lo[0, 0, 0, 0]) / scale[0, 0, 0, 0]).clamp(0, 15).to(torch.uint8)
    assert int(codes[0, 0, 0, 0]) == int(first[0]) | (int(first[1]) << 4)


@pytest.mark.parametrize("granularity", ["token", "group"])
def test_asymmetric_int8_matches_minmax_formula_one_code_per_byte(granularity):
    x = _states(outlier_channel=5) + 0.7     # off-center: the case min-max ranges are for
    spec = KVCacheSpec("int8", granularity=granularity, group_size=16, symmetric=False, sink=0, new_tokens="stored")
    layer = _LAYERS[spec.layer_kind](spec)
    layer.update(x[..., :7, :], -x[..., :7, :])
    k, v = layer.update(x[..., 7:, :], -x[..., 7:, :])
    groups = 4 if granularity == "group" else 1
    shaped = (2, 3, 11, groups, 64 // groups)
    assert torch.equal(k, _minmax_reference(x.reshape(shaped), 8, -1).reshape(x.shape))
    assert torch.equal(v, _minmax_reference(-x.reshape(shaped), 8, -1).reshape(x.shape))
    assert layer.stored["k_codes"].dtype == torch.uint8 and layer.stored["k_codes"].shape == x.shape
    assert layer.stored["k_scale"].shape == layer.stored["k_min"].shape == (2, 3, 11, groups)
    # on off-center states a min-max range beats the symmetric absmax one
    sym = _LAYERS["int8"](dataclasses.replace(spec, symmetric=True))
    ks, _ = sym.update(x, -x)
    assert (k - x).square().sum() < 0.5 * (ks - x).square().sum()
    assert spec.label() == ("int8 g16 asym" if granularity == "group" else "int8 per-token asym") + " read-back"


def test_pack_roundtrip():
    for bits in (2, 4):
        c = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8)
        assert torch.equal(Q.unpack_last(Q.pack_last(c, bits), bits), c)


# ---- KIVI-2 layout on hand-made tensors ---------------------------------------------------------

@pytest.mark.parametrize("kind,bits", [("kivi2", 2), ("kivi4", 4)])
def test_kivi_layout_residual_window_and_block_flushes(kind, bits):
    G, R, g, D = 4, 6, 8, 16
    spec = KVCacheSpec(kind, block=G, residual=R, group_size=g, sink=0, clip="minmax")
    keys = _states((1, 2, 23, D), seed=3, outlier_channel=2).half()    # fp16 states: the window is exact
    values = _states((1, 2, 23, D), seed=4).half()
    layer = _LAYERS[kind](spec)
    steps = [5, 1, 1, 1, 1, 3, 1, 7, 1, 2]      # a prefill, decode steps and chunks: 23 tokens
    t = 0
    for n in steps:
        k, v = layer.update(keys[..., t:t + n, :], values[..., t:t + n, :])
        t += n
        q = layer.quantized_length()
        # whole blocks leave the window while it keeps at least R tokens: R <= window < R + G
        assert q % G == 0 and q == max(0, (t - R) // G * G)
        assert (t - q < R + G) and (t < R or t - q >= R)
        # the window holds the most recent t - q tokens exactly
        assert torch.equal(k[..., q:t, :], keys[..., q:t, :]) and torch.equal(v[..., q:t, :], values[..., q:t, :])
        assert k.shape[-2] == t and layer.get_seq_length() == t
        if q:
            s = layer.stored
            assert s["k_codes"].shape == (1, 2, q, D * bits // 8) and s["k_codes"].dtype == torch.uint8  # packed
            assert s["k_scale"].shape == (1, 2, q // G, D)     # keys: one range per channel per block of G tokens
            assert s["v_scale"].shape == (1, 2, q, D // g)     # values: one range per token per group of g channels
            k_ref = _minmax_reference(keys[..., :q, :].float().reshape(1, 2, q // G, G, D), bits, -2).reshape(1, 2, q, D)
            v_ref = _minmax_reference(values[..., :q, :].float().reshape(1, 2, q, D // g, g), bits, -1).reshape(1, 2, q, D)
            assert torch.equal(k[..., :q, :], k_ref.half()) and torch.equal(v[..., :q, :], v_ref.half())
    assert t == 23 and layer.quantized_length() == 16
    # per-channel key ranges keep the outlier channel from flattening the others (KIVI's point)
    err = (k[..., :16, :].float() - keys[..., :16, :].float()).abs()
    assert err[..., 0].max() < 0.2 * err[..., 2].max()


def test_kivi_window_zero_keeps_only_the_partial_block():
    layer = _LAYERS["kivi2"](KVCacheSpec("kivi2", block=4, residual=0, group_size=8, sink=0))
    x = _states((1, 1, 10, 16)).half()
    layer.update(x, x)
    assert layer.quantized_length() == 8 and layer.stored["k_window"].shape[-2] == 2


# ---- measured bytes -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "int8", "fp8", "int4", "kivi2", "kivi4", "int8-g32", "int8-g32-asym",
                                  "int8-asym"])
def test_measured_bytes_equal_expected_count(model, kind):
    ids = _ids(batch=2, n=40)
    spec = (KVCacheSpec(kind) if kind == "none" else KVCacheSpec("int8", residual=8, granularity="group")
            if kind == "int8-g32" else
            KVCacheSpec("int8", residual=8, granularity="group", symmetric=False) if kind == "int8-g32-asym" else
            KVCacheSpec("int8", residual=8, symmetric=False) if kind == "int8-asym" else
            KVCacheSpec(kind, residual=8, block=8))
    cache = QuantizedKVCache(spec, model.config)
    _prefill_then_decode(model, ids, cache, prefill=21)
    L, H, D, B, T = 2, 2, 64, 2, 40
    # keys + values of one head, one sequence, counted by hand (fp16 scales: 2 bytes); the first token
    # (the sink) and the window are fp16; int8/fp8/int4 windows of 8 tokens, KIVI's whole blocks of 8
    fp16_kept = 2 * (1 + 8) * D * 2
    q = T - 1 - 8
    per_head = {
        "none": 2 * T * D * 4,                                          # what the fp32 model computes
        "int8": 2 * (q * D + q * 2) + fp16_kept, "fp8": 2 * (q * D + q * 2) + fp16_kept,
        "int8-g32": 2 * (q * D + q * 2 * 2) + fp16_kept,
        "int8-g32-asym": 2 * (q * D + q * 2 * 2 * 2) + fp16_kept,     # a scale and a minimum per group
        "int8-asym": 2 * (q * D + q * 2 * 2) + fp16_kept,             # ... per token
        "int4": 2 * (q * D // 2 + q * (D // 32) * 2 * 2) + fp16_kept,
        # 39 tokens after the sink: 24 quantized (3 blocks of 8), 15 in the window (8 <= window < 16)
        "kivi2": (24 * D // 4 + 3 * D * 2 * 2) + (24 * D // 4 + 24 * 2 * 2 * 2) + 2 * (1 + 15) * D * 2,
        "kivi4": (24 * D // 2 + 3 * D * 2 * 2) + (24 * D // 2 + 24 * 2 * 2 * 2) + 2 * (1 + 15) * D * 2,
    }[kind]
    assert cache.nbytes() == L * H * B * per_head == L * H * B * spec.bytes_per_head(T, D, full_bytes=4)
    measured = sum(t.element_size() * t.numel() for layer in cache.layers for t in layer.stored.values())
    assert cache.nbytes() == measured and cache.fp16_bytes() == L * H * B * T * D * 2 * 2


# ---- batch, beams, generate ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int8", "fp8", "int4", "kivi2", "kivi4"])
def test_batch_rows_are_independent(model, kind):
    ids = _ids(batch=2, n=30)
    spec = KVCacheSpec(kind, residual=8, block=8)
    both = _prefill_then_decode(model, ids, QuantizedKVCache(spec, model.config), prefill=13)
    for row in range(2):
        alone = _prefill_then_decode(model, ids[row:row + 1], QuantizedKVCache(spec, model.config), prefill=13)
        # (a batched matmul rounds differently; at fp8's 3 mantissa bits that can flip a code: 1e-3,
        # where a scale shared across rows would move logits by orders of magnitude more)
        torch.testing.assert_close(both[row:row + 1], alone, rtol=1e-3, atol=1e-3)


def test_quantized_cache_changes_logits_by_a_little(model):
    from transformers import DynamicCache

    ids = _ids(batch=2, n=40)
    ref = _prefill_then_decode(model, ids, DynamicCache(config=model.config))
    errs = {k: float((_prefill_then_decode(model, ids, QuantizedKVCache(k, model.config, residual=8, block=8)) - ref)
                     .abs().max()) for k in ("int8", "int4", "kivi2")}
    assert 0 < errs["int8"] < errs["int4"] < errs["kivi2"] < 1.0


def test_reorder_cache_permutes_codes_exactly():
    layer = _LAYERS["int8"](KVCacheSpec("int8", new_tokens="stored"))
    x = _states((3, 2, 5, 64))
    k, _ = layer.update(x, x)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    k2, _ = layer.update(x[..., :0, :][[2, 0, 1]], x[..., :0, :][[2, 0, 1]])
    assert torch.equal(k2, k[[2, 0, 1]])


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4", "kivi2", "kivi4"])
def test_greedy_generate_reads_the_quantized_cache(model, kind):
    """generate() with the cache gives the tokens of a hand-written greedy loop over the same cache kind."""
    ids = _ids(batch=2, n=10)
    spec = KVCacheSpec(kind, residual=4, block=4)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, cache=QuantizedKVCache(spec, model.config),
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
        cache, seq = QuantizedKVCache(spec, model.config), ids
        logits = model(ids, cache=cache, use_cache=True).logits
        for _ in range(12):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache=cache, use_cache=True).logits
    assert torch.equal(gen, seq) and cache.get_seq_length() == 10 + 12


# ---- the eval protocol --------------------------------------------------------------------------

def test_cache_protocol_bounds_and_reference_equals_single_forward(model):
    from lowbit.eval.divergence import CacheProtocol, logits_through_cache

    p = CacheProtocol(KVCacheSpec("none"), prefill=10, chunk=8, tail=4)
    assert p.bounds(40) == [0, 10, 18, 26, 34, 36, 37, 38, 39, 40]
    ids = _ids(batch=1, n=40)
    logits, cache = logits_through_cache(model, ids, p)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 40


def test_bad_spec_is_a_lowbit_error():
    from lowbit.errors import SchemeError

    with pytest.raises(SchemeError, match="unknown KV cache kind"):
        KVCacheSpec("int3")
    with pytest.raises(SchemeError, match="do not divide head_dim 24"):
        KVCacheSpec("int4").check_head_dim(24)
    with pytest.raises(SchemeError, match="--kv-residual"):
        KVCacheSpec("kivi2", residual=-1)


# ---- sizing -------------------------------------------------------------------------------------

def test_size_reproduces_the_70b_figures():
    from lowbit.sizing import estimate, kv_estimate

    arch = (80, 8, 128)   # a 70B-class GQA model
    fp16 = kv_estimate("fp16", arch, 4096, 32)
    assert fp16.total_bytes == 80 * 8 * 128 * 2 * 2 * 4096 * 32 == 40 * 2**30       # 42.9e9 bytes: "40 GB"
    assert kv_estimate("fp16", arch, 32768, 32).total_bytes == 320 * 2**30          # "320 GB"
    assert estimate(70e9, "fp16", context=4096, batch=32).kv_cache_bytes == 40 * 2**30  # the old --kv-bits path
    # per token per head, keys and values: codes + fp16 scales; the first token (the sink) is fp16
    per_token_head = {"int8": 2 * (128 + 2), "fp8": 2 * (128 + 2), "int4": 2 * (64 + 4 * 2 * 2)}
    sink = 2 * 128 * 2
    for kind, b in per_token_head.items():
        e = kv_estimate(kind, arch, 4096, 32)
        assert e.total_bytes == 80 * 8 * 32 * (4095 * b + sink)
        assert e.ratio_fp16 == pytest.approx(b / 512, rel=1e-3)
        assert kv_estimate(kind, arch, 4096, 32, sink=0).total_bytes == 80 * 8 * 32 * 4096 * b
    assert kv_estimate("int8", arch, 4096, 32).total_bytes / 2**30 == pytest.approx(20.31, abs=0.01)
    assert kv_estimate("int4", arch, 4096, 32, sink=0).total_bytes == 12.5 * 2**30
    # KIVI-2: after the sink, 3936 tokens in 2-bit blocks of 32, the 159 most recent in the fp16 window
    kivi_head = (3936 * 32 + 123 * 128 * 4) + (3936 * 32 + 3936 * 4 * 4) + 2 * (1 + 159) * 128 * 2
    k = kv_estimate("kivi2", arch, 4096, 32)
    assert k.total_bytes == 80 * 8 * 32 * kivi_head and k.ratio_fp16 == pytest.approx(0.2192, abs=1e-4)
    assert kv_estimate("kivi2", arch, 32768, 32).ratio_fp16 < k.ratio_fp16   # the window matters less at 32K


def test_size_cli_kv_and_config(tmp_path, capsys, model):
    from lowbit.cli import main

    assert main(["size", "70B", "--context", "4096", "--batch", "32", "--kv", "int8", "--kv", "kivi2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kv = {r["kind"]: r for r in out["kv_cache"]}
    assert kv["fp16"]["total_bytes"] == 40 * 2**30 and kv["int8"]["total_bytes"] == out["weights"][0]["kv_cache_bytes"]
    model.save_pretrained(tmp_path)
    assert main(["size", "--config", str(tmp_path), "--context", "100", "--kv", "int4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n = sum(p.numel() for p in model.parameters())
    assert out["weights"][0]["params"] == n
    # layers x heads x (99 int4 tokens + the fp16 sink)
    assert out["kv_cache"][1]["total_bytes"] == 2 * 2 * (99 * 2 * (32 + 2 * 2 * 2) + 2 * 64 * 2)
    assert main(["size", "--config", str(tmp_path / "config.json"), "--context", "1", "--kv", "int8"]) == 2
    assert "parameter count" in capsys.readouterr().err


# ---- eval / generate CLI ------------------------------------------------------------------------

def test_eval_cli_kv(tiny_llama, capsys):
    from lowbit.cli import main

    base = ["eval", "--reference", str(tiny_llama), "--ctx", "64", "--windows", "2", "--json"]
    assert main(base + ["--kv", "int8"]) == 0
    r8 = json.loads(capsys.readouterr().out)
    assert main(base + ["--kv", "fp8", "--kv-chunk", "8"]) == 0
    r_fp8 = json.loads(capsys.readouterr().out)
    assert 0 < r8["kld"] < r_fp8["kld"] < 0.05 and r8["n_tokens"] == 126
    # tiny_llama: 2 layers x 2 KV heads x head_dim 24, keys and values, 64 tokens: 63 int8 with fp16 scales
    # per token, the first (the sink) in fp16
    assert r8["kv_cache_bytes"] == 2 * 2 * 2 * (63 * 24 + 63 * 2 + 24 * 2)
    assert r8["kv_cache_fp16_bytes"] == 2 * 2 * 2 * 64 * 24 * 2
    assert r8["kv_protocol"] == {"prefill": 32, "chunk": 32, "tail": 16}
    # a candidate: its weights and its cache against the source; here the candidate is the source itself
    assert main(["eval", str(tiny_llama), *base[1:], "--kv", "int8"]) == 0
    rc = json.loads(capsys.readouterr().out)
    assert rc["kld"] == r8["kld"] and rc["top1"] == r8["top1"]
    # int8 with a min-max range per 8 channels: a scale and a minimum per group (head_dim 24: 3 groups)
    assert main(base + ["--kv", "int8", "--kv-group", "8", "--kv-asym"]) == 0
    ra = json.loads(capsys.readouterr().out)
    assert ra["kv_cache_bytes"] == 2 * 2 * 2 * (63 * 24 + 63 * 3 * 2 * 2 + 24 * 2) and ra["kld"] != r8["kld"]


def test_eval_cli_bad_input(tiny_llama, capsys):
    from lowbit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--kv", "int3"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["eval", "--reference", str(tiny_llama), "--kv", "int8", "--ctx", "300"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]   # (transformers' loading bar may come before it)
    assert "Traceback" not in err and last.startswith("lowbit: error: --ctx 300 is beyond the context limit")
    assert "256" in last
    assert main(["eval", "--reference", str(tiny_llama), "--kv", "int4", "--ctx", "64", "--windows", "1"]) == 2
    assert "do not divide head_dim 24" in capsys.readouterr().err
    assert main(["eval", "--reference", str(tiny_llama)]) == 2
    assert "--kv" in capsys.readouterr().err


def test_generate_cli_kv(tiny_llama, capsys):
    from lowbit.cli import main

    assert main(["generate", "--reference", str(tiny_llama), "--kv", "int8", "--prompt", "def f(x):",
                 "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv"]["kind"] == "int8" and isinstance(out["candidate"], str) and isinstance(out["reference"], str)


# ---- sink, window, range search, the update's own tokens ---------------------------------------

def test_mse_ranges_equal_a_brute_force_search_and_never_lose_to_minmax():
    import itertools

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 32, generator=g) ** 3          # heavy tails: clipping pays at 2 bits
    x[0, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0] * 8)     # exactly on a 2-bit min-max grid: min-max is kept
    for bits in (2, 4):
        scale, lo = Q.minmax_params(x, bits, dim=-1, clip="mse")
        s_mm, lo_mm = Q.minmax_params(x, bits, dim=-1)
        levels = 2 ** bits - 1

        def err(s, m, row):
            s, m = s.float(), m.float()
            return float(((torch.round((row - m) / s).clamp(0, levels) * s + m - row) ** 2).sum())

        for i, j in itertools.product(range(3), range(7)):
            row = x[i, j]
            lo_r, hi_r = float(row.min()), float(row.max())
            best = None
            for a, b in itertools.product([0.0, 0.05, 0.1, 0.15, 0.2, 0.25], repeat=2):   # written out here
                s = torch.tensor(max((hi_r - lo_r) * (1 - a - b) / levels, F16_TINY)).half()
                m = torch.tensor(lo_r + a * (hi_r - lo_r)).half()
                e = err(s, m, row)
                if best is None or e < best[0]:
                    best = (e, s, m)
            assert scale[i, j, 0] == best[1] and lo[i, j, 0] == best[2]
            assert err(scale[i, j, 0], lo[i, j, 0], row) <= err(s_mm[i, j, 0], lo_mm[i, j, 0], row)
    s2, lo2 = Q.minmax_params(x[0, 0], 2, dim=-1, clip="mse")
    assert float(s2) == 1.0 and float(lo2) == 0.0


@pytest.mark.parametrize("kind", ["int8", "int4", "kivi2"])
def test_sink_window_and_exact_new_tokens(kind):
    x = _states((1, 2, 30, 64), seed=7).half().float()   # fp16-representable: the sink and window are exact
    y = -x
    spec = KVCacheSpec(kind, sink=2, residual=5, block=4)
    exact, stored = _LAYERS[kind](spec), _LAYERS[kind](dataclasses.replace(spec, new_tokens="stored"))
    t = 0
    for n in (9, 1, 3, 1, 8, 1, 7):
        k, v = exact.update(x[..., t:t + n, :], y[..., t:t + n, :])
        ks, vs = stored.update(x[..., t:t + n, :], y[..., t:t + n, :])
        t += n
        assert k.shape[-2] == t
        # the update's own tokens as given; everything before as stored (the read-back layer's values)
        assert torch.equal(k[..., t - n:, :], x[..., t - n:t, :]) and torch.equal(v[..., t - n:, :], y[..., t - n:t, :])
        assert torch.equal(k[..., :t - n, :], ks[..., :t - n, :]) and torch.equal(v[..., :t - n, :], vs[..., :t - n, :])
        # the sink and the window are stored exactly, the rest as codes
        q = stored.quantized_length()
        unit = 4 if kind == "kivi2" else 1
        assert q == max(0, (t - 2 - 5) // unit * unit)
        assert torch.equal(ks[..., :2, :], x[..., :2, :]) and torch.equal(ks[..., 2 + q:t, :], x[..., 2 + q:t, :])
        if q:
            assert not torch.equal(ks[..., 2:2 + q, :], x[..., 2:2 + q, :])
    assert stored.stored["k_sink"].dtype == torch.float16 and stored.stored["k_sink"].shape[-2] == 2


def test_full_precision_refuses_sink_and_window_and_mse_needs_asymmetric_ranges():
    from lowbit.errors import SchemeError

    with pytest.raises(SchemeError, match="no sink or residual"):
        KVCacheSpec("none", residual=4)
    with pytest.raises(SchemeError, match="absmax"):
        KVCacheSpec("int8", clip="mse")
    assert KVCacheSpec("int8", symmetric=False, clip="mse").clip == "mse"
    for bad in (dict(kind="fp8"), dict(kind="int4"), dict(kind="int8", granularity="head")):
        with pytest.raises(SchemeError, match="drop --kv-asym"):
            KVCacheSpec(symmetric=False, **bad)
    assert KVCacheSpec("kivi2").clip == "mse" and KVCacheSpec("kivi4").clip == "minmax"
    assert (KVCacheSpec("kivi2").residual, KVCacheSpec("int4").residual, KVCacheSpec("int8").sink) == (128, 0, 1)
    assert KVCacheSpec("kivi2").label() == "kivi2 G32 g32 R128 sink1 mse"


def test_kv_flags_without_kv_are_refused(tiny_llama, capsys):
    from lowbit.cli import main

    assert main(["eval", str(tiny_llama), "--kv-sink", "0"]) == 2
    assert "add --kv" in capsys.readouterr().err
    assert main(["size", "7B", "--context", "10", "--kv-residual", "4"]) == 2
    assert "add --kv" in capsys.readouterr().err
