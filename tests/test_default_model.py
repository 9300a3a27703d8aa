"""End to end on the embedded default, SmolLM2-135M-Instruct (loaded once per session)."""

import copy

import pytest
import torch

from lowbit import WeightScheme
from lowbit.api import quantize
from lowbit.data import default_text, token_windows
from lowbit.eval.divergence import compare, run_reference
from lowbit.export.native import load, save

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference_run(default_model):
    windows = token_windows(default_model.tokenizer, default_text("eval"), 256, 4)
    return run_reference(default_model.model, windows, progress=False)


def test_default_model_shape(default_model):
    cfg = default_model.model.config
    assert cfg.hidden_size == 576 and cfg.num_hidden_layers == 30 and default_model.kind == "gguf"


def test_q4_1_grid_is_reproduced_exactly_by_int4_g32_float_min(default_model):
    # The shipped decoder weights lie on llama.cpp's Q4_1 grid (blocks of 32, fp16 scale and min):
    # a 4-bit group-32 format with a float minimum must reproduce them with zero error.
    qm = quantize(copy.deepcopy(default_model), WeightScheme("int", 4, 32, False, "float"), progress=False)
    src = dict(default_model.model.named_parameters())
    worst = max(float((qt.dequantize() - src[name].detach()).abs().max()) for name, qt in qm.tensors.items())
    assert worst == 0.0


def test_w8_g64_keeps_kld_below_0_01(default_model, reference_run):
    qm = quantize(copy.deepcopy(default_model), WeightScheme("int", 8, 64, True), progress=False)
    res = compare(qm.model, reference_run, progress=False)
    assert res.kld < 0.01 and res.top1 > 0.95


def test_w4_g32_asym_evaluated_saved_reloaded_same_logits(default_model, reference_run, tmp_path):
    qm = quantize(copy.deepcopy(default_model), WeightScheme("int", 4, 32, False), progress=False)
    res = compare(qm.model, reference_run, progress=False)
    assert 0 < res.kld < 1.0 and res.ppl > res.ref_ppl * 0.9
    ids = reference_run.windows[:1, :64]
    with torch.no_grad():
        before = qm.model(ids).logits
    back = load(save(qm, tmp_path / "w4"))
    with torch.no_grad():
        after = back.model(ids).logits
    assert torch.equal(before, after)
    assert back.tokenizer("def f(x): return x")["input_ids"] == default_model.tokenizer("def f(x): return x")["input_ids"]


def test_converted_gguf_cache_equals_fresh_conversion(default_model, monkeypatch, tmp_path):
    from lowbit.model.load import _plain_from_gguf, default_gguf_path

    fresh, _ = _plain_from_gguf(default_gguf_path())
    ids = torch.tensor([[1, 2, 3, 400, 5000]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, default_model.model(ids).logits)
