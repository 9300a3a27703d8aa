"""Size-budgeted GGUF: the knapsack against brute force, the Fisher estimate against measured KL
divergence, and the CLI writing a file no larger than asked."""

import itertools
import json
import random

import gguf
import pytest
import torch

from lowbit.calib.fisher import diagonal_fisher, predicted_kld
from lowbit.errors import SchemeError
from lowbit.plan.budget import Choice, allocate, parse_size, tensor_bytes


def _random_problem(rng: random.Random, n_tensors: int):
    options = {}
    for i in range(n_tensors):
        sizes = sorted(rng.sample(range(10, 100), 4))
        costs = sorted((rng.random() for _ in sizes), reverse=True)  # more bytes, less error
        options[f"t{i}"] = [Choice(f"T{j}", b, c) for j, (b, c) in enumerate(zip(sizes, costs))]
    return options


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_within_budget_and_near_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    options = _random_problem(rng, 5)
    floor = sum(min(c.nbytes for c in o) for o in options.values())
    top = sum(max(c.nbytes for c in o) for o in options.values())
    budget = rng.randint(floor, top)
    got = allocate(options, budget)
    assert sum(c.nbytes for c in got.values()) <= budget
    best = min((sum(c.cost for c in combo) for combo in itertools.product(*options.values())
                if sum(c.nbytes for c in combo) <= budget))
    # Lagrangian + greedy fill is not exact on a knapsack; it must stay close to the optimum
    assert sum(c.cost for c in got.values()) <= best * 1.25 + 1e-9


def test_allocation_takes_the_best_when_it_fits_and_refuses_an_impossible_budget():
    options = _random_problem(random.Random(0), 4)
    top = sum(max(c.nbytes for c in o) for o in options.values())
    got = allocate(options, top)
    assert all(got[n] == min(o, key=lambda c: c.cost) for n, o in options.items())
    with pytest.raises(SchemeError, match="size budget is too small"):
        allocate(options, 5)


def test_parse_size_and_tensor_bytes():
    assert parse_size("91.73MB") == 91_730_000
    assert parse_size("2 MiB") == 2 * 2**20
    assert parse_size("1234") == 1234
    with pytest.raises(SchemeError, match="cannot read the size"):
        parse_size("ninety")
    # gguf's own size table: Q4_0 is 18 bytes per 32 weights, Q6_K 210 per 256
    assert tensor_bytes("Q4_0", 10, 64) == 10 * 2 * 18
    assert tensor_bytes("Q6_K", 3, 512) == 3 * 2 * 210


def test_fisher_estimate_matches_measured_kl(tiny_llama, tokenizer):
    """½ Σ F δ² predicts the measured mean per-token KL of a small random perturbation."""
    from lowbit.model.load import load_source
    from lowbit.model.targets import all_weights

    loaded = load_source(str(tiny_llama))
    model = loaded.model
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 95, (48, 24), generator=g)
    targets = [t for t in all_weights(model) if "layers.1.mlp.down_proj" in t.name or "layers.0.self_attn.v_proj" in t.name]
    fisher = diagonal_fisher(model, windows, targets, seed=0, progress=False)
    with torch.no_grad():
        ref = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
        deltas, predicted = {}, 0.0
        for t in targets:
            p = t.parameter(model)
            deltas[t.name] = torch.randn(p.shape, generator=g) * p.abs().mean() * 0.3
            predicted += predicted_kld(fisher[t.name], deltas[t.name])
            p.add_(deltas[t.name])
        cand = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
        measured = float((ref.exp() * (ref - cand)).sum(-1).mean())
        for t in targets:
            t.parameter(model).sub_(deltas[t.name])
    assert measured > 0
    assert 0.5 < predicted / measured < 2.0, (predicted, measured)
    # the model is left as it was: no gradients, same requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_bpe_llama(default_model, tmp_path_factory):
    """A tiny random LLaMA folder with the default model's BPE tokenizer (GGUF needs BPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bpe-llama")
    config = LlamaConfig(vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    default_model.tokenizer.save_pretrained(folder)
    return folder


def _quantize_to_budget(tiny_llama, calib, out, max_size, extra=()):
    from lowbit.cli import main

    argv = ["quantize", str(tiny_llama), "--method", "gptq", "--to", "gguf", "--max-size", str(max_size),
            "--calib", calib.text, "--samples", "4", "--seqlen", "32", "--fisher-windows", "4",
            "--output", str(out), "--json", *extra]
    return main(argv)


def test_cli_max_size_writes_a_file_within_budget(tiny_bpe_llama, calib, tmp_path, capsys):
    from lowbit.cli import main

    tiny_llama = tiny_bpe_llama
    f32 = tmp_path / "f32.gguf"
    assert main(["export", str(tiny_llama), "--to", "gguf", "--type", "F32", "--output", str(f32), "--json"]) == 0
    sizes = {}
    for budget_frac in (0.3, 0.45):
        out = tmp_path / f"b{budget_frac}.gguf"
        max_size = int(f32.stat().st_size * budget_frac)
        capsys.readouterr()
        assert _quantize_to_budget(tiny_llama, calib, out, max_size) == 0
        assert out.stat().st_size <= max_size
        r = gguf.GGUFReader(out)
        recipe = json.loads(bytes(r.fields["lowbit.recipe"].parts[-1]).decode())
        budget = recipe["budget"]
        types = {t.name: t.tensor_type.name for t in r.tensors if t.name in budget["choices"]}
        assert types == budget["choices"]  # the file holds what was chosen (by GGUF name)
        sizes[budget_frac] = out.stat().st_size
        # the estimate is conservative but close: within the recipe reserve (64 KiB) and padding
        assert 0 <= max_size - out.stat().st_size < max_size - budget["estimated_file_bytes"] + 70_000
    assert sizes[0.3] < sizes[0.45]
    # llama.cpp itself loads the mixed-type file and computes finite logits from it
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(tmp_path / "b0.3.gguf"), logits_all=True, n_ctx=64, n_batch=1, verbose=False)
    llm.eval([1, 2, 3, 4])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    del llm
    again = tmp_path / "again.gguf"
    assert _quantize_to_budget(tiny_llama, calib, again, int(f32.stat().st_size * 0.3)) == 0
    assert again.read_bytes() == (tmp_path / "b0.3.gguf").read_bytes()  # same inputs, same bytes


def test_cli_max_size_errors(tiny_bpe_llama, calib, tmp_path, capsys):
    from lowbit.cli import main

    tiny_llama = tiny_bpe_llama
    out = tmp_path / "tiny.gguf"
    assert _quantize_to_budget(tiny_llama, calib, out, 1000) == 2
    assert "raise" in capsys.readouterr().err and not out.exists()
    native = tmp_path / "native"
    assert main(["quantize", str(tiny_llama), "--max-size", "1000", "--calib", calib.text, "--samples", "4",
                 "--seqlen", "32", "--fisher-windows", "2", "--output", str(native)]) == 2
    assert "raise it" in capsys.readouterr().err and not native.exists()
    assert main(["quantize", str(tiny_llama), "--to", "gguf", "--type", "Q4_0", "--max-size", "1MB", "--output", str(out)]) == 2
    assert "drop --type" in capsys.readouterr().err
