"""Benchmark: GPTQ's peak memory against the number of decoder layers.

The embedded default is cut to its first N decoder layers (N = 10, 20, 30) and quantized with
GPTQ W4 g32 asym on the same 128 x 512 calibration windows, each N in a fresh process. Reported:
RSS once the model is loaded, peak RSS while quantizing, and their difference (what calibration
adds on top of the model). Issue 3's target: that difference does not grow with N.

    python bench/gptq_memory.py [--layers 10 20 30] [--samples 128]

Writes bench/results/gptq_memory.json and .md.
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


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(n_layers: int, samples: int) -> dict:
    import torch

    from lowbit.api import quantize
    from lowbit.calib import CalibrationConfig
    from lowbit.model.load import load_source
    from lowbit.scheme import WeightScheme

    torch.manual_seed(0)
    loaded = load_source(None)
    model = loaded.model
    model.model.layers = model.model.layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:n_layers]
    calibration = CalibrationConfig(str(WIKI / "valid.txt"), samples, 512, 0)
    import gc

    with torch.no_grad():  # weights may be lazily mapped from disk: make "the model itself" resident
        for prm in model.parameters():
            prm.data = prm.data.clone()
    gc.collect()
    loaded_rss = _status_mb("VmRSS")
    _reset_peak()  # loading (GGUF conversion) must not count as quantizing
    t0 = time.perf_counter()
    qm = quantize(loaded, WeightScheme("int", 4, 32, False), method="gptq", calibration=calibration, progress=False)
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    codes_mb = qm.quantized_bytes / 2**20  # the quantized model's own new tensors (codes, scales)
    return {"layers": n_layers, "samples": samples, "rss_loaded_mb": loaded_rss, "peak_rss_mb": peak,
            "added_mb": peak - loaded_rss, "quantized_tensors_mb": codes_mb,
            "added_beyond_model_mb": peak - loaded_rss - codes_mb, "seconds": seconds,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 20, 30])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_one(args.worker, args.samples)))
        return
    rows = []
    for n in args.layers:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--samples", str(args.samples)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{n} layers failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        rows.append(json.loads(line[7:]))
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct cut to its first N decoder layers", "scheme": "GPTQ int4 g32 asym",
            "calibration": f"WikiText-2 validation, {args.samples} x 512 tokens", "machine": f"{os.cpu_count()} CPU cores"}
    (out / "gptq_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# GPTQ peak memory vs decoder layers ({meta['model']})", "",
             f"{meta['scheme']}, {meta['calibration']}, each N in a fresh process.", "",
             "RSS after load: the fp32 model made resident. Quantized tensors: codes and scales of the "
             "quantized model (they grow with depth by nature). The last column is what calibration itself adds.", "",
             "| decoder layers | RSS after load MB | peak RSS MB | added MB | quantized tensors MB | added beyond the model MB | quantize s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['added_mb']:.0f} | "
              f"{r['quantized_tensors_mb']:.0f} | {r['added_beyond_model_mb']:.0f} | {r['seconds']:.1f} |" for r in rows]
    (out / "gptq_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
