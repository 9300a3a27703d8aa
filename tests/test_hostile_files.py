"""Files from strangers: a truncated or corrupt model file, a config that is not JSON, a file that
is not what its name says. Each command that reads them ends in one line, exit 2, nothing written;
and a seeded fuzz of the file checks: every mutated file passes or is a SourceError, nothing else."""

import random

import pytest

from lowbit.cli import main
from lowbit.errors import SourceError
from lowbit.model.files import check_gguf, check_json, check_safetensors


@pytest.fixture(scope="module")
def tiny_gguf(default_model, tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(default_model.tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True)
    lm = LoadedModel(LlamaForCausalLM(config).eval(), default_model.tokenizer, "/nonexistent", "hf")
    return write_gguf(lm, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CASES = {
    "config is not JSON": (lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
    "config is a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    "weights cut in half": (lambda d: _truncate(d / "model.safetensors", 0.5), "is truncated"),
    "weights cut to 4 bytes": (lambda d: _truncate(d / "model.safetensors", 0.0000001), "too short"),
    "header claims 1 TB": (lambda d: (d / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}"),
                           "header claims"),
    "header is not JSON": (lambda d: (d / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{["),
                           "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["quantize", "info", "eval"])
def test_broken_hf_folder_is_one_line(tiny_llama, tmp_path, capsys, case, command):
    folder = _copy(tiny_llama, tmp_path / "m")
    spoil, msg = CASES[case]
    spoil(folder)
    out = tmp_path / "out"
    argv = {"quantize": ["quantize", str(folder), "--group-size", "32", "-o", str(out)], "info": ["info", str(folder)],
            "eval": ["eval", str(folder), "--reference", str(tiny_llama), "--windows", "1", "--ctx", "16"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowbit: error:") and msg in err[0] and not out.exists()


@pytest.mark.parametrize("spoil,msg", [(lambda p: _truncate(p, 0.6), "truncated or corrupt"),
                                       (lambda p: p.write_bytes(b"PK\x03\x04not a gguf"), "not a GGUF file")])
@pytest.mark.parametrize("command", ["quantize", "info"])
def test_broken_gguf_is_one_line(tiny_gguf, tmp_path, capsys, spoil, msg, command):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes())
    spoil(bad)
    out = tmp_path / "out"
    argv = ["quantize", str(bad), "-o", str(out)] if command == "quantize" else ["info", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowbit: error:") and msg in err[0] and not out.exists()


def _mutations(data: bytes, rng: random.Random, n: int):
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(3)
        if kind == 0:                                   # flip bytes, mostly in the header region
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(min(len(b), 4096))] = rng.randrange(256)
        elif kind == 1:                                 # truncate anywhere
            b = b[: rng.randrange(len(b))]
        else:                                           # splice in garbage
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        yield bytes(b)


@pytest.mark.parametrize("kind", ["safetensors", "json", "gguf", "recipe"])
def test_fuzzed_files_pass_or_are_a_source_error(tiny_llama, tiny_gguf, tmp_path, kind):
    """A small seeded sample (bench/fuzz_readers.py runs 10^5 cases the same way)."""
    from lowbit.errors import LowbitError
    from lowbit.plan import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: gptq\nscheme: {format: int, bits: 4, group_size: 128}\ncalibration: {samples: 16}\n"
                      "groups:\n  - targets: ['down_proj']\n    scheme: {bits: 8, group_size: -1}\n")
    src = {"safetensors": tiny_llama / "model.safetensors", "json": tiny_llama / "config.json", "gguf": tiny_gguf,
           "recipe": recipe}[kind]
    check = {"safetensors": check_safetensors, "json": check_json, "gguf": check_gguf, "recipe": load_recipe}[kind]
    error = LowbitError if kind == "recipe" else SourceError
    rng = random.Random(0)
    path = tmp_path / f"fuzzed-{src.name}"
    outcomes = {"ok": 0, "refused": 0}
    for data in _mutations(src.read_bytes(), rng, 60):
        path.write_bytes(data)
        try:
            check(path)
            outcomes["ok"] += 1
        except error:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0
