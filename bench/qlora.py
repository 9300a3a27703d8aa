"""Benchmark: QLoRA (packed NF4 base with double quantization, LoRA adapters in fp32) against
plain LoRA on the full-precision base: training memory and loss on the same batches.

Each configuration runs in its own process; the QLoRA base is quantized once and loaded packed
(`lowbit.load(folder, runtime="packed")`), as a user loads a base bigger than memory. Memory: the process's resident set (VmRSS / VmHWM
from /proc) -- the peak during training, after the model is loaded, quantized and the loader's
garbage returned to the OS (the peak is reset there), minus the RSS of the bare process before
the model was loaded (torch and transformers imported). Same rank, targets (every decoder
Linear), learning rate, schedule and WikiText-2 validation windows.

    python bench/qlora.py                      # 40 steps x 256 tokens, rank 8
    python bench/qlora.py --steps 100 --ctx 512

Writes bench/results/qlora.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def worker(spec: dict) -> dict:
    import gc
    import time

    import torch

    from lowbit.eval.speed import _trim
    from lowbit.export.native import load as load_native
    from lowbit.model.load import load_source
    from lowbit.model.targets import select_targets
    from lowbit.train.loop import Schedule, next_token_loss, train_steps, training_windows
    from lowbit.train.qlora import attach_lora

    torch.set_num_threads(spec["threads"])
    _trim()
    bare = _status_kb("VmRSS")
    if spec["kind"] == "qlora":  # the NF4 base loads packed: its fp32 weights are never in memory
        qm = load_native(spec["base"], runtime="packed", compute_dtype=torch.float32)
        model, tokenizer = qm.model, qm.tokenizer
        names = [qm.targets[n].module_name for n in qm.tensors]
        del qm
    else:
        loaded = load_source(None)
        model, tokenizer = loaded.model, loaded.tokenizer
        names = [t.module_name for t in select_targets(model) if t.kind == "linear"]
    attach_lora(model, names, spec["rank"], 2.0 * spec["rank"], seed=0)
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    windows = training_windows(tokenizer, (WIKI / "valid.txt").read_text(), spec["ctx"], 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"])
    gc.collect()
    _trim()
    at_start = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to the current RSS
    t0 = time.perf_counter()
    losses = train_steps(model, opt, windows, Schedule(spec["steps"], spec["lr"]), 1, 0,
                         lambda ids: next_token_loss(model, ids), progress=False)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    frozen = sum(b.numel() * b.element_size() for m in model.modules() for b in m.buffers(recurse=False))
    frozen += sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(n.numel() + sum(v.numel() * v.element_size() for v in ps.values())
                  for m in model.modules() for n, ps, _ in getattr(m, "chunks", ()))
    return {"kind": spec["kind"], "gradient_checkpointing": spec["gradient_checkpointing"],
            "trainable_params": sum(p.numel() for p in params), "frozen_mb": frozen / 2**20,
            "bare_rss_mb": bare / 1024, "start_rss_mb": at_start / 1024, "peak_rss_mb": peak / 1024,
            "peak_above_bare_mb": (peak - bare) / 1024, "seconds": seconds, "seconds_per_step": seconds / spec["steps"],
            "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    base = ROOT / "bench" / "results" / ".qlora" / "nf4"   # the QLoRA base, quantized once (gitignored)
    if not base.exists():
        from lowbit.api import quantize
        from lowbit.export.native import save

        save(quantize(None, "NF4", method="rtn", progress=False), base)
    rows = []
    for gc_on in (False, True):
        for kind in ("lora", "qlora"):
            spec = {"kind": kind, "gradient_checkpointing": gc_on, "steps": args.steps, "ctx": args.ctx,
                    "rank": args.rank, "lr": args.lr, "threads": args.threads, "base": str(base)}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(proc.stderr[-3000:])
            rows.append(json.loads(line[7:]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    for r in rows:
        base = next(x for x in rows if x["kind"] == "lora" and x["gradient_checkpointing"] == r["gradient_checkpointing"])
        r["memory_vs_lora"] = r["peak_above_bare_mb"] / base["peak_above_bare_mb"]
        r["final_loss_gap"] = r["losses"][-1] - base["losses"][-1]
    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "data": "WikiText-2 validation",
            "steps": args.steps, "ctx": args.ctx, "rank": args.rank, "lr": args.lr, "threads": args.threads}
    out = ROOT / "bench" / "results"
    (out / "qlora.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# QLoRA vs LoRA on {meta['model']}", "",
             f"{args.steps} steps x 1 window of {args.ctx} tokens of WikiText-2 validation, rank {args.rank} adapters "
             f"(alpha {2 * args.rank}) on every decoder Linear, AdamW lr {args.lr}, {args.threads} threads. Memory: "
             "peak resident set during training minus the bare process's (torch imported, no model). LoRA's base is "
             "the fp32 model (memory-mapped from safetensors); QLoRA's is NF4 g64 with double quantization, loaded "
             "packed from a lowbit folder (its fp32 weights never in memory), decoded per call (forward and "
             "backward). Both keep the tied fp32 embedding table (28M weights, 108 MB) that the head uses.", "",
             "| base | gradient checkpointing | frozen weights MB | peak MB above bare | vs LoRA | s/step | loss first | loss last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'NF4 (QLoRA)' if r['kind'] == 'qlora' else 'fp32 (LoRA)'} | {'on' if r['gradient_checkpointing'] else 'off'} "
                     f"| {r['frozen_mb']:.0f} | {r['peak_above_bare_mb']:.0f} | {r['memory_vs_lora']:.2f}x | "
                     f"{r['seconds_per_step']:.2f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")
    (out / "qlora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
