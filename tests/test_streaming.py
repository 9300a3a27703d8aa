"""Layer-streamed quantization (lowbit.streaming): a safetensors source is read one decoder layer
at a time, the output equals the resident run's byte for byte, and a killed run resumes to the
same bytes. The streamed writer is checked against the safetensors library."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.export.safetensors_io import stored_tensors, write_safetensors

CALIB_ARGS = ["--samples", "4", "--seqlen", "32", "--group-size", "32"]


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory, tiny_llama):
    """The tiny LLaMA with 4 layers, stored in bf16 over several shards with an index."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("bf16-sharded")
    config = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.fixture(scope="module")
def bf16_sharded_bpe(tmp_path_factory, default_model):
    """A 2-layer LLaMA with the embedded default's BPE tokenizer (what GGUF export carries), bf16, sharded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("bf16-sharded-bpe")
    config = LlamaConfig(vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="2MB")
    default_model.tokenizer.save_pretrained(folder)
    return folder


def _run(*argv, check=True, prelude=""):
    """lowbit's CLI in a fresh process, after the Python statements `prelude`."""
    main = f"{prelude}\nfrom lowbit.cli import main; raise SystemExit(main({['--quiet', *map(str, argv)]!r}))"
    r = subprocess.run([sys.executable, "-c", main], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_writer_matches_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g), "a": torch.randn(3, 5, generator=g),
               "scalar": torch.tensor(2.5), "half": torch.randn(4, 2, generator=g).bfloat16(),
               "fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn), "mask": torch.tensor([True, False])}
    write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "x"})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    stored, meta = stored_tensors(tmp_path / "a.safetensors")
    assert meta == {"format": "x"}
    # byte ranges of another file, one converted bf16 -> F32 on the way, give the same file again
    write_safetensors(tmp_path / "b.safetensors", {**stored, "half32": stored["half"].converted("F32")}, {"format": "x"})
    again = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(again["half32"], tensors["half"].float())
    assert torch.equal(again["a"], tensors["a"])


def test_checkpoint_reads_convert_a_block_of_rows_at_a_time(bf16_sharded, monkeypatch):
    """A big tensor is converted to float32 a few rows at a time, to the same values."""
    import lowbit.model.lazy as lazy_mod

    weights = lazy_mod.CheckpointWeights(bf16_sharded)
    name = "model.layers.0.mlp.down_proj.weight"
    whole = weights.tensors[name].read().float()
    monkeypatch.setattr(lazy_mod, "READ_BLOCK_ELEMENTS", 7 * 160)   # 7 rows of 160 per step
    seen = []
    real = type(weights.tensors[name]).read_rows
    monkeypatch.setattr(type(weights.tensors[name]), "read_rows", lambda self, a, b: (seen.append(b - a), real(self, a, b))[1])
    assert torch.equal(weights.read(name), whole) and weights.read(name).dtype == torch.float32
    assert max(seen) == 7 and len(seen) >= 2 * (96 // 7)


@pytest.mark.parametrize("method,extra", [("rtn", []), ("gptq", []), ("awq", []),
                                          ("hqq", ["--zero-point", "float"])])
def test_streamed_output_equals_the_resident_one(bf16_sharded, calib, tmp_path, method, extra):
    """The same plan run resident (whole model in fp32) and streamed: identical folders."""
    from lowbit.api import execute, make_recipe
    from lowbit.export.native import save
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme
    from lowbit.streaming import quantize_streamed

    scheme = WeightScheme(bits=4, group_size=32, symmetric=False, zero_point="float" if extra else "int")
    recipe = make_recipe(scheme, method=method, calibration=calib)
    loaded = load_source(bf16_sharded)
    save(execute(loaded, build_plan(loaded, recipe, "native", False), progress=False), tmp_path / "resident")
    lazy = load_lazy(bf16_sharded)
    assert lazy is not None and all(p.is_meta for p in lazy.model.parameters())
    result = quantize_streamed(lazy, build_plan(lazy, recipe, "native", False), tmp_path / "streamed", progress=False)
    assert result.weights_quantized == 4 * 7
    assert _files(tmp_path / "resident") == _files(tmp_path / "streamed")
    assert not list(tmp_path.glob(".*partial"))


@pytest.fixture(scope="module")
def bf16_tied(tmp_path_factory, default_model):
    """A 2-layer LLaMA whose head is its embedding, with the default's BPE tokenizer, bf16,
    sharded, norms not all ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("bf16-tied")
    config = LlamaConfig(vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="2MB")
    default_model.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("source,method,container", [("bf16_sharded", "rtn", "native"), ("bf16_tied", "gptq", "native"),
                                                     ("bf16_tied", "rtn", "gptq"), ("bf16_sharded_bpe", "rtn", "gguf")])
def test_rotated_streamed_run_equals_the_resident_one(request, calib, tmp_path, monkeypatch, source, method, container):
    """--rotate streams: each layer is rotated as it is read into a hidden float32 checkpoint
    (the embedding and head a few rows at a time), whose values, logit check and quantized
    output are the resident rotation's, bit for bit; a tied head is untied in both."""
    import lowbit.methods.rotation as rotation
    import lowbit.streaming as streaming
    from lowbit.api import execute, make_recipe
    from lowbit.export import write as write_output
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme

    folder = request.getfixturevalue(source)
    monkeypatch.setattr(rotation, "ROW_BLOCK_ELEMENTS", 7 * 64)
    scheme = WeightScheme(bits=4, group_size=32, symmetric=True) if container != "gguf" else WeightScheme("gguf_q4_0", None, -1)
    recipe = make_recipe(scheme, method=method, calibration=calib, rotate="hadamard", rotate_seed=2)
    assert streaming.resident_reason(recipe, container) is None
    loaded = load_source(folder)
    qm = execute(loaded, build_plan(loaded, recipe, container, False), progress=False)
    suffix = ".gguf" if container == "gguf" else ""
    write_output(qm, container, tmp_path / f"resident{suffix}")
    lazy = load_lazy(folder)
    seen = []
    real = streaming._rotate_into
    monkeypatch.setattr(streaming, "_rotate_into", lambda model, *a: (seen.append(model), real(model, *a))[1])
    streaming.quantize_streamed(lazy, build_plan(lazy, recipe, container, False), tmp_path / f"streamed{suffix}",
                                progress=False)
    assert seen and lazy.model._lowbit_rotation == loaded.model._lowbit_rotation
    assert lazy.model._lowbit_rotation["untied_head"] == (source == "bf16_tied")
    if container == "gguf":
        assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "resident.gguf").read_bytes()
    else:
        assert _files(tmp_path / "resident") == _files(tmp_path / "streamed")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"resident{suffix}", f"streamed{suffix}"])


def test_a_model_the_rotation_would_change_is_refused_with_nothing_left(bf16_sharded, tmp_path):
    r = _run("quantize", bf16_sharded, "--group-size", "32", "--rotate", "hadamard", "-o", tmp_path / "o",
             prelude="import lowbit.methods.rotation as r; r.TOLERANCE = 0.0", check=False)
    assert r.returncode == 2 and "changed its logits" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method,to,observer,head", [("rtn", "native", "minmax", False), ("gptq", "compressed-tensors", "mse", False),
                                                     ("rtn", "native", "percentile", True)])
def test_static_activation_scales_stream_to_the_resident_bytes(bf16_sharded, calib, tmp_path, method, to, observer, head):
    """Static input scales stream: after the layers, each layer is read again with its quantized
    weights from the parts and run on the calibration batches under observers (a static head last,
    after the final norm): the scales, and so the folders, are the resident run's."""
    from lowbit.api import execute, make_recipe
    from lowbit.export import write as write_output
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme
    from lowbit.streaming import quantize_streamed, resident_reason

    scheme = QuantScheme(WeightScheme("int", 8, -1, True), ActivationScheme("int", 8, "tensor", False, observer=observer))
    picks = dict(include=[r"q_proj|down_proj|lm_head"], exclude=[]) if head else {}
    recipe = make_recipe(scheme, method=method, calibration=calib, **picks)
    assert resident_reason(recipe, to) is None
    loaded = load_source(bf16_sharded)
    plan = build_plan(loaded, recipe, to, False)
    assert plan.needs_static_activations and ("lm_head.weight" in plan.tensors) == head
    write_output(execute(loaded, plan, progress=False), to, tmp_path / "resident")
    lazy = load_lazy(bf16_sharded)
    quantize_streamed(lazy, build_plan(lazy, recipe, to, False), tmp_path / "streamed", progress=False)
    assert _files(tmp_path / "resident") == _files(tmp_path / "streamed")
    meta = json.loads((tmp_path / "streamed" / "lowbit.json").read_text()) if to == "native" else None
    if meta is not None:   # every static scale is there
        assert all(m["input_quant"]["scale"] > 0 for m in meta["tensors"].values())


@pytest.mark.parametrize("source,container,budget", [("bf16_sharded", "native", dict(target_bpw=4.5)),
                                                     ("bf16_sharded_bpe", "gguf", dict(target_bpw=5.0)),
                                                     ("bf16_tied", "gguf", dict(target_bpw=5.0))])
def test_a_size_budget_streams_to_the_resident_plan_and_bytes(request, calib, tmp_path, monkeypatch, source, container, budget):
    """A size budget's diagonal Fisher runs layer by layer (forward keeping each layer's inputs,
    backward in reverse from the head, each weight priced as soon as its F is done, the
    embedding and a tied head last): the same prices, choices and output as the resident run,
    with no two layers ever real at once."""
    import lowbit.model.lazy as lazy_mod
    from lowbit.api import execute, make_recipe
    from lowbit.export import write as write_output
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.plan.recipe import Budget
    from lowbit.streaming import quantize_streamed

    folder = request.getfixturevalue(source)
    recipe = make_recipe("W4A16", method="rtn", calibration=calib, budget=Budget(fisher_windows=3, **budget))
    loaded = load_source(folder)
    plan = build_plan(loaded, recipe, container, False)
    lazy = load_lazy(folder)
    real = lazy_mod.materialize
    most = []

    def materialize(model, prefix, weights):   # count the decoder layers holding real weights
        real(model, prefix, weights)
        most.append(sum(not next(layer.parameters()).is_meta for layer in model.model.layers))

    monkeypatch.setattr(lazy_mod, "materialize", materialize)
    streamed_plan = build_plan(lazy, recipe, container, False)
    monkeypatch.undo()
    assert max(most) == 1
    assert streamed_plan.budget == plan.budget
    assert streamed_plan.summary() == plan.summary()
    assert len(set(plan.budget["choices"].values())) > 1   # a real mix, not one type everywhere
    if source == "bf16_tied":   # one tensor for token_embd and the head, priced with both gradients
        assert "model.embed_tokens.weight" in plan.tensors and "lm_head.weight" not in plan.tensors
    suffix = ".gguf" if container == "gguf" else ""
    write_output(execute(loaded, plan, progress=False), container, tmp_path / f"resident{suffix}")
    quantize_streamed(lazy, streamed_plan, tmp_path / f"streamed{suffix}", progress=False)
    if container == "gguf":
        assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "resident.gguf").read_bytes()
    else:
        assert _files(tmp_path / "resident") == _files(tmp_path / "streamed")


@pytest.fixture(scope="module")
def per_expert_moe(tmp_path_factory, default_model):
    """Tiny Mixtral and Qwen2-MoE checkpoints as transformers saves them (one tensor per expert,
    12 experts so that 10 and 11 sort after 2), bf16, sharded, with a BPE tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    folders = {}
    for kind, model in [("mixtral", lambda: MixtralForCausalLM(MixtralConfig(num_local_experts=12, **common))),
                        ("qwen2_moe", lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
                            num_experts=12, moe_intermediate_size=32, shared_expert_intermediate_size=64, **common)))]:
        torch.manual_seed(4)
        m = model().eval()
        with torch.no_grad():   # experts and routers that matter
            for name, p in m.named_parameters():
                if "experts" in name or "gate" in name:
                    p.normal_(0, 0.05)
        folders[kind] = tmp_path_factory.mktemp(f"per-expert-{kind}")
        m.to(torch.bfloat16).save_pretrained(folders[kind], max_shard_size="2MB")
        default_model.tokenizer.save_pretrained(folders[kind])
    return folders


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_per_expert_checkpoints_stream_as_the_stacked_experts_transformers_loads(per_expert_moe, calib, tmp_path, kind):
    """A checkpoint with one tensor per expert opens lazily under transformers' own conversion
    mapping (renamed keys, experts stacked, gate and up concatenated), as byte ranges: each
    stacked tensor reads as transformers' loaded parameter, whole or by rows; GPTQ (experts
    calibrated on their routed tokens) and a GGUF export stream to the resident run's bytes."""
    from transformers import AutoModelForCausalLM

    from lowbit.api import execute, make_recipe
    from lowbit.export import write as write_output
    from lowbit.export.safetensors_io import PiecedTensor
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme
    from lowbit.streaming import quantize_streamed

    folder = per_expert_moe[kind]
    lazy = load_lazy(folder)
    assert lazy is not None
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert sorted(lazy.weights.tensors) == sorted(ref)
    stacked = [n for n, t in lazy.weights.tensors.items() if isinstance(t, PiecedTensor)]
    assert len(stacked) == 2 * 2   # gate_up_proj and down_proj of both layers
    for n in lazy.weights.tensors:
        assert torch.equal(lazy.weights.read(n), ref[n]), n
    t = lazy.weights.tensors[stacked[0]]
    assert torch.equal(t.read_rows(7, 200), ref[stacked[0]].reshape(-1, t.shape[-1])[7:200].bfloat16())
    for method, container, scheme in [("gptq", "native", WeightScheme(bits=4, group_size=32)),
                                      ("rtn", "gguf", WeightScheme("gguf_q4_0", None, -1))]:
        recipe = make_recipe(scheme, method=method, calibration=calib)
        loaded = load_source(folder)
        suffix = ".gguf" if container == "gguf" else ""
        write_output(execute(loaded, build_plan(loaded, recipe, container, False), progress=False), container,
                     tmp_path / f"resident-{method}{suffix}")
        lazy = load_lazy(folder)
        plan = build_plan(lazy, recipe, container, False)
        assert {n for n in stacked} <= set(plan.tensors)   # the stacked experts are quantized
        quantize_streamed(lazy, plan, tmp_path / f"streamed-{method}{suffix}", progress=False)
        if container == "gguf":
            assert (tmp_path / f"streamed-{method}.gguf").read_bytes() == (tmp_path / f"resident-{method}.gguf").read_bytes()
        else:
            assert _files(tmp_path / f"resident-{method}") == _files(tmp_path / f"streamed-{method}")


@pytest.mark.parametrize("scheme", [
    dict(format="int", bits=3, group_size=32, symmetric=False), dict(format="int", bits=8, group_size=-1),
    dict(format="int", bits=4, group_size=0),                  # per-tensor scale: quantized whole
    dict(format="fp8_e4m3", bits=None, group_size=-1), dict(format="mxfp4", bits=None, group_size=32),
    dict(format="nvfp4", bits=None, group_size=16),           # global scale: quantized whole
    dict(format="nf4", bits=None, group_size=32, double_quant=True),   # rows coupled: quantized whole
    dict(format="gguf_q4_1", bits=None, group_size=32, symmetric=False),
    dict(format="int", bits=4, group_size=32, symmetric=False, zero_point="float", method="hqq")])
def test_weights_read_a_block_of_rows_at_a_time_quantize_the_same(bf16_sharded, tmp_path, monkeypatch, scheme):
    """Data-free methods read a big matrix a block of rows at a time (here 5 rows of 96): the
    output is the resident run's, also where a format needs the whole matrix (then read whole)."""
    import lowbit.streaming as streaming
    from lowbit.api import execute, make_recipe
    from lowbit.export.native import save
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme

    scheme = dict(scheme)
    method = scheme.pop("method", "rtn")
    monkeypatch.setattr(streaming, "ROW_BLOCK_ELEMENTS", 5 * 96)
    recipe = make_recipe(WeightScheme(**scheme), method=method, include=[r"layers\.[01]\..*(q_proj|down_proj)"])
    loaded = load_source(bf16_sharded)
    save(execute(loaded, build_plan(loaded, recipe, "native", False), progress=False), tmp_path / "resident")
    lazy = load_lazy(bf16_sharded)
    streaming.quantize_streamed(lazy, build_plan(lazy, recipe, "native", False), tmp_path / "streamed", progress=False)
    assert _files(tmp_path / "resident") == _files(tmp_path / "streamed")


def test_one_layer_in_memory_at_a_time(bf16_sharded, calib, tmp_path, monkeypatch):
    """When a layer is read, no other decoder layer holds real weights."""
    import lowbit.streaming as streaming
    from lowbit.api import make_recipe
    from lowbit.model.load import load_lazy
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme

    lazy = load_lazy(bf16_sharded)
    layers = lazy.model.model.layers
    resident_layers = []
    real = streaming.materialize

    def watch(model, prefix, weights):
        resident_layers.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))
        real(model, prefix, weights)

    monkeypatch.setattr(streaming, "materialize", watch)
    recipe = make_recipe(WeightScheme(bits=3, group_size=32), method="gptq", calibration=calib)
    streaming.quantize_streamed(lazy, build_plan(lazy, recipe, "native", False), tmp_path / "out", progress=False)
    assert resident_layers == [0, 0, 0, 0]
    assert all(p.is_meta for p in layers.parameters())


_KILLER = """
import os, random, signal, sys
import lowbit.streaming as s
from lowbit.cli import main
at, mid = int(sys.argv[1]), sys.argv[2] == "mid"
real = s._atomic_safetensors
count = [0]
def write(path, tensors, metadata):
    if path.name.startswith("layer-"):
        count[0] += 1
        if count[0] == at and mid:   # the part's temporary file written, not yet renamed
            s.write_safetensors(path.with_name(path.name + ".tmp"), tensors, metadata)
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, tensors, metadata)
    if path.name.startswith("layer-") and count[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
s._atomic_safetensors = write
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("method,seed,mid,rotate", [("gptq", 0, False, False), ("gptq", 1, True, False),
                                                   ("rtn", 2, True, False), ("rtn", 3, False, True)])
def test_killed_run_resumes_to_the_same_bytes(bf16_sharded, calib, tmp_path, method, seed, mid, rotate):
    """SIGKILL after a random layer's part (or in the middle of writing one), then --resume: the
    bytes of an uninterrupted run, and no output until the end. A rotated run's finished rotation
    is reused, not redone."""
    data = ["--calib", calib.text, *CALIB_ARGS] if method == "gptq" else ["--group-size", "32"]
    args = ["quantize", bf16_sharded, "--method", method, *data, "--bits", "3", *(["--rotate", "hadamard"] if rotate else [])]
    _run(*args, "-o", tmp_path / "whole")
    at = random.Random(seed).randint(1, 3)
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-c", _KILLER, str(at), "mid" if mid else "after", "--quiet", *map(str, args), "-o", str(out)]
    killed = subprocess.run(cmd, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    partial = tmp_path / f".{out.name}.partial"
    assert len(list((partial / "parts").glob("layer-*.safetensors"))) == (at - 1 if mid else at)
    rotated = tmp_path / f".{out.name}.rotated"
    assert rotated.exists() == rotate
    # resuming reuses a finished rotation: rotating again would fail here
    r = _run(*args, "-o", out, "--resume", "--json", prelude="import lowbit.streaming as s; s._rotate_into = None")
    # a layer written but killed before its outputs were saved (GPTQ's next inputs) is redone
    redo = mid or method == "gptq"
    assert json.loads(r.stdout)["resumed_at_layer"] == (at - 1 if redo else at)
    assert _files(out) == _files(tmp_path / "whole")
    assert not partial.exists() and not rotated.exists()


def test_resume_refuses_a_different_run(bf16_sharded, calib, tmp_path):
    args = ["quantize", bf16_sharded, "--method", "rtn", *["--group-size", "32"]]
    killed = subprocess.run([sys.executable, "-c", _KILLER, "2", "after", "--quiet", *map(str, args), "--bits", "4",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert killed.returncode == -9
    r = _run(*args, "--bits", "3", "-o", tmp_path / "out", "--resume", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "different run" in r.stderr and "recipe" in r.stderr
    assert not (tmp_path / "out").exists()


def test_resume_of_a_resident_run_is_refused(tmp_path):
    r = _run("quantize", "--method", "rtn", "-o", tmp_path / "out", "--resume", check=False)
    assert r.returncode == 2 and "holds the whole model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_shards_are_one_line(bf16_sharded, tmp_path):
    import shutil

    index = json.loads((bf16_sharded / "model.safetensors.index.json").read_text())
    missing = tmp_path / "missing"
    shutil.copytree(bf16_sharded, missing)
    (missing / sorted(set(index["weight_map"].values()))[1]).unlink()
    r = _run("quantize", missing, "-o", tmp_path / "o1", check=False)
    assert r.returncode == 2 and "is missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    wrong = tmp_path / "wrong"
    shutil.copytree(bf16_sharded, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 192
    (wrong / "config.json").write_text(json.dumps(config))
    r = _run("quantize", wrong, "-o", tmp_path / "o2", check=False)
    assert r.returncode == 2 and "different models" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    moved = tmp_path / "moved"
    shutil.copytree(bf16_sharded, moved)
    name = next(iter(index["weight_map"]))
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (moved / "model.safetensors.index.json").write_text(json.dumps(index))
    r = _run("quantize", moved, "-o", tmp_path / "o3", check=False)
    assert r.returncode == 2 and "disagree" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_heap_trim_returns_free_pages_in_the_middle_of_the_heap():
    """Freed sub-threshold blocks between live ones stay resident until heap.trim (glibc's
    malloc_trim), which a streamed run calls after every solve and layer."""
    import ctypes

    from lowbit import heap

    if heap._glibc() is None:
        pytest.skip("not glibc")
    libc = heap._glibc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 << 10, 2048      # 128 MB in blocks below glibc's mmap threshold: on the heap
    ptrs = [libc.malloc(block) for _ in range(count)]
    for p in ptrs:
        ctypes.memset(p, 1, block)
    try:
        for p in ptrs[::2]:            # every other block freed: no free block can merge with the top
            libc.free(p)
        before = _rss_anon()
        heap.trim()
        returned = before - _rss_anon()
    finally:
        for p in ptrs[1::2]:
            libc.free(p)
    assert returned > 0.8 * block * count // 2, returned


def test_streamed_run_trims_the_heap_after_each_layer(bf16_sharded, calib, tmp_path, monkeypatch):
    import lowbit.streaming as streaming
    from lowbit import heap
    from lowbit.api import make_recipe
    from lowbit.model.load import load_lazy
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme

    trims, layers_done = [], []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(len(layers_done)))
    real = streaming._StreamedRun.save_hidden
    monkeypatch.setattr(streaming._StreamedRun, "save_hidden",
                        lambda self, i, outputs: (layers_done.append(i), real(self, i, outputs)))
    lazy = load_lazy(bf16_sharded)
    recipe = make_recipe(WeightScheme(bits=3, group_size=32), method="gptq", calibration=calib)
    streaming.quantize_streamed(lazy, build_plan(lazy, recipe, "native", False), tmp_path / "out", progress=False)
    assert layers_done == [0, 1, 2, 3]
    assert all(n in trims for n in range(1, 5)), trims   # a trim once each layer is written


@pytest.mark.parametrize("method,mix,full_precision", [("rtn", "Q4_K_M", None), ("gptq", "Q4_0", None),
                                                       ("rtn", "Q8_0", "F16"), ("rtn", None, None), ("rtn", None, "BF16")])
def test_streamed_gguf_equals_the_resident_one(bf16_sharded_bpe, calib, tmp_path, monkeypatch, method, mix, full_precision):
    """--to gguf streams too: the GGUF file written tensor by tensor from the parts and the
    source equals the resident run's file byte for byte; no part folder is left. Without a mix
    the embedding and head stay float and are written a few rows at a time."""
    from lowbit.api import execute, make_recipe
    from lowbit.export import gguf as gguf_export
    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme
    from lowbit.streaming import quantize_streamed, resident_reason

    monkeypatch.setattr(gguf_export._RowBlocks, "ROWS_ELEMENTS", 1000)   # 15 rows of 64 per block
    blocks = []
    real = gguf_export._float_array
    monkeypatch.setattr(gguf_export, "_float_array", lambda t, type_name: (blocks.append(tuple(t.shape)), real(t, type_name))[1])
    scheme = "W4A16" if mix else WeightScheme("gguf_q4_0", None, -1)
    recipe = make_recipe(scheme, method=method, calibration=calib, gguf_mix=mix)
    assert resident_reason(recipe, "gguf") is None
    loaded = load_source(bf16_sharded_bpe)
    resident = write_gguf(execute(loaded, build_plan(loaded, recipe, "gguf", False), progress=False),
                          tmp_path / "resident.gguf", full_precision=full_precision)
    lazy = load_lazy(bf16_sharded_bpe)
    result = quantize_streamed(lazy, build_plan(lazy, recipe, "gguf", False), tmp_path / "streamed.gguf", progress=False,
                               full_precision=full_precision)
    assert result.output == tmp_path / "streamed.gguf"
    assert (tmp_path / "streamed.gguf").read_bytes() == resident.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resident.gguf", "streamed.gguf"]
    if mix is None:   # the streamed run wrote the 49152-row embedding and head in blocks of 15 rows
        assert blocks.count((15, 64)) >= 2 * (49152 // 15)


def test_cli_quantize_to_gguf_streams(bf16_sharded_bpe, tmp_path):
    out = tmp_path / "m.gguf"
    r = _run("quantize", bf16_sharded_bpe, "--to", "gguf", "--type", "Q8_0", "-o", out, "--json")
    assert json.loads(r.stdout)["streamed"] is True
    import gguf

    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} >= {"Q8_0", "F32"}


def test_killed_gguf_run_resumes_to_the_same_file(bf16_sharded_bpe, calib, tmp_path):
    """--to gguf keeps its parts like a folder output: SIGKILL after layer 1, then --resume gives
    the uninterrupted run's file, and nothing is at the output path in between."""
    args = ["quantize", bf16_sharded_bpe, "--method", "gptq", "--calib", calib.text, "--samples", "4", "--seqlen", "32",
            "--to", "gguf", "--type", "Q8_0"]
    _run(*args, "-o", tmp_path / "whole.gguf")
    out = tmp_path / "resumed.gguf"
    cmd = [sys.executable, "-c", _KILLER, "1", "after", "--quiet", *map(str, args), "-o", str(out)]
    killed = subprocess.run(cmd, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    r = _run(*args, "-o", out, "--resume", "--json")
    assert json.loads(r.stdout)["resumed_at_layer"] == 0   # GPTQ redoes a layer whose next inputs were not saved
    assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert not (tmp_path / f".{out.name}.partial").exists()


@pytest.mark.parametrize("method,to,scheme", [("gptq", "gptq", dict(symmetric=True)), ("rtn", "awq", dict(symmetric=False)),
                                              ("awq", "compressed-tensors", dict(symmetric=False)),
                                              ("rtn", "compressed-tensors", dict(format="fp8_e4m3", bits=None, group_size=-1))])
def test_streamed_checkpoint_exports_equal_the_resident_ones(bf16_sharded, calib, tmp_path, monkeypatch, method, to, scheme):
    """--to gptq|awq|compressed-tensors stream as well: the exporter reads each quantized weight
    from the parts when it packs it, its packed tensors spill to disk past a bound (set to a few
    KB here, so every run spills many times), and full-precision tensors are copied from the
    parts or the source: the same folder, byte for byte, as the resident run's."""
    from lowbit.api import execute, make_recipe
    from lowbit.export import safetensors_io, write
    from lowbit.model.load import load_lazy, load_source
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme
    from lowbit.streaming import quantize_streamed, resident_reason

    spills = []
    real = safetensors_io.SpilledTensors.spill
    monkeypatch.setattr(safetensors_io, "SPILL_BYTES", 4096)
    monkeypatch.setattr(safetensors_io.SpilledTensors, "spill", lambda self: (spills.append(len(self._held)), real(self))[1])
    ws = WeightScheme(**{"bits": 4, "group_size": 32, **scheme})
    recipe = make_recipe(ws, method=method, calibration=calib)
    assert resident_reason(recipe, to) is None
    loaded = load_source(bf16_sharded)
    write(execute(loaded, build_plan(loaded, recipe, to, False), progress=False), to, tmp_path / "resident")
    resident_spills, spills[:] = len(spills), []
    result = quantize_streamed(load_lazy(bf16_sharded), build_plan(load_lazy(bf16_sharded), recipe, to, False),
                               tmp_path / "streamed", progress=False)
    assert result.weights_quantized == 4 * 7 and resident_spills > 3 and len(spills) == resident_spills
    assert _files(tmp_path / "resident") == _files(tmp_path / "streamed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resident", "streamed"]   # no parts, no spill folders


def test_a_plan_the_exporter_refuses_stops_after_the_first_layer(bf16_sharded, tmp_path, monkeypatch):
    """GPTQ v1 cannot hold an asymmetric INT3 weight: the streamed run stops at the first part
    holding one, in one line with exit 2, and leaves nothing (no output, no partial folder)."""
    from lowbit import streaming

    parts = []
    real = streaming._Part.write
    monkeypatch.setattr(streaming._Part, "write", lambda self, key: (parts.append(key), real(self, key))[1])
    r = _run("quantize", bf16_sharded, "--bits", "3", "--group-size", "32", "--to", "gptq", "-o", tmp_path / "out", check=False)
    assert r.returncode == 2 and "supports 2/4/8-bit weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    from lowbit.api import make_recipe
    from lowbit.errors import SchemeError
    from lowbit.model.load import load_lazy
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme

    lazy = load_lazy(bf16_sharded)
    plan = build_plan(lazy, make_recipe(WeightScheme(bits=3, group_size=32), method="rtn"), "gptq", False)
    with pytest.raises(SchemeError, match="supports 2/4/8-bit"):
        streaming.quantize_streamed(lazy, plan, tmp_path / "out", progress=False)
    assert parts == ["layer-00000"] and list(tmp_path.iterdir()) == []
    # every part is checked: INT3 only from layer 2 on stops there
    from lowbit.plan.recipe import SchemeGroup
    from lowbit.scheme import QuantScheme

    parts.clear()
    late = SchemeGroup("late", (r"layers\.[23]\.",), QuantScheme(WeightScheme(bits=3, group_size=32)))
    plan = build_plan(lazy, make_recipe(WeightScheme(bits=4, group_size=32), method="rtn", groups=(late,)), "gptq", False)
    with pytest.raises(SchemeError, match="supports 2/4/8-bit"):
        streaming.quantize_streamed(lazy, plan, tmp_path / "out", progress=False)
    assert parts == ["layer-00000", "layer-00001", "layer-00002"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to", ["native", "gguf"])
def test_streamed_run_weighted_by_an_imatrix_equals_the_resident_one(bf16_sharded_bpe, tmp_path, monkeypatch, to):
    """--imatrix streams: its entries are matched by name and shape on the meta model, each weight
    is fitted with its columns' importance as it is read (here 15 rows at a time)."""
    from lowbit import streaming

    monkeypatch.setattr(streaming, "ROW_BLOCK_ELEMENTS", 1000)
    from lowbit.api import execute, make_recipe
    from lowbit.calib import imatrix
    from lowbit.export import write
    from lowbit.model.load import load_lazy, load_source
    from lowbit.model.targets import select_targets
    from lowbit.plan import build_plan
    from lowbit.scheme import WeightScheme
    from lowbit.streaming import quantize_streamed, resident_reason

    loaded = load_source(bf16_sharded_bpe)
    windows = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    st = imatrix.collect(loaded.model, select_targets(loaded.model), windows, batch_size=2, progress=False)
    path = imatrix.write(tmp_path / "im.gguf", st, imatrix.gguf_names(loaded.model), 2, 16, "text.txt")
    scheme = WeightScheme(format="gguf_iq4_nl", bits=None, group_size=32)
    recipe = make_recipe(scheme, imatrix=str(path))
    assert resident_reason(recipe, to) is None
    suffix = ".gguf" if to == "gguf" else ""
    resident = write(execute(loaded, build_plan(loaded, recipe, to, False), progress=False), to, tmp_path / f"resident{suffix}")
    fresh = load_source(bf16_sharded_bpe)
    plain = write(execute(fresh, build_plan(fresh, make_recipe(scheme), to, False), progress=False), to,
                  tmp_path / f"plain{suffix}")
    lazy = load_lazy(bf16_sharded_bpe)
    quantize_streamed(lazy, build_plan(lazy, recipe, to, False), tmp_path / f"streamed{suffix}", progress=False)
    read = (lambda p: p.read_bytes()) if to == "gguf" else _files
    assert read(tmp_path / f"streamed{suffix}") == read(resident) != read(plain)
