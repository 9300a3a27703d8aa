"""Thirty-odd mistakes users really make, in one table: each is one line on stderr naming the
problem and the fix, exit 2, and nothing written (no output, no partial folder)."""

import json
import shutil

import pytest

from lowbit.cli import main


@pytest.fixture(scope="module")
def place(tiny_llama, tmp_path_factory):
    """A folder of bad inputs beside a good tiny model."""
    root = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(tiny_llama, root / "tiny")
    (root / "nocfg").mkdir()
    shutil.copy(tiny_llama / "model.safetensors", root / "nocfg")
    (root / "binonly").mkdir()
    shutil.copy(tiny_llama / "config.json", root / "binonly")
    (root / "binonly" / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    shutil.copytree(tiny_llama, root / "badcfg")
    (root / "badcfg" / "config.json").write_text("{nope")
    shutil.copytree(tiny_llama, root / "trunc")
    weights = root / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "wrongshape").mkdir()
    shutil.copytree(tiny_llama, root / "wrongshape", dirs_exist_ok=True)
    cfg = json.loads((root / "wrongshape" / "config.json").read_text())
    (root / "wrongshape" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    (root / "notes.txt").write_text("hi")
    (root / "fake.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    (root / "exists").mkdir()
    (root / "bad.yaml").write_text("a: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n")
    (root / "unknown.yaml").write_text("method: gptq\nschem: {bits: 4}\n")
    (root / "short.txt").write_text("the cat sat")
    (root / "calib.txt").write_text("the cat sat on the mat and ran far away " * 200)
    return root


G = ["--group-size", "32"]
CAL = ["--calib", "calib.txt", "--samples", "4", "--seqlen", "32"]
CASES = [   # (what a user did, argv, words the one line must contain)
    ("source that does not exist", ["quantize", "nowhere", "-o", "o"], "does not exist"),
    ("a text file as the model", ["quantize", "notes.txt", "-o", "o"], "not .gguf"),
    ("folder without config.json", ["quantize", "nocfg", "-o", "o"], "no config.json"),
    ("pickled .bin weights only", ["quantize", "binonly", "-o", "o"], "pickled"),
    ("config.json that is not JSON", ["quantize", "badcfg", "-o", "o"], "not valid JSON"),
    ("truncated model.safetensors", ["quantize", "trunc", "-o", "o"], "truncated"),
    ("a config from another model", ["quantize", "wrongshape", *G, "-o", "o"], "different models"),
    ("a .gguf that is not one", ["quantize", "fake.gguf", "-o", "o"], "fake.gguf"),
    ("info of a broken .gguf", ["info", "fake.gguf"], "fake.gguf"),
    ("output that already exists", ["quantize", "tiny", *G, "-o", "exists"], "--force"),
    ("unknown method", ["quantize", "tiny", "--method", "foo", "-o", "o"], "unknown method"),
    ("9-bit integers", ["quantize", "tiny", "--bits", "9", "-o", "o"], "2 and 8"),
    ("a group larger than the row", ["quantize", "tiny", "--group-size", "4096", "-o", "o"], "larger than the row"),
    ("a negative group size", ["quantize", "tiny", "--group-size", "-2", "-o", "o"], "invalid"),
    ("calibration file missing", ["quantize", "tiny", "--method", "gptq", *G, "--calib", "none.txt", "-o", "o"], "does not exist"),
    ("calibration for RTN", ["quantize", "tiny", "--calib", "calib.txt", *G, "-o", "o"], "would be ignored"),
    ("calibration text too short", ["quantize", "tiny", "--method", "gptq", *G, "--calib", "short.txt", "-o", "o"], "fewer than"),
    ("zero calibration windows", ["quantize", "tiny", "--method", "gptq", *G, "--samples", "0", "-o", "o"], "at least 1"),
    ("unknown preset", ["quantize", "tiny", "--scheme", "W5A5", "-o", "o"], "unknown scheme preset"),
    ("GGUF without a type", ["quantize", "tiny", "--to", "gguf", "-o", "o.gguf"], "needs --type"),
    ("--type auto without a size", ["quantize", "tiny", "--to", "gguf", "--type", "auto", "-o", "o.gguf"], "--max-size"),
    ("two budgets", ["quantize", "tiny", "--target-bpw", "4", "--max-size", "1MB", "-o", "o"], "not both"),
    ("a size in parsecs", ["quantize", "tiny", "--max-size", "12 parsecs", "-o", "o"], "cannot read the size"),
    ("a recipe that is not YAML", ["quantize", "tiny", "--recipe", "bad.yaml", "-o", "o"], "does not parse"),
    ("a recipe that does not exist", ["quantize", "tiny", "--recipe", "none.yaml", "-o", "o"], "does not exist"),
    ("a recipe that is a list", ["quantize", "tiny", "--recipe", "list.yaml", "-o", "o"], "mapping"),
    ("a misspelt recipe key", ["quantize", "tiny", "--recipe", "unknown.yaml", "-o", "o"], "schem"),
    ("a recipe and flags", ["quantize", "tiny", "--recipe", "bad.yaml", "--bits", "3", "-o", "o"], "drop --bits"),
    ("one worker", ["quantize", "tiny", "--method", "gptq", "--workers", "1", "-o", "o"], "2 or more"),
    ("workers for RTN", ["quantize", "tiny", *G, "--workers", "2", "-o", "o"], "reads none"),
    ("more workers than windows", ["quantize", "tiny", "--method", "gptq", *G, *CAL[:2], "--samples", "1", "--seqlen", "32",
                                   "--workers", "2", "-o", "o"], "cannot be split"),
    ("learned rotations", ["quantize", "tiny", "--rotate", "learned", "-o", "o"], "hadamard"),
    ("an include that matches nothing", ["quantize", "tiny", "--include", "nomatch", "-o", "o"], "matches no weight"),
    ("an unknown method option", ["quantize", "tiny", "--method", "gptq", "--opt", "nonsense=1", "-o", "o"], "no option"),
    ("expert tokens on a dense model", ["quantize", "tiny", "--method", "gptq", *G, *CAL, "--expert-min-tokens", "5", "-o", "o"],
     "no routed experts"),
    ("a flag value of the wrong type", ["quantize", "tiny", "--bits", "x", "-o", "o"], "invalid int"),
    ("an export target that does not exist", ["convert", "tiny", "--to", "nope", "-o", "o"], "invalid choice"),
    ("evaluating a folder that is not a model", ["eval", "exists"], "config.json"),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_exit_2_and_nothing_written(place, monkeypatch, capfd, argv, words):
    monkeypatch.chdir(place)
    before = sorted(p.name for p in place.iterdir())
    try:
        rc = main(["--quiet", *argv])
    except SystemExit as e:   # argparse's own errors (one line too: cli._Parser)
        rc = e.code
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and words in err[0], err
    assert sorted(p.name for p in place.iterdir()) == before


def test_the_table_is_thirty_or_more():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
