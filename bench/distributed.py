"""Benchmark: data-parallel GPTQ calibration, 1 process vs N local gloo ranks (`--workers N`),
on the embedded default (SmolLM2-135M-Instruct). Same total threads: one process uses every
core, N ranks get cores/N each. Reports wall time, how many stored codes differ between the
outputs and each output's KLD. A third run, one process with a rank's thread count, shows what
the thread count alone changes: float32 kernels round differently with other thread counts,
and GPTQ's error feedback carries a flipped code along its row and into later layers.

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


def run(out: Path, workers: int, samples: int, scheme: list[str], threads: int | None = None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit", "--quiet", "quantize", "--method", "gptq", *scheme, "--calib",
           str(WIKI / "valid.txt"), "--samples", str(samples), "-o", str(out), "--json"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return time.perf_counter() - t0


def kld(out: Path) -> float:
    """KLD against the source on 8 x 512 WikiText-2 test tokens (lowbit eval)."""
    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "eval", str(out), "--data", str(WIKI / "test.txt"),
                        "--windows", "8", "--json"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout)["kld"]


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
    thin = run(work / "thin", 1, samples, scheme, threads=max(1, (os.cpu_count() or 1) // args.workers))
    sys.path.insert(0, str(ROOT / "src"))
    row = {"samples": samples, "seqlen": 512, "scheme": "int4 g128 sym", "workers": args.workers,
           "seconds_one_process": one, f"seconds_{args.workers}_ranks": many, "time_ratio": many / one,
           **compare(work / "one", work / "many"), "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}
    # what the thread count alone does: one process with a rank's threads against one with all of them
    threads_only = compare(work / "one", work / "thin")
    row["one_process_fewer_threads"] = {"seconds": thin, **threads_only}
    row["one_process_fewer_threads_vs_ranks"] = compare(work / "thin", work / "many")
    row["kld"] = {"one_process": kld(work / "one"), f"{args.workers}_ranks": kld(work / "many"),
                  "one_process_fewer_threads": kld(work / "thin")}
    print(json.dumps(row, indent=1))
    out = ROOT / "bench" / "results"
    (out / "distributed.json").write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "row": row}, indent=1))
    t = row["one_process_fewer_threads"]
    u = row["one_process_fewer_threads_vs_ranks"]
    k = row["kld"]
    per = row["cores"] // args.workers
    lines = ["# Data-parallel GPTQ calibration: 1 process vs local gloo ranks", "",
             f"`python bench/distributed.py{' --quick' if args.quick else ''}`: SmolLM2-135M-Instruct (embedded default, "
             f"resident), GPTQ int4 g128 sym, {samples} x 512 WikiText-2 validation tokens, {row['cores']} cores: one "
             f"process with all of them, {args.workers} ranks with {per} thread(s) each, and one process with "
             f"{per} thread(s) (what the thread count alone changes). Wall time includes each process's start and "
             "model load. KLD against the source on 8 x 512 WikiText-2 test tokens. Differing codes: stored codes "
             "that are not equal, against the first row.", "",
             "| run | wall s | time ratio | differing codes | worst tensor | same recipe | KLD |",
             "|---|---|---|---|---|---|---|",
             f"| 1 process, {row['cores']} threads | {one:.0f} | 1.00 | - | - | - | {k['one_process']:.4f} |",
             f"| {args.workers} ranks, {per} thread(s) each | {many:.0f} | {row['time_ratio']:.2f} | "
             f"{row['differing_fraction']:.1%} of {row['codes']} | {row['worst_tensor']} ({row['worst_fraction']:.1%}) | "
             f"{'yes' if row['same_recipe'] else 'no'} | {k[f'{args.workers}_ranks']:.4f} |",
             f"| 1 process, {per} thread(s) | {thin:.0f} | {thin / one:.2f} | {t['differing_fraction']:.1%} | "
             f"{t['worst_tensor']} ({t['worst_fraction']:.1%}) | {'yes' if t['same_recipe'] else 'no'} | "
             f"{k['one_process_fewer_threads']:.4f} |", "",
             f"{args.workers} ranks against 1 process with {per} thread(s): {u['differing_fraction']:.1%} of codes differ."]
    (out / "distributed.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
