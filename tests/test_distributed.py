"""Data-parallel calibration on torch.distributed (gloo, 2 local ranks): the same bytes as one
process, and the ways ranks can disagree refused in one line."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from lowbit.calib.distributed import owners


def _lowbit(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "lowbit", "--quiet", *map(str, argv)], capture_output=True,
                          text=True, env=env)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_owners_balance_the_work():
    sizes = {"q": 100, "k": 20, "v": 20, "o": 100, "gate": 300, "up": 300, "down": 300}
    own = owners(sizes, 2)
    load = [sum(n for k, n in sizes.items() if own[k] == r) for r in range(2)]
    assert sorted(load) == [540, 600]
    assert owners(dict(reversed(sizes.items())), 2) == own   # the same on every rank, whatever the order


@pytest.mark.parametrize("method,to,samples", [("gptq", "native", 24), ("awq", "native", 16), ("gptq", "gptq", 16)])
def test_two_ranks_give_the_bytes_of_one_process(tiny_llama, calib, tmp_path, method, to, samples):
    """Windows split over 2 gloo ranks at whole batches (24 windows in batches of 8: rank 0 gets
    one, rank 1 two), statistics all-reduced, GPTQ's weights solved by their owner rank and
    broadcast: identical output files (streamed for native, resident for --to gptq). The single
    process has every core, each rank one thread: XᵀX sums float32 products in float64 panels,
    each product and factorization on one thread, so neither the grouping nor the thread count
    changes a bit."""
    args = ["quantize", tiny_llama, "--method", method, "--calib", calib.text, "--samples", str(samples), "--seqlen", "32",
            "--group-size", "32", "--to", to]
    one = _lowbit(*args, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _lowbit(*args, "-o", tmp_path / "two", "--workers", "2")
    assert two.returncode == 0, two.stderr
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


_SLOW_RANK1 = """
import os, pathlib, time
if os.environ.get("RANK") == "1":
    _unlink = pathlib.Path.unlink
    def unlink(self, *a, **k):
        if self.name.startswith("rank1-layer"):
            time.sleep(1.0)
        return _unlink(self, *a, **k)
    pathlib.Path.unlink = unlink
"""


def test_rank0_finishes_only_after_every_rank_dropped_its_hidden_states(tiny_llama, calib, tmp_path):
    """Rank 1 made slow at deleting its older hidden states (a sitecustomize on its path): rank 0
    must not remove the folder under it (seen once in CI as a FileNotFoundError in rmtree)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_RANK1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = _lowbit("quantize", tiny_llama, "--method", "gptq", "--calib", calib.text, "--samples", "16", "--seqlen", "32",
                "--group-size", "32", "-o", tmp_path / "out", "--workers", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").is_dir() and not (tmp_path / ".out.partial").exists()


def test_refusals_are_one_line(tiny_llama, calib, tmp_path):
    r = _lowbit("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", "-o", tmp_path / "a", "--workers", "2")
    assert r.returncode == 2 and "reads none" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _lowbit("quantize", tiny_llama, "--method", "gptq", "--calib", calib.text, "--samples", "1", "--seqlen", "32",
                "--group-size", "32", "-o", tmp_path / "b", "--workers", "2")
    assert r.returncode == 2 and "cannot be split over 2 ranks" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_ranks_that_disagree_on_the_data_are_refused(tiny_llama, calib, tmp_path):
    """Two ranks started by hand (as torchrun would) with different calibration files."""
    other = tmp_path / "other.txt"
    other.write_text(open(calib.text).read()[::-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, text in enumerate([calib.text, other]):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "lowbit", "--quiet", "quantize", str(tiny_llama), "--method",
                                       "gptq", "--calib", str(text), "--samples", "4", "--seqlen", "32", "--group-size",
                                       "32", "-o", str(tmp_path / "out")], env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    for e in errs:
        assert "ranks disagree on the model, the recipe or the calibration data" in e and len(e.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
