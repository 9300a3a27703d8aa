"""Rotations (QuaRot R1 + R2): Hadamard matrices of every size used, the rotated model computes the
same function on several architectures and on the embedded default, a rotated checkpoint loads in
transformers and (quantized, as GGUF) in llama.cpp, and models it cannot rotate are refused."""

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.hadamard import hadamard, rotation
from lowbit.methods.rotation import RotationError, rotate_model
from lowbit.model.load import LoadedModel
from lowbit.plan import recipe_from_dict
from tests.test_awq_smoothquant import build

IDS = torch.tensor([[3, 14, 15, 9, 26, 53, 5, 8, 9, 7, 9, 3, 2, 38, 46, 26]])


@pytest.mark.parametrize("n", [1, 2, 4, 12, 16, 20, 28, 36, 64, 96, 160, 192, 576, 1536])
def test_hadamard_is_a_hadamard_matrix(n):
    H = hadamard(n)
    assert H is not None and set(H.unique().tolist()) <= {-1, 1}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64))


@pytest.mark.parametrize("n,how", [(576, "randomized Hadamard 576"), (64, "randomized Hadamard 64"),
                                   (100, "randomized Hadamard 4 ⊗ random orthogonal 25"),
                                   (52, "randomized Hadamard 4 ⊗ random orthogonal 13")])
def test_rotation_is_orthogonal_and_seeded(n, how):
    Q, desc = rotation(n, 0)
    assert desc == how
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, rotation(n, 0)[0]) and not torch.equal(Q, rotation(n, 1)[0])
    if "orthogonal" not in how:   # a scaled ±1 matrix: every entry has magnitude 1/√n
        assert torch.allclose(Q.abs(), torch.full_like(Q, n ** -0.5))


def _arch(name: str) -> torch.nn.Module:
    import transformers as tf

    if name in ("llama", "qwen2", "mistral"):
        return build(name)
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    model = {
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16)),   # per-head q/k norms
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, pad_token_id=0, eos_token_id=0, bos_token_id=0)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=16)),   # x·(1 + w) norms, tied
        "llama-tied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=True)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16)),
    }[name]().eval()
    with torch.no_grad():   # norms that are not all ones: folding them must matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma", "llama-tied"])
def test_rotation_keeps_the_function(name):
    model = _arch(name)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ref = _logits(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = rotate_model(model)
    out = _logits(model)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert info["untied_head"] == tied
    if tied:
        assert not model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    # really rotated: the embedding and every projection changed; the norms are plain x / rms(x)
    after = dict(model.named_parameters())
    assert not torch.allclose(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"], atol=1e-3)
    unit = 0.0 if name == "gemma" else 1.0
    for n, p in after.items():
        if n.endswith("layernorm.weight") or n == "model.norm.weight":
            assert torch.all(p == unit), n
    assert ("per_head" in info) == (name != "phi3")   # phi3's fused qkv: no per-head rotation of V
    assert rotate_model(model) is info   # once only


def test_rotation_keeps_the_default_models_function(default_model):
    import copy

    model = copy.deepcopy(default_model.model)
    ids = default_model.tokenizer("The quick brown fox jumps over the lazy dog. 1 + 2 = 3", return_tensors="pt")["input_ids"]
    ref = _logits(default_model.model, ids)
    info = rotate_model(model)
    assert info["residual"] == "randomized Hadamard 576" and info["per_head"] == "randomized Hadamard 64"
    assert info["untied_head"]
    out = _logits(model, ids)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name,msg", [("gpt2", "LayerNorm"), ("opt", "LayerNorm"), ("gemma2", "pre_feedforward_layernorm")])
def test_unrotatable_models_are_refused_untouched(name, msg):
    model = _arch(name) if name == "gemma2" else build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RotationError, match=msg):
        rotate_model(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_rotate_cli_writes_a_checkpoint_transformers_loads(tmp_path, tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "tied"
    model = _arch("llama-tied")
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "rotated"
    assert main(["-q", "rotate", str(src), "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["streamed"] is True   # a safetensors folder: a layer at a time
    rotated = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not rotated.config.tie_word_embeddings
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    ref = _logits(model)
    assert (_logits(rotated) - ref).abs().max() < 1e-4 * ref.abs().max()
    rotate_model(model)   # the resident rotation's values, bit for bit
    state = rotated.state_dict()
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())


def test_rotated_gptq_reloads_and_records_its_rotation(tiny_llama, tmp_path, calib):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--rotate", "hadamard", "--rotate-seed", "3", "--calib", calib.text, "--samples", "4",
                 "--seqlen", "32", "-o", str(out)]) == 0
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["recipe"]["recipe"]["rotate"] == {"kind": "hadamard", "seed": 3}
    assert meta["recipe"]["rotation"]["residual"] == "randomized Hadamard 96"
    qm = lowbit.load(out)
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    # quantized after the rotation, still close to the unrotated source
    ref = _logits(src)
    assert (_logits(qm.model) - ref).abs().max() < 0.2 * ref.abs().max()
    # the recorded recipe reruns to the same weights
    again = tmp_path / "again"
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({**meta["recipe"]["recipe"], "calibration": {**meta["recipe"]["recipe"]["calibration"]}}))
    assert main(["-q", "quantize", str(tiny_llama), "--recipe", str(recipe), "-o", str(again)]) == 0
    qm2 = lowbit.load(again)
    for name, qt in qm.tensors.items():
        assert torch.equal(qt.codes, qm2.tensors[name].codes), name


def test_rotate_recipe_round_trip_and_bad_input(tiny_llama, tmp_path, capsys):
    r = recipe_from_dict({"method": "rtn", "rotate": {"kind": "hadamard", "seed": 5}})
    assert (r.rotate, r.rotate_seed) == ("hadamard", 5) and recipe_from_dict(r.to_dict()) == r
    assert recipe_from_dict({"rotate": "hadamard"}).rotate == "hadamard"
    for argv, msg in [(["--rotate", "learned"], "not implemented"),
                      (["--rotate", "hadamard", "--recipe", str(tmp_path / "x.yaml")], "drop --rotate")]:
        (tmp_path / "x.yaml").write_text("method: rtn\n")
        out = tmp_path / "o"
        assert main(["quantize", str(tiny_llama), *argv, "-o", str(out)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("lowbit: error:") and msg in last and not out.exists()


def test_rotating_gpt2_is_one_line_exit_2(tmp_path, capsys, tokenizer):
    src = tmp_path / "gpt2"
    build("gpt2").save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "o"
    assert main(["quantize", str(src), "--rotate", "hadamard", "-o", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowbit: error:") and "LayerNorm" in last and not out.exists()


@pytest.mark.e2e
def test_rotated_q4_0_runs_in_llama_cpp_with_lowbits_logits(default_model, tmp_path):
    """A tied model, rotated (so its head is untied: output.weight is written) and quantized to
    symmetric INT4 g32 (= Q4_0 blocks): llama.cpp's logits equal lowbit's own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.api import quantize
    from lowbit.export.gguf import write_gguf
    from tests.test_gguf_export import PROMPT, _llama_logits, _model_logits

    import gguf

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(default_model.tokenizer), hidden_size=192, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    qm = quantize(LoadedModel(model, default_model.tokenizer, "/nonexistent", "hf"),
                  lowbit.WeightScheme("int", 4, 32, True), rotate="hadamard", progress=False)
    path = write_gguf(qm, tmp_path / "rotated.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and "output.weight" in types
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    _, L = _llama_logits(path, ids)
    H = _model_logits(qm.model, ids)
    scale = np.abs(H).max()
    assert np.abs(L - H).max() < 0.05 * scale and np.abs(L - H).mean() < 0.01 * scale


@pytest.mark.e2e
def test_rotated_default_runs_in_llama_cpp_unchanged(default_model, tmp_path):
    """The embedded default, rotated (untied head, unit norms) and written as an F32 GGUF: llama.cpp
    gives the unrotated model's logits and greedy continuation."""
    import copy

    import gguf

    from lowbit.export.gguf import write_gguf
    from tests.test_gguf_export import PROMPT, _llama_logits, _model_logits, greedy_continuations

    rotated = copy.deepcopy(default_model)
    rotate_model(rotated.model)
    path = write_gguf(rotated, tmp_path / "rotated-f32.gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" in names
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    llm, L = _llama_logits(path, ids)
    H = _model_logits(default_model.model, ids)   # the source, not rotated
    assert np.abs(L - H).max() < 5e-3 * np.abs(H).max() and (L.argmax(-1) == H.argmax(-1)).all()
    gen, want = greedy_continuations(llm, default_model.model, ids)
    assert gen == want
