"""Benchmark: data-parallel GPTQ calibration, 1 process vs N local gloo ranks (`--workers N`),
on the embedded default (SmolLM2-135M-Instruct). Same total threads: one process uses every
core, N ranks get cores/N each. Reports wall time, how many stored codes differ between the
outputs and each output's KLD. A third run, one process with a rank's thread count, shows what
the thread count alone changes: some float32 kernels round differently with other thread
counts (MKL splits skinny products over their inner dimension), and GPTQ's error feedback would
carry one flipped code along its row and into later layers; lowbit runs those on one thread each.

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


def _differing(c: dict) -> str:
    if c["differing_codes"] == 0:
        return f"0 of {c['codes']}"
    return f"{c['differing_codes']} of {c['codes']} ({c['differing_fraction']:.1e}); worst {c['worst_tensor']} ({c['worst_fraction']:.1e})"


def write_markdown(row: dict, path: Path) -> None:
    workers, per = row["workers"], row["cores"] // row["workers"]
    one, many = row["seconds_one_process"], row[f"seconds_{workers}_ranks"]
    thin, k = row["one_process_fewer_threads"], row["kld"]
    quick = " --quick" if row["samples"] == 32 else ""

    def same(c):
        return "yes" if c["same_weights_file"] else "no"

    lines = ["# Data-parallel GPTQ calibration: 1 process vs local gloo ranks", "",
             f"`python bench/distributed.py{quick}`: SmolLM2-135M-Instruct (embedded default, resident), GPTQ int4 g128 sym, "
             f"{row['samples']} x {row['seqlen']} WikiText-2 validation tokens, {row['cores']} cores: one process with all "
             f"of them, {workers} ranks with {per} thread(s) each, and one process with {per} thread(s) (what the thread "
             "count alone would change). Wall time includes each process's start and model load (each rank loads the "
             "model). KLD against the source on 8 x 512 WikiText-2 test tokens. Differing codes: stored codes not equal "
             "to the first row's.", "",
             "| run | wall s | time ratio | differing codes | same weights file | same recipe | KLD |",
             "|---|---|---|---|---|---|---|",
             f"| 1 process, {row['cores']} threads | {one:.0f} | 1.00 | - | - | - | {k['one_process']:.4f} |",
             f"| {workers} ranks, {per} thread(s) each | {many:.0f} | {many / one:.2f} | {_differing(row)} | {same(row)} | "
             f"{'yes' if row['same_recipe'] else 'no'} | {k[f'{workers}_ranks']:.4f} |",
             f"| 1 process, {per} thread(s) | {thin['seconds']:.0f} | {thin['seconds'] / one:.2f} | {_differing(thin)} | "
             f"{same(thin)} | {'yes' if thin['same_recipe'] else 'no'} | {k['one_process_fewer_threads']:.4f} |"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lowbit-distributed-bench")
    ap.add_argument("--render", action="store_true", help="rewrite distributed.md from distributed.json")
    args = ap.parse_args()
    if args.render:
        results = ROOT / "bench" / "results"
        write_markdown(json.loads((results / "distributed.json").read_text())["row"], results / "distributed.md")
        return
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
    write_markdown(row, out / "distributed.md")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
