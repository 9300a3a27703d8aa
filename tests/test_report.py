"""Per-domain evaluation and the HTML report: deterministic disjoint domain sets, the report
rendered in a real headless browser, bad input refused with nothing written."""

import json
import re
import shutil
import subprocess

import pytest

from lowbit.cli import main
from lowbit.eval import domains
from lowbit.report.plots import pareto_front

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_domain_sets_are_deterministic_and_seeded(tokenizer):
    a, b, c = (domains.domain_texts(tokenizer, seed) for seed in (0, 0, 1))
    assert a == b
    assert set(a) == {"prose", "code", "arithmetic", "math"}   # the tiny tokenizer has no chat template
    assert a["prose"] == c["prose"] and a["code"] == c["code"]
    assert a["arithmetic"] != c["arithmetic"] and a["math"] != c["math"]


def test_domain_sets_are_disjoint_from_calibration_text(tokenizer):
    from lowbit.data import default_text

    calib = default_text("calib")
    calib_lines = {line.strip() for line in calib.split("\n") if line.strip()}
    for name, text in domains.domain_texts(tokenizer).items():
        assert len(text) > 40_000, name
        shared = [line for line in text.split("\n") if line.strip() and line.strip() in calib_lines]
        assert not shared, (name, shared[:3])
        for start in range(0, len(text) - 200, 5_000):   # no multi-line passage either
            assert text[start:start + 200] not in calib, name


def test_generated_arithmetic_and_math_are_correct():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a // b}
    for line in domains.arithmetic_text(3).split("\n"):
        a, op, b, eq, r = line.split()
        assert eq == "=" and ops[op](int(a), int(b)) == int(r), line
    steps = re.findall(r"Step \d: (\d+) ([-+×÷]) (\d+) = (\d+)", domains.math_text(3))
    assert len(steps) > 1000
    for a, op, b, r in steps:
        assert ops[op](int(a), int(b)) == int(r)


def test_chat_domain_uses_the_models_template(default_model):
    text = domains.domain_texts(default_model.tokenizer)["chat"]
    assert text.count("<|im_start|>assistant\n") > 100     # SmolLM2's ChatML template
    assert "What does the function" in text


def test_pareto_front():
    pts = [(10, 0.5), (20, 0.1), (15, 0.6), (30, 0.1), (5, 0.9), (25, 0.05)]
    assert pareto_front(pts) == [0, 1, 4, 5]


@pytest.fixture(scope="module")
def w4_folder(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "w4"
    assert main(["quantize", str(tiny_llama), "--bits", "4", "--group-size", "32", "-o", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def w2_folder(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "w2"
    assert main(["quantize", str(tiny_llama), "--bits", "2", "--group-size", "32", "-o", str(out), "--json"]) == 0
    return out


def test_eval_domains_json(w4_folder, tmp_path, capsys):
    extra = tmp_path / "legal.txt"
    extra.write_text("The party of the first part shall indemnify the party of the second part. " * 40)
    capsys.readouterr()
    assert main(["eval", str(w4_folder), "--domains", "--data", f"legal={extra}", "--ctx", "32", "--windows", "2",
                 "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert set(rec["domains"]) == {"prose", "code", "arithmetic", "math", "legal"}
    assert rec["domains"]["prose"]["sensitivity"] == pytest.approx(1.0)
    for d in rec["domains"].values():
        assert d["kld"] > 0 and d["n_tokens"] == 2 * 31
        assert d["sensitivity"] == pytest.approx(d["kld"] / rec["domains"]["prose"]["kld"])
    assert set(rec["generations"]) == {"prose", "code", "arithmetic", "math"}
    assert rec["scheme"] and rec["recipe"]["plan"] and rec["layers"]


def test_eval_domains_bad_data(w4_folder, capsys):
    assert main(["eval", str(w4_folder), "--domains", "--data", "no-name.txt"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err


def browser_check(page):
    """(data-plots-loaded attribute, console messages) of the page in headless chromium, and a screenshot."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-plots-loaded="([^"]*)"', dom.stdout)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    shot = page.with_name(page.stem + "-screenshot.png")
    subprocess.run([*flags, "--window-size=1280,3000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return (loaded.group(1) if loaded else None), console, shot


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it where apt-get runs as root)")
def test_browser_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img class="plot" src="data:image/png;base64,AAAA">'
                    '<script>console.error("boom")</script><script>'
                    + __import__("lowbit.report.page", fromlist=["CHECK"]).CHECK + "</script></body></html>")
    loaded, console, _ = browser_check(page)
    assert loaded == "0/1" and any("boom" in c for c in console)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it where apt-get runs as root)")
def test_report_renders_in_a_browser_and_redraws(w4_folder, w2_folder, tmp_path, capsys):
    import numpy as np
    from matplotlib.image import imread

    capsys.readouterr()
    assert main(["eval", str(w4_folder), "--domains", "--ctx", "32", "--windows", "2", "--json"]) == 0
    w4_json = tmp_path / "w4.json"
    w4_json.write_text(capsys.readouterr().out)
    page = tmp_path / "report.html"
    assert main(["report", str(w4_json), f"two bits={w2_folder}", "--ctx", "32", "--windows", "2", "-o", str(page), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert set(written) == {"html", "json", "quality-size", "domains", "layers"}
    html = page.read_text()
    assert not re.search(r"https?://|//cdn|src=\"(?!data:)", html)      # nothing loads from outside
    assert html.count('<img class="plot"') == 3
    loaded, console, shot = browser_check(page)
    assert loaded == "3/3" and console == []
    pixels = imread(shot)
    assert pixels.shape[1] == 1280 and np.asarray(pixels).std() > 0.05   # drawn, not blank

    data = json.loads((tmp_path / "report.json").read_text())
    labels = [r["label"] for r in data["records"]]
    assert labels == ["w4", "two bits"]     # LABEL=PATH names a candidate
    kld = {r["label"]: r["kld"] for r in data["records"]}
    assert kld["two bits"] > kld["w4"] > 0
    redraw = tmp_path / "again.html"
    assert main(["report", str(tmp_path / "report.json"), "-o", str(redraw)]) == 0
    assert redraw.read_bytes() == page.read_bytes()
    assert (tmp_path / "again-layers.png").read_bytes() == (tmp_path / "report-layers.png").read_bytes()


def test_report_bad_input(w4_folder, tmp_path, capsys):
    not_model = tmp_path / "notes.txt"
    not_model.write_text("hello")
    page = tmp_path / "r.html"
    assert main(["report", str(not_model), "-o", str(page)]) == 2
    assert main(["report", str(w4_folder), "-o", str(tmp_path / "missing" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad_json = tmp_path / "x.json"
    bad_json.write_text('{"rows": []}')
    assert main(["report", str(bad_json), "-o", str(page)]) == 2
    assert "not an evaluation record" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "x.json"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_prints_only_the_results(w4_folder, where, capsys):
    args = ["eval", str(w4_folder), "--ctx", "32", "--windows", "2"]
    capsys.readouterr()
    assert main(["--quiet", *args] if where == "before" else [*args, "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "kld" in out.out
