"""Benchmark: every method at several schemes on the embedded default, side by side.

Each configuration runs in its own subprocess (so peak RSS is its own), on the same calibration
windows and the same evaluation windows; the full-precision forward pass over the calibration
tokens is timed in the same run, so GPTQ's cost is reported as a ratio to it.

    python bench/methods.py                 # full: 128 x 512 calibration tokens, 16 x 512 eval
    python bench/methods.py --quick         # 32 calibration windows, 8 eval windows

Writes bench/results/methods.json and bench/results/methods.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"

CONFIGS = [
    # (method, scheme kwargs, options)
    ("rtn", dict(format="int", bits=4, group_size=32, symmetric=False), {}),
    ("hqq", dict(format="int", bits=4, group_size=32, symmetric=False, zero_point="float"), {}),
    ("awq", dict(format="int", bits=4, group_size=32, symmetric=False), {}),
    ("gptq", dict(format="int", bits=4, group_size=32, symmetric=False), {}),
    ("rtn", dict(format="int", bits=4, group_size=64, symmetric=True), {}),
    ("gptq", dict(format="int", bits=4, group_size=64, symmetric=True), {}),
    ("rtn", dict(format="int", bits=3, group_size=32, symmetric=False), {}),
    ("rtn", dict(format="int", bits=3, group_size=32, symmetric=False, zero_point="float"), {}),
    ("hqq", dict(format="int", bits=3, group_size=32, symmetric=False, zero_point="float"), {}),
    ("awq", dict(format="int", bits=3, group_size=32, symmetric=False), {}),
    ("gptq", dict(format="int", bits=3, group_size=32, symmetric=False), {}),
    ("gptq", dict(format="int", bits=3, group_size=32, symmetric=False, observer="mse"), {}),
    ("awq", dict(format="int", bits=3, group_size=32, symmetric=False), {"rounding": "gptq"}),
    ("rtn", dict(format="nf4", bits=None, group_size=64), {}),
    ("gptq", dict(format="nf4", bits=None, group_size=64), {}),
    ("rtn", dict(format="nvfp4", bits=None, group_size=16), {}),
    ("gptq", dict(format="nvfp4", bits=None, group_size=16), {}),
    ("smoothquant", dict(format="int", bits=8, group_size=-1, symmetric=True), {}),
]


def run_one(spec: dict) -> dict:
    """Quantize + evaluate one configuration (runs in a subprocess)."""
    import torch

    from lowbit import WeightScheme
    from lowbit.api import quantize
    from lowbit.calib import CalibrationConfig
    from lowbit.eval.divergence import compare, run_reference
    from lowbit.methods import get_method
    from lowbit.model.load import load_source

    torch.manual_seed(0)
    loaded = load_source(None)
    windows = torch.load(spec["eval_windows"], weights_only=True)
    t0 = time.perf_counter()
    ref = run_reference(loaded.model, windows, progress=False)
    t_ref = time.perf_counter() - t0
    calibration = CalibrationConfig(spec["calib_text"], spec["samples"], spec["seqlen"], 0)
    if spec["method"] == "fp_forward":
        cal = calibration.windows(loaded.tokenizer)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, cal.shape[0], calibration.batch_size):
                loaded.model(cal[i: i + calibration.batch_size], use_cache=False)
        return {"method": "fp_forward", "seconds": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    get_method(spec["method"])
    ws = WeightScheme(**spec["scheme"])
    t0 = time.perf_counter()
    qm = quantize(loaded, ws, method=spec["method"], calibration=calibration, options=spec["options"], progress=False)
    t_q = time.perf_counter() - t0
    res = compare(qm.model, ref, progress=False)
    return {"method": spec["method"] + ("+" + spec["options"]["rounding"] if spec["options"].get("rounding") else ""),
            "scheme": ws.label() + (f" {ws.observer}" if ws.observer != "minmax" else ""),
            "bits_per_weight": qm.bits_per_weight, "ppl": res.ppl, "ref_ppl": res.ref_ppl, "kld": res.kld,
            "kld_p99": res.kld_p99, "top1": res.top1, "seconds_quantize": t_q, "seconds_reference_eval": t_ref,
            "stage_seconds": qm.recipe.get("seconds", {}),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="methods to run (default all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(run_one(spec)))
        return

    import torch

    from lowbit.data import token_windows
    from lowbit.model.load import load_source

    samples, n_eval = (32, 8) if args.quick else (128, 16)
    eval_text = (WIKI / "test.txt")
    calib_text = (WIKI / "valid.txt")
    loaded = load_source(None)
    windows = token_windows(loaded.tokenizer, eval_text.read_text(), 512, n_eval)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    win_file = out_dir / ".eval_windows.pt"
    torch.save(windows, win_file)
    del loaded
    base = {"eval_windows": str(win_file), "calib_text": str(calib_text), "samples": samples, "seqlen": 512}
    specs = [{**base, "method": "fp_forward", "scheme": {}, "options": {}}]
    specs += [{**base, "method": m, "scheme": s, "options": o} for m, s, o in CONFIGS
              if not args.only or m in args.only]
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"method": spec["method"], "scheme": str(spec["scheme"]), "error": err})
            print(f"{spec['method']} {spec['scheme']}: FAILED {err}", flush=True)
            continue
        r = json.loads(line[7:])
        r["wall_seconds"] = time.perf_counter() - t0
        rows.append(r)
        print(json.dumps(r), flush=True)
    fp = next(r for r in rows if r["method"] == "fp_forward")
    for r in rows:
        if "seconds_quantize" in r:
            r["quantize_over_fp_forward"] = r["seconds_quantize"] / fp["seconds"]
    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "eval": f"WikiText-2 test, {n_eval} x 512 tokens",
            "calibration": f"WikiText-2 validation, {samples} x 512 tokens (seeded positions)",
            "fp_forward_seconds": fp["seconds"], "machine": f"{os.cpu_count()} CPU cores", "torch_threads": torch.get_num_threads()}
    name = "methods_quick" if args.quick else "methods"
    if args.only:  # a subset never overwrites the full table
        name += "_" + "_".join(args.only)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Methods on {meta['model']}", "", f"Eval: {meta['eval']}. Calibration: {meta['calibration']}. "
             f"One full-precision forward over the calibration tokens: {fp['seconds']:.1f} s.", "",
             "Note: SmolLM2's shipped weights lie on a Q4_1 grid (4-bit, groups of 32, float min), which W4 g32 "
             "with an integer zero-point cannot express exactly; W3 is where methods separate.", "",
             "| method | scheme | bits/weight | PPL | ref PPL | KLD | top-1 | quantize s | × fp forward | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['scheme']} | failed: {r['error']} |||||||")
        elif "ppl" in r:
            lines.append(f"| {r['method']} | {r['scheme']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['ref_ppl']:.3f} | "
                         f"{r['kld']:.4f} | {r['top1']:.3f} | {r['seconds_quantize']:.1f} | {r['quantize_over_fp_forward']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
