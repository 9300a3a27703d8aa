"""GGUF export: files gguf-py reads back, llama.cpp runs with lowbit's logits, and the named
mixes' per-tensor types as llama.cpp's llama-quant.cpp chooses them."""

import copy

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import SchemeError
from lowbit.export.gguf import permute_rows, qk_permutation, write_gguf
from lowbit.plan.gguf_mixes import LLAMA_CPP_FALLBACK, fallback_type, tensor_type_for, use_more_bits
from lowbit.model.load import LoadedModel, default_gguf_path
from lowbit.tensor import quantize_tensor

PROMPT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog and"

# llama.cpp (this build, this CPU) crashes in batched prompt processing of quantized weights,
# also on the embedded GGUF that llama.cpp itself wrote; one token per batch avoids that path.
LLAMA_KW = dict(logits_all=True, n_ctx=128, n_batch=1, verbose=False)


# --- unit: rows, mixes ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gguf_q8_0", "gguf_q4_k", "gguf_q6_k", "int"])
def test_permute_rows_matches_permuting_decoded_rows(fmt):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    scheme = lowbit.WeightScheme(format=fmt, bits=4 if fmt == "int" else None, group_size=64)
    qt = quantize_tensor(w, scheme)
    perm = qk_permutation(48, 3)
    assert sorted(perm.tolist()) == list(range(48))
    assert torch.equal(permute_rows(qt, perm).dequantize(), qt.dequantize()[perm])


def test_qk_permutation_is_llama_cpp_order():
    # one head of 8 rows: HF [x0..x3, y0..y3] -> llama.cpp [x0, y0, x1, y1, ...]
    assert qk_permutation(8, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_mix_rules_follow_llama_cpp():
    n = 32  # use_more_bits: layers < 4, >= 28, and (i - 4) % 3 == 2
    assert [i for i in range(n) if use_more_bits(i, n)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    t = lambda mix, name, i, cols=4096, **kw: tensor_type_for(mix, name, i, n, cols, **kw)[0]
    assert t("Q4_K_M", "blk.0.attn_v.weight", 0) == "Q6_K"
    assert t("Q4_K_M", "blk.4.attn_v.weight", 4) == "Q4_K"
    assert t("Q4_K_M", "blk.6.ffn_down.weight", 6, cols=11008) == "Q6_K"
    assert t("Q4_K_M", "blk.7.ffn_down.weight", 7, cols=11008) == "Q4_K"
    assert t("Q4_K_M", "blk.7.attn_q.weight", 7) == "Q4_K"
    assert t("Q4_K_M", "output.weight", None) == "Q6_K"
    assert t("Q4_K_M", "token_embd.weight", None) == "Q4_K"
    assert t("Q4_K_M", "token_embd.weight", None, tied_embeddings=True) == "Q6_K"
    assert t("Q4_K_M", "blk.0.attn_norm.weight", 0) == "F32"
    assert t("Q4_K_S", "blk.3.attn_v.weight", 3) == "Q5_K"
    assert t("Q4_K_S", "blk.4.attn_v.weight", 4) == "Q4_K"
    assert t("Q4_K_S", "blk.3.ffn_down.weight", 3) == "Q5_K"
    assert t("Q4_K_S", "blk.4.ffn_down.weight", 4) == "Q4_K"
    assert t("Q3_K_M", "blk.1.attn_v.weight", 1) == "Q5_K"
    assert t("Q3_K_M", "blk.2.attn_v.weight", 2) == "Q4_K"
    assert t("Q3_K_M", "blk.1.ffn_down.weight", 1) == "Q5_K"
    assert t("Q3_K_M", "blk.2.ffn_down.weight", 2) == "Q4_K"
    assert t("Q3_K_M", "blk.2.attn_output.weight", 2) == "Q4_K"
    assert t("Q3_K_S", "blk.0.attn_v.weight", 0) == "Q3_K"
    assert t("Q3_K_L", "blk.9.attn_output.weight", 9) == "Q5_K"
    assert t("Q2_K", "blk.9.attn_v.weight", 9, n_gqa=1) == "Q3_K"
    assert t("Q2_K", "blk.9.attn_v.weight", 9, n_gqa=8) == "Q4_K"
    assert t("Q2_K", "blk.9.ffn_down.weight", 9) == "Q3_K"
    assert t("Q2_K", "blk.9.ffn_up.weight", 9) == "Q2_K"
    assert t("Q5_K_M", "blk.31.attn_v.weight", 31) == "Q6_K"
    assert t("Q6_K", "blk.0.attn_v.weight", 0) == "Q6_K"
    assert t("Q8_0", "output.weight", None) == "Q8_0"
    assert t("Q4_0", "blk.0.ffn_down.weight", 0) == "Q4_0"
    assert t("Q4_0", "output.weight", None) == "Q6_K"
    # IQ4_NL / IQ4_XS (llama-quant.cpp, no imatrix): Q5_K attn_v at GQA >= 4, Q5_K ffn_down in the
    # first eighth, Q6_K output; IQ4_XS rows that 256 does not divide fall back to IQ4_NL
    for mix in ("IQ4_NL", "IQ4_XS"):
        assert t(mix, "blk.9.attn_v.weight", 9, n_gqa=4) == "Q5_K" and t(mix, "blk.9.attn_v.weight", 9, n_gqa=3) == mix
        assert t(mix, "blk.3.ffn_down.weight", 3) == "Q5_K" and t(mix, "blk.4.ffn_down.weight", 4) == mix
        assert t(mix, "blk.0.attn_q.weight", 0) == t(mix, "token_embd.weight", None) == mix
        assert t(mix, "output.weight", None) == "Q6_K"
    assert t("IQ4_XS", "blk.9.attn_q.weight", 9, cols=576) == "IQ4_NL"
    assert t("IQ4_XS", "output.weight", None, cols=576) == "Q8_0"
    with pytest.raises(SchemeError, match="Q4_K_XL"):
        tensor_type_for("Q4_K_XL", "blk.0.attn_v.weight", 0, n, 4096)


def test_mix_fallback_for_576_columns():
    # SmolLM2: 576-column rows fit 32-blocks, not 256-blocks
    assert tensor_type_for("Q4_K_M", "blk.0.attn_v.weight", 0, 30, 576) == (
        "Q8_0", "576 columns not divisible by 256 (Q6_K) -> Q8_0")
    assert tensor_type_for("Q4_K_M", "blk.4.attn_q.weight", 4, 30, 576)[0] == "Q5_0"
    assert tensor_type_for("Q5_K_S", "blk.4.attn_q.weight", 4, 30, 576)[0] == "Q5_1"
    assert tensor_type_for("Q2_K", "blk.4.ffn_gate.weight", 4, 30, 576)[0] == "Q4_0"
    assert tensor_type_for("Q3_K_S", "blk.4.ffn_up.weight", 4, 30, 576)[0] == "Q4_0"
    # ffn_down has 1536 columns = 6 * 256: no fallback
    assert tensor_type_for("Q4_K_M", "blk.4.ffn_down.weight", 4, 30, 1536) == ("Q4_K", None)
    # the output's own rule picks Q8_0 for rows that do not fit the base type (no fallback needed)
    assert tensor_type_for("Q4_K_M", "token_embd.weight", None, 30, 576, tied_embeddings=True) == ("Q8_0", None)
    assert tensor_type_for("Q4_0", "output.weight", None, 30, 576)[0] == "Q8_0"
    assert fallback_type("Q4_K", 100) == ("F16", "100 columns not divisible by 256 (Q4_K) -> F16")
    assert fallback_type("Q4_K", 576, {**LLAMA_CPP_FALLBACK, "Q4_K": "Q4_1"})[0] == "Q4_1"


# --- tiny random models (HF tokenizer path, other architectures) ----------------------------------
def _tiny(arch: str, tokenizer, hidden: int = 64, intermediate: int = 128) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    config = cfg_cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = model_cls(config).eval()
    with torch.no_grad():  # qwen2's q/k/v biases start at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return LoadedModel(model, tokenizer, "/nonexistent/hf-folder", "hf")


def _llama_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), **LLAMA_KW)
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)])


def greedy_continuations(llm, model, ids, n: int = 6) -> tuple[list[int], list[int]]:
    """The next n greedy tokens after ids in llama.cpp and in transformers."""
    llm.reset()
    gen = []
    for tok in llm.generate(ids, top_k=1, temp=0.0):
        gen.append(tok)
        if len(gen) == n:
            break
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return gen, hf


def _model_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_source_tokenizer_and_logits(default_model, tmp_path, arch):
    """A model from an HF folder: tokenizer rebuilt from tokenizer.json equals the source GGUF's;
    an untied head, GQA and (qwen2) q/k/v biases and no q/k permutation run in llama.cpp."""
    lm = _tiny(arch, default_model.tokenizer)
    path = write_gguf(lm, tmp_path / f"{arch}.gguf")
    out, src = gguf.GGUFReader(path), gguf.GGUFReader(default_gguf_path())
    assert out.fields["general.architecture"].contents() == arch
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert out.fields[key].contents() == src.fields[key].contents(), key
    # transformers' tokenizer converted from the GGUF has a plain byte-level pre-tokenizer
    assert out.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    names = {t.name for t in out.tensors}
    assert "output.weight" in names and ("blk.0.attn_q.bias" in names) == (arch == "qwen2")

    ids = default_model.tokenizer("Hello world, this is a test of the tiny model")["input_ids"]
    _, L = _llama_logits(path, ids)
    H = _model_logits(lm.model, ids)
    assert np.abs(L - H).max() < 1e-3 * max(1.0, np.abs(H).max())
    assert (L.argmax(-1) == H.argmax(-1)).all()


@pytest.mark.parametrize("fmt", ["gguf_iq4_nl", "gguf_iq4_xs", "gguf_mxfp4"])
def test_llama_cpp_runs_iq4_and_mxfp4(default_model, tmp_path, fmt):
    """IQ4_NL / IQ4_XS (non-linear 4-bit grid) and MXFP4 weights load in llama.cpp and give
    lowbit's logits, up to llama.cpp's 8-bit rounding of the activations."""
    from lowbit.api import quantize

    lm = _tiny("llama", default_model.tokenizer, hidden=256, intermediate=512)
    qm = quantize(lm, lowbit.WeightScheme(format=fmt, bits=None, group_size=32), progress=False)
    path = write_gguf(qm, tmp_path / f"{fmt}.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == fmt.removeprefix("gguf_").upper()
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    _, L = _llama_logits(path, ids)
    assert_llama_agrees(L, _model_logits(qm.model, ids))


def assert_llama_agrees(L, H, max_err: float = 0.15):
    """llama.cpp's logits L against lowbit's H for quantized weights: close up to llama.cpp's
    8-bit rounding of the activations, and the same argmax where the top two are apart.
    Random weights leave near-ties between logits, and llama.cpp rounds the activations to 8 bits
    (per 256 or per 32) with CPU-dependent summation order: the argmax is compared only where
    lowbit's top two logits are apart by more than 2% of the scale."""
    scale = np.abs(H).max()
    assert np.abs(L - H).max() < max_err * scale and np.abs(L - H).mean() < 0.02 * scale
    top2 = np.sort(H, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.02 * scale
    assert clear.sum() >= 5 and (L.argmax(-1) == H.argmax(-1))[clear].all()


@pytest.mark.e2e
@pytest.mark.parametrize("scheme,want", [(("int", 4, 32), "Q4_0"), (("int", 4, 64), "Q4_0"), (("int", 8, -1), "Q8_0"),
                                         (("int", 5, 64), "Q5_0"), (("int", 4, 32, False, "float"), "Q4_1")])
def test_integer_grids_are_written_as_gguf_blocks_exactly(default_model, tmp_path, scheme, want):
    """Symmetric INT4/5/8 and float-minimum INT4 groups of multiples of 32 are GGUF blocks already:
    written with the same codes and scales, they decode in gguf-py to lowbit's values bit for bit."""
    from lowbit.api import quantize

    ws = lowbit.WeightScheme(*scheme)
    qm = quantize(_tiny("llama", default_model.tokenizer), ws, progress=False)
    path = write_gguf(qm, tmp_path / "int.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for layer in (0, 1):
        t = tensors[f"blk.{layer}.ffn_down.weight"]
        assert t.tensor_type.name == want
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(got, qm.tensors[f"model.layers.{layer}.mlp.down_proj.weight"].dequantize())


def test_non_gguf_format_is_refused_unless_full_precision(default_model, tmp_path):
    from lowbit.api import quantize

    qm = quantize(_tiny("llama", default_model.tokenizer), lowbit.WeightScheme("nf4", None, 64), progress=False)
    with pytest.raises(SchemeError, match="lowbit convert"):   # no GGUF type holds NF4
        write_gguf(qm, tmp_path / "nf4.gguf")
    assert not (tmp_path / "nf4.gguf").exists()
    path = write_gguf(qm, tmp_path / "int4-f16.gguf", full_precision="F16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    with pytest.raises(SchemeError, match="never quantizes"):
        write_gguf(qm, tmp_path / "x.gguf", {"token_embd.weight": "Q8_0"}, full_precision="F16")


# --- the embedded default: F32 and Q8_0 ----------------------------------------------------------
@pytest.fixture(scope="module")
def default_files(default_model, tmp_path_factory):
    from lowbit.api import quantize

    d = tmp_path_factory.mktemp("gguf")
    qm = quantize(copy.deepcopy(default_model), lowbit.WeightScheme(format="gguf_q8_0", bits=None, group_size=-1),
                  progress=False)
    return {"f32": write_gguf(default_model, d / "f32.gguf"), "q8_0": write_gguf(qm, d / "q8_0.gguf"), "qm": qm}


@pytest.mark.e2e
def test_default_gguf_reads_back(default_model, default_files):
    src = gguf.GGUFReader(default_gguf_path())
    for kind in ("f32", "q8_0"):
        out = gguf.GGUFReader(default_files[kind])
        for key, field in src.fields.items():
            if key.startswith("tokenizer."):
                assert out.fields[key].contents() == field.contents(), key
        for key in ("llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                    "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count"):
            assert out.fields[key].contents() == pytest.approx(src.fields[key].contents()), key
        assert out.fields["general.file_type"].contents() == {"f32": 0, "q8_0": 7}[kind]
        src_shapes = {t.name: t.shape.tolist() for t in src.tensors}
        types = {t.name: t.tensor_type.name for t in out.tensors}
        assert {t.name: t.shape.tolist() for t in out.tensors} == src_shapes  # same 272 tensors, no output.weight
        want = "Q8_0" if kind == "q8_0" else "F32"
        assert types["blk.7.attn_k.weight"] == types["blk.29.ffn_down.weight"] == want
        assert types["token_embd.weight"] == types["output_norm.weight"] == types["blk.0.ffn_norm.weight"] == "F32"


@pytest.mark.e2e
def test_q8_0_bytes_decode_to_lowbit_weights(default_files):
    """llama.cpp's blocks (read by gguf-py) decode exactly to lowbit's weights, q/k permuted."""
    qm = default_files["qm"]
    tensors = {t.name: t for t in gguf.GGUFReader(default_files["q8_0"]).tensors}
    for layer in (0, 29):
        for gname, hf, heads in (("attn_q", "self_attn.q_proj", 9), ("attn_k", "self_attn.k_proj", 3),
                                 ("ffn_down", "mlp.down_proj", None)):
            t = tensors[f"blk.{layer}.{gname}.weight"]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            want = qm.tensors[f"model.layers.{layer}.{hf}.weight"].dequantize()
            if heads:
                want = want[qk_permutation(want.shape[0], heads)]
            assert torch.equal(got, want), (layer, gname)


@pytest.mark.e2e
def test_llama_cpp_runs_default_f32_and_q8_0(default_model, default_files):
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    results = {}
    for kind, model in (("f32", default_model.model), ("q8_0", default_files["qm"].model)):
        llm, L = _llama_logits(default_files[kind], ids)
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
        H = _model_logits(model, ids)
        diff = np.abs(L - H)
        results[kind] = (diff.max(), diff.mean(), np.abs(H).max(), (L.argmax(-1) == H.argmax(-1)).mean())
        results[kind] += greedy_continuations(llm, model, ids)
    print({k: tuple(v) for k, v in results.items()})
    mx, mean, scale, top1, gen, hf = results["f32"]
    assert mx < 5e-3 * scale and top1 == 1.0  # measured: 0.025 on logits up to 30
    assert gen == hf
    # Q8_0: llama.cpp also rounds activations to 8 bits per 32 values (measured: max 1.8,
    # mean 0.21 on logits up to 30, top-1 all equal); the weights themselves are exact (above)
    mx, mean, scale, top1, gen, hf = results["q8_0"]
    assert mx < 0.15 * scale and mean < 0.02 * scale and top1 >= 0.9
    assert len(gen) == 6 and gen[:2] == hf[:2]


def _tiny_arch(arch: str, vocab: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    model = {"qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False)),
             "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, pad_token_id=0, tie_word_embeddings=False)),
             "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=16)),
             "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                                                              n_positions=128, bos_token_id=0, eos_token_id=0)),
             "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
                 **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=5.0,
                 final_logit_softcapping=3.0)),
             "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
                 vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, bos_token_id=0, eos_token_id=0)),
             "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(
                 vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
                 eos_token_id=0)),
             "falcon_new": lambda: tf.FalconForCausalLM(tf.FalconConfig(
                 vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                 new_decoder_architecture=True, bos_token_id=0, eos_token_id=0)),
             "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
                 **{**common, "num_hidden_layers": 7}, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                 final_logit_softcapping=3.0)),
             "starcoder2": lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(
                 **{k: v for k, v in common.items() if k != "rms_norm_eps"}, norm_epsilon=1e-5, bos_token_id=0,
                 eos_token_id=0)),
             "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
                 **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                 norm_topk_prob=True, tie_word_embeddings=False)),
             }[arch]().eval()
    with torch.no_grad():   # norms away from their initial value: Gemma's 1 + w must be written as such
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if "experts" in name or "mlp.gate." in name:   # experts and routers that matter
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("arch,gguf_arch,fused", [("qwen3", "qwen3", "blk.0.attn_q_norm.weight"),
                                                  ("phi3", "phi3", "blk.0.attn_qkv.weight"),
                                                  ("gemma", "gemma", None),
                                                  ("gpt2", "gpt2", "position_embd.weight"),
                                                  ("gemma2", "gemma2", "blk.0.post_ffw_norm.weight"),
                                                  ("gemma3_text", "gemma3", "blk.6.attn_k_norm.weight"),
                                                  ("starcoder2", "starcoder2", "blk.0.ffn_up.bias"),
                                                  ("gpt_neox", "gptneox", "blk.0.attn_qkv.bias"),
                                                  ("falcon", "falcon", "blk.0.attn_qkv.weight"),
                                                  ("falcon_new", "falcon", "blk.0.attn_norm_2.weight"),
                                                  ("qwen3_moe", "qwen3moe", "blk.0.ffn_gate_exps.weight")])
@pytest.mark.parametrize("quantized", [False, True])
def test_more_architectures_run_in_llama_cpp(default_model, tmp_path, arch, gguf_arch, fused, quantized):
    """Qwen3 (per-head q/k norms), Phi-3 (fused qkv and gate/up), Gemma (x·(1 + w) norms, a
    scaled, tied embedding), GPT-2 (LayerNorm with biases, learned positions, Conv1D weights),
    StarCoder2 (LayerNorm, biases everywhere, GELU MLP) and Qwen3-MoE (stacked experts) leave as
    GGUF, float or as Q4_0 blocks, and llama.cpp gives their logits."""
    from lowbit.api import quantize

    lm = LoadedModel(_tiny_arch(arch, len(default_model.tokenizer)), default_model.tokenizer, "/nonexistent", "hf")
    obj = quantize(lm, lowbit.WeightScheme("int", 4, 32, True), progress=False) if quantized else lm
    path = write_gguf(obj, tmp_path / f"{arch}.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == gguf_arch
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if fused:
        assert fused in types
    down = "blk.1.ffn_down_exps.weight" if arch == "qwen3_moe" else "blk.1.ffn_down.weight"
    assert types[down] == ("Q4_0" if quantized else "F32")
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    _, L = _llama_logits(path, ids)
    H = _model_logits(obj.model, ids)
    scale = np.abs(H).max()
    if quantized:   # llama.cpp rounds the activations to 8 bits for Q4_0 products
        assert np.abs(L - H).max() < 0.1 * scale and np.abs(L - H).mean() < 0.02 * scale
    else:
        assert np.abs(L - H).max() < 1e-3 * scale and (L.argmax(-1) == H.argmax(-1)).all()
