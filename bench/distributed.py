"""Benchmark: data-parallel GPTQ calibration, 1 process vs N local gloo ranks (`--workers N`),
on the embedded default (SmolLM2-135M-Instruct). Same total threads: one process uses every
core, N ranks get cores/N each. Reports wall time and how many stored codes differ between
the two outputs (the all-reduced statistics are summed in another order, so a code may round
the other way; lowbit.json's recipe is compared too).

    python bench/distributed.py --quick        # 32 x 512 calibration tokens
    python bench/distributed.py                # 128 x 512
Writes bench/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"


def run(out: Path, workers: int, samples: int, scheme: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit", "--quiet", "quantize", "--method", "gptq", *scheme, "--calib",
           str(WIKI / "valid.txt"), "--samples", str(samples), "-o", str(out), "--json"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return time.perf_counter() - t0


def compare(a: Path, b: Path) -> dict:
    """Codes that differ between two lowbit folders (unpacked), and whether the rest is equal."""
    from lowbit.export.native import load

    qa, qb = load(a), load(b)
    differing = total = 0
    worst = ("", 0.0)
    for name, ta in qa.tensors.items():
        tb = qb.tensors[name]
        d = int((ta.codes != tb.codes).sum())
        differing += d
        total += ta.codes.numel()
        if d / ta.codes.numel() > worst[1]:
            worst = (name, d / ta.codes.numel())
    ra, rb = json.loads((a / "lowbit.json").read_text()), json.loads((b / "lowbit.json").read_text())
    return {"codes": total, "differing_codes": differing, "differing_fraction": differing / max(1, total),
            "worst_tensor": worst[0], "worst_fraction": worst[1],
            "same_weights_file": (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes(),
            "same_recipe": ra["recipe"] == rb["recipe"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lowbit-distributed-bench")
    args = ap.parse_args()
    samples = 32 if args.quick else 128
    scheme = ["--bits", "4", "--group-size", "128"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    one = run(work / "one", 1, samples, scheme)
    many = run(work / "many", args.workers, samples, scheme)
    sys.path.insert(0, str(ROOT / "src"))
    row = {"samples": samples, "seqlen": 512, "scheme": "int4 g128 sym", "workers": args.workers,
           "seconds_one_process": one, f"seconds_{args.workers}_ranks": many, "time_ratio": many / one,
           **compare(work / "one", work / "many"), "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}
    print(json.dumps(row, indent=1))
    out = ROOT / "bench" / "results"
    (out / "distributed.json").write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "row": row}, indent=1))
    lines = ["# Data-parallel GPTQ calibration: 1 process vs local gloo ranks", "",
             f"`python bench/distributed.py{' --quick' if args.quick else ''}`: SmolLM2-135M-Instruct (embedded default, "
             f"resident), GPTQ int4 g128 sym, {samples} x 512 WikiText-2 validation tokens, {row['cores']} cores: one "
             f"process with all of them, or {args.workers} ranks with {row['cores'] // args.workers} thread(s) each. "
             "Wall time includes each process's start and model load (the ranks load the model each).", "",
             "| processes | wall s | time ratio | codes | differing codes | worst tensor | same weights file | same recipe |",
             "|---|---|---|---|---|---|---|---|",
             f"| 1 | {one:.0f} | 1.00 | {row['codes']} | - | - | - | - |",
             f"| {args.workers} ranks | {many:.0f} | {row['time_ratio']:.2f} | {row['codes']} | {row['differing_codes']} "
             f"({row['differing_fraction']:.1e}) | {row['worst_tensor'] or '-'} ({row['worst_fraction']:.1e}) | "
             f"{'yes' if row['same_weights_file'] else 'no'} | {'yes' if row['same_recipe'] else 'no'} |"]
    (out / "distributed.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
