"""Sharded outputs (`--max-shard-size`): the weights of a folder output split into safetensors
shards with Hugging Face's index; lowbit, transformers and the streamed runner read and write them
with the same tensors as one file."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.api import quantize
from lowbit.export import compressed_tensors as ct_export
from lowbit.export import native
from lowbit.model.lazy import CheckpointWeights

PROMPT = torch.tensor([[5, 17, 40, 3, 60, 22, 9, 31]])


def _tensors(folder) -> dict[str, bytes]:
    w = CheckpointWeights(folder)
    return {k: t.read().reshape(-1).view(torch.uint8).numpy().tobytes() for k, t in w.tensors.items()}


def _logits(model):
    with torch.no_grad():
        return model(PROMPT).logits.float()


@pytest.fixture(scope="module")
def w4(tiny_llama):
    return quantize(str(tiny_llama), lowbit.WeightScheme("int", 4, 32, True), progress=False)


def test_native_shards_hold_the_same_tensors_and_load(w4, tmp_path):
    one = native.save(w4, tmp_path / "one")
    many = native.save(w4, tmp_path / "many", max_shard_bytes=20_000)
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    sizes = [p.stat().st_size for p in many.glob("*.safetensors")]
    assert index["metadata"]["total_size"] <= sum(sizes)
    assert _tensors(one) == _tensors(many)
    for runtime in ("decoded", "packed"):
        a, b = native.load(one, runtime=runtime), native.load(many, runtime=runtime)
        assert torch.equal(_logits(a.model), _logits(b.model)), runtime
        name = next(iter(a.tensors))
        assert torch.equal(a.tensors[name].codes, b.tensors[name].codes)
    # deterministic: the same bytes twice
    again = native.save(w4, tmp_path / "again", max_shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in many.iterdir()} == {p.name: p.read_bytes() for p in again.iterdir()}


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors not installed")
def test_transformers_loads_sharded_compressed_tensors(w4, tmp_path):
    from transformers import AutoModelForCausalLM

    out = ct_export.export_compressed_tensors(w4, tmp_path / "ct", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (_logits(loaded) - _logits(w4.model)).abs().max().item() <= 1e-5
    back = ct_export.import_checkpoint(out)
    for name, qt in w4.tensors.items():
        assert torch.equal(back.tensors[name].codes, qt.codes)


def test_cli_shards_and_refuses_gguf(tiny_llama, tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "lowbit", "--quiet", *map(str, argv)], capture_output=True, text=True)

    r = run("quantize", tiny_llama, "--bits", "4", "--group-size", "32", "--max-shard-size", "30KB", "-o", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "q").glob("model-*-of-*.safetensors"))) > 1
    r = run("quantize", tiny_llama, "--to", "gguf", "--type", "Q8_0", "--max-shard-size", "30KB", "-o", tmp_path / "g.gguf")
    assert r.returncode == 2 and "one file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.gguf").exists()
    r = run("quantize", tiny_llama, "--max-shard-size", "0", "-o", tmp_path / "z")
    assert r.returncode == 2 and "positive" in r.stderr and not (tmp_path / "z").exists()
