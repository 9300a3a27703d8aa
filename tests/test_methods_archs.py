"""Every calibrated and data-free method end to end on every tested architecture, and the
one-line errors for bad calibration input."""

import pytest
import torch

from lowbit import WeightScheme
from lowbit.cli import main
from tests.test_awq_smoothquant import ARCHS, _logits, _run, build

IDS = torch.tensor([[3, 14, 15, 9, 26, 53, 5, 8, 9, 7, 9, 3]])


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_end_to_end_beats_rtn(arch, tokenizer, calib):
    import dataclasses

    more = dataclasses.replace(calib, samples=32)  # 1024 tokens: a full-rank Hessian for 64-128 wide inputs
    ids = more.windows(tokenizer)[:8]                # judged on text like the calibration text
    ref = _logits(build(arch), ids)
    scheme = WeightScheme("int", 3, 32, False)
    err = {}
    for method in ("rtn", "gptq"):
        qm = _run(arch, tokenizer, more, scheme, method)
        assert len(qm.tensors) > 0 and not qm.recipe.get("rtn_fallback")
        err[method] = float((_logits(qm.model, ids) - ref).pow(2).mean())
    assert err["gptq"] < err["rtn"]


@pytest.mark.parametrize("arch", ARCHS)
def test_staged_gptq_equals_itself_and_is_deterministic(arch, tokenizer, calib):
    a = _run(arch, tokenizer, calib, WeightScheme("int", 4, 32, True), "gptq")
    b = _run(arch, tokenizer, calib, WeightScheme("int", 4, 32, True), "gptq")
    for name, qt in a.tensors.items():
        assert torch.equal(qt.codes, b.tensors[name].codes), name


@pytest.mark.parametrize("arch", ARCHS)
def test_hqq_end_to_end(arch, tokenizer, calib):
    ref = _logits(build(arch), IDS)
    qm = _run(arch, tokenizer, calib, WeightScheme("int", 4, 32, False, "float"), "hqq")
    assert (_logits(qm.model, IDS) - ref).abs().max() < 0.5


@pytest.mark.parametrize("content,msg", [("", "is empty"), ("short text", "fewer than one window")])
def test_bad_calibration_text_is_one_clear_line(tiny_llama, tmp_path, capsys, content, msg):
    f = tmp_path / "calib.txt"
    f.write_text(content)
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama), "--method", "gptq", "--calib", str(f), "--group-size", "32",
                 "-o", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowbit: error:") and msg in last and not out.exists()


@pytest.mark.parametrize("argv,msg", [
    (["--method", "gptq", "--bits", "9"], "2..8 bits"),
    (["--method", "gptq", "--group-size", "512"], "larger than the row"),
    (["--method", "hqq", "--group-size", "32"], "--asym"),
    (["--method", "gptq", "--opt", "nonsense=1"], "no option"),
    (["--method", "magic"], "unknown method"),
])
def test_bad_method_input_is_one_clear_line(tiny_llama, tmp_path, capsys, argv, msg):
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama), *argv, "--samples", "2", "--seqlen", "16", "-o", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowbit: error:") and msg in last and not out.exists()


def test_calibration_text_nothing_reads_is_refused(tiny_llama, calib, tmp_path, capsys):
    """RTN reads no data: a --calib FILE would be silently ignored, so it is one clear line."""
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama), "--method", "rtn", "--calib", calib.text, "-o", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowbit: error:") and "would be ignored" in last and not out.exists()
    # the same file with what reads it: static activation scales
    assert main(["-q", "quantize", str(tiny_llama), "--method", "rtn", "--scheme", "W8A8_STATIC", "--calib", calib.text,
                 "--samples", "4", "--seqlen", "32", "-o", str(out)]) == 0
