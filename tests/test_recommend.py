"""`lowbit recommend`: measured candidates ranked by KLD within a budget; the kept file is the
one measured, within the budget; a budget below every candidate is refused."""

import json

import pytest

from lowbit.cli import main


def test_recommend_ranks_measured_candidates(tiny_llama, calib, tmp_path, capsys):
    out = tmp_path / "best"
    capsys.readouterr()
    assert main(["recommend", str(tiny_llama), "--for", "fine-tuning", "--budget", "1GB", "--calib", calib.text,
                 "--samples", "4", "--seqlen", "32", "--ctx", "32", "--windows", "2", "-o", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    cands = rec["candidates"]
    assert [c["status"] for c in cands] == ["measured"] * 3
    klds = [c["kld"] for c in cands]
    assert klds == sorted(klds) and rec["recommended"] == cands[0]["name"] == "int8 per-channel"
    assert (out / "lowbit.json").is_file()
    assert (out / "model.safetensors").stat().st_size == cands[0]["file_bytes"] <= 10**9
    assert [p.name for p in tmp_path.iterdir()] == ["best"]        # the other candidates are gone


@pytest.mark.e2e
def test_recommend_on_the_default_within_a_budget(tmp_path, capsys):
    best = tmp_path / "best.gguf"
    capsys.readouterr()
    assert main(["recommend", "--for", "cpu", "--budget", "95MB", "-o", str(best), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    chosen = rec["candidates"][0]
    assert rec["recommended"] == chosen["name"] and chosen["status"] == "measured"
    assert best.stat().st_size == chosen["file_bytes"] <= 95 * 10**6
    assert {c["status"] for c in rec["candidates"][1:]} == {"over budget (planned)"}
    # the KLD it reports is the kept file's: evaluate the file on its own
    assert main(["eval", str(best), "--reference", _default(), "--ctx", "256",
                 "--windows", "8", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["kld"] == pytest.approx(chosen["kld"], rel=1e-3)
    # a GGUF candidate's record: the plan lowbit recorded in the file, every layer's error
    assert again["scheme"] == "GGUF Q3_K_M" and again["method"] == "rtn"
    reasons = [g["reason"] for g in again["recipe"]["plan"]]
    assert any(r == "llama.cpp mix Q3_K_M -> Q4_K" for r in reasons)     # attn_v / ffn_down of the mix
    assert any("fallback: 576 columns not divisible by 256 (Q3_K)" in r for r in reasons)
    # every layer's error; the Q4_1 fallbacks hold SmolLM2's Q4_1-grid weights exactly (error 0)
    errs = [r["weight_rel_err"] for r in again["layers"]]
    assert len(errs) == 210 and sum(e > 0.01 for e in errs) > 100 and min(errs) < 1e-6


def _default():
    from lowbit.model.load import resolve_source

    return str(resolve_source(None)[0])


def test_recommend_refuses_a_budget_below_every_candidate(tiny_llama, tmp_path, capsys):
    out = tmp_path / "best"
    assert main(["recommend", str(tiny_llama), "--for", "cpu", "--budget", "1kB", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: --budget 0.001 MB is smaller than every candidate") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
