"""Benchmark: lowbit's GGUF files against llama.cpp's own quantizer, measured by llama.cpp.

1. lowbit writes an F32 GGUF of the embedded default (the reference, same weights as the source).
2. For each type, llama.cpp quantizes that F32 file (`llama_model_quantize`, no imatrix), and
   lowbit quantizes the model with the same mix policy, GPTQ rounding (Hessians from calibration
   text) into the GGUF block formats, and writes its own file.
3. llama.cpp computes the logits of every file on the same token windows: PPL, KLD against the
   F32 file, top-1 agreement. Sizes are file sizes.

4. With --budget Q4_0: lowbit fits llama.cpp's Q4_0 file size with `--max-size`, choosing each
   tensor's type by Fisher-priced error: from every type; without Q4_1 (the one type that
   reproduces this model's Q4_1-grid weights exactly); and from types without a per-block
   minimum only (Q3_K Q4_0 Q5_0 Q6_K Q8_0), none of which can express that grid.

    python bench/gguf_vs_llamacpp.py [--types Q8_0 Q4_K_M ...] [--windows 4] [--samples 64]
    python bench/gguf_vs_llamacpp.py --types Q4_0 --budget Q4_0 --name gguf_budget
    python bench/gguf_vs_llamacpp.py --types IQ4_NL IQ4_XS IQ3_S IQ3_XXS IQ2_M --llama-bin BIN --name gguf_imatrix
      (llama.cpp's side: llama-quantize with llama-imatrix's matrix from the calibration text)

Writes bench/results/gguf.json and bench/results/gguf.md. Note: this build of llama.cpp crashes
when it decodes several tokens at once on quantized weights here, so every file is evaluated
one token at a time (n_batch=1), the same for both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
CAVEATS_IMATRIX = (
    "\nCaveats: both files follow llama.cpp's mix rules with an importance matrix (lowbit's GPTQ counts as one), "
    "so their sizes differ by < 0.1 MB. SmolLM2's rows of 576 columns do not fit 256-weight super-blocks: they fall "
    "back to a 4.5-bit 32-block type, IQ4_NL in llama.cpp's file and, in lowbit's, the more accurate of IQ4_NL and "
    "Q4_0 per tensor (its measured fallback); only the 30 ffn_down weights (1536 columns) and the mixes' own choices "
    "carry the named i-quant type. SmolLM2's shipped weights lie on a Q4_1 grid, which none of these types "
    "expresses: these are real quantization errors.")


def llama_logits(path: Path, windows: np.ndarray) -> list[np.ndarray]:
    """llama.cpp's logits (n_tokens, vocab) for each window."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=1, logits_all=True, verbose=False,
                n_threads=os.cpu_count())
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        out.append(np.array(llm.scores[: len(w)], dtype=np.float32))
    del llm
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score(ref: list[np.ndarray], cand: list[np.ndarray], windows: np.ndarray) -> dict:
    nll, kl, agree, n = 0.0, [], 0, 0
    for r, c, w in zip(ref, cand, windows):
        lr, lc = log_softmax(r[:-1].astype(np.float64)), log_softmax(c[:-1].astype(np.float64))
        nxt = w[1:]
        nll += float(-lc[np.arange(len(nxt)), nxt].sum())
        kl.append((np.exp(lr) * (lr - lc)).sum(axis=-1))
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        n += len(nxt)
    kl = np.concatenate(kl)
    return {"ppl": math.exp(nll / n), "kld": float(kl.mean()), "kld_p99": float(np.quantile(kl, 0.99)), "top1": agree / n}


def main() -> None:
    import copy

    import llama_cpp
    import torch

    from lowbit.api import execute, make_recipe, quantize
    from lowbit.calib import CalibrationConfig
    from lowbit.data import token_windows
    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import load_source
    from lowbit.plan import Budget, build_plan
    from lowbit.plan.budget import BUDGET_TYPES

    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="a method option, as lowbit quantize --opt takes it (e.g. refit=4)")
    ap.add_argument("--work", default="/tmp/lowbit-gguf-bench")
    ap.add_argument("--name", default="gguf", help="results file name (bench/results/NAME.{json,md})")
    ap.add_argument("--budget", nargs="*", default=[], metavar="TYPE",
                    help="also: lowbit --max-size = llama.cpp's file of TYPE, choosing types by Fisher (e.g. Q4_0)")
    ap.add_argument("--fisher-windows", type=int, default=16)
    ap.add_argument("--llama-bin", help="folder with llama-quantize and llama-imatrix (see bench/imatrix.py): "
                                        "llama.cpp's side then uses an importance matrix from the calibration text")
    args = ap.parse_args()
    from lowbit.cli import _parse_options

    options = _parse_options(args.opt)
    label_opts = "".join(f" --opt {o}" for o in args.opt)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = load_source(None)
    windows = token_windows(loaded.tokenizer, (WIKI / "test.txt").read_text(), args.ctx, args.windows).numpy()
    f32 = write_gguf(loaded, work / "f32.gguf", full_precision="F32", force=True)
    ref = llama_logits(f32, windows)
    rows = [{"type": "F32", "side": "reference", "size_bytes": f32.stat().st_size, **score(ref, ref, windows)}]
    print(json.dumps(rows[-1]), flush=True)
    calibration = CalibrationConfig(str(WIKI / "valid.txt"), args.samples, 512, 0)

    im_file = None
    if args.llama_bin:   # llama.cpp's best: its own importance matrix from the same calibration text
        im_file = work / f"llamacpp-imatrix-{args.samples}.gguf"
        if not im_file.exists():
            subprocess.run([str(Path(args.llama_bin) / "llama-imatrix"), "-m", str(f32), "-f", str(WIKI / "valid.txt"),
                            "-c", "512", "--chunks", str(args.samples), "-o", str(im_file), "-t", str(os.cpu_count()),
                            "--no-ppl"], check=True, capture_output=True)

    def llama_cpp_file(t):
        out = work / f"llamacpp-{t}{'-imatrix' if im_file else ''}.gguf"
        t0 = time.perf_counter()
        if im_file is not None:
            r = subprocess.run([str(Path(args.llama_bin) / "llama-quantize"), "--imatrix", str(im_file), str(f32), str(out),
                                t, str(os.cpu_count())], capture_output=True, text=True)
            rc = r.returncode
        else:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}")
            params.nthread = os.cpu_count()
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        t_ll = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"llama.cpp's quantizer failed for {t} (code {rc})")
        ll = {"type": t, "side": "llama.cpp", "size_bytes": out.stat().st_size, "seconds": t_ll,
              **score(ref, llama_logits(out, windows), windows)}
        print(json.dumps(ll), flush=True)
        return ll

    for t in args.types:
        ll = llama_cpp_file(t)
        t0 = time.perf_counter()
        qm = quantize(copy.deepcopy(loaded), recipe=make_recipe(method=args.method, calibration=calibration, gguf_mix=t,
                                                                options=options),
                      container="gguf", progress=False)
        t_lb = time.perf_counter() - t0
        lb_file = write_gguf(qm, work / f"lowbit-{t}.gguf", force=True)
        lb = {"type": t, "side": f"lowbit {args.method}{label_opts}", "size_bytes": lb_file.stat().st_size, "seconds": t_lb,
              **score(ref, llama_logits(lb_file, windows), windows)}
        print(json.dumps(lb), flush=True)
        rows += [ll, lb]
    budget_rows = []
    for t in args.budget:
        ll = next((r for r in rows if r["type"] == t and r["side"] == "llama.cpp"), None) or llama_cpp_file(t)
        if ll not in rows:
            rows.append(ll)
        # all types; without Q4_1 (the one type that reproduces this model's Q4_1-grid weights exactly);
        # only types without a per-block minimum, none of which can express that grid
        for label, allowed in (("all types", BUDGET_TYPES), ("without Q4_1", tuple(x for x in BUDGET_TYPES if x != "Q4_1")),
                               ("no-min types only", ("Q3_K", "Q4_0", "Q5_0", "Q6_K", "Q8_0"))):
            t0 = time.perf_counter()
            work_model = copy.deepcopy(loaded)
            recipe = make_recipe(method=args.method, calibration=calibration, options=options,
                                 budget=Budget(max_size=ll["size_bytes"], candidates=allowed, fisher_windows=args.fisher_windows))
            plan = build_plan(work_model, recipe, "gguf", progress=False)
            budget = plan.budget
            t_alloc = time.perf_counter() - t0
            qm = execute(work_model, plan, progress=False)
            t_lb = time.perf_counter() - t0
            lb_file = write_gguf(qm, work / f"lowbit-budget-{t}-{label.replace(' ', '_')}.gguf", force=True)
            lb = {"type": f"<= {t} size", "side": f"lowbit {args.method}{label_opts} --max-size ({label})", "candidates": list(allowed),
                  "size_bytes": lb_file.stat().st_size, "max_bytes": ll["size_bytes"], "seconds": t_lb,
                  "seconds_allocation": t_alloc, "predicted_kld_rtn": budget["predicted_kld_rtn"],
                  "type_counts": budget["counts"], "types": budget["choices"],
                  **score(ref, llama_logits(lb_file, windows), windows)}
            print(json.dumps({k: v for k, v in lb.items() if k != "types"}), flush=True)
            budget_rows.append((ll, lb))
            rows.append(lb)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "eval": f"WikiText-2 test, {args.windows} x {args.ctx} tokens, logits by llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "calibration": (f"WikiText-2 validation, {args.samples} x 512 tokens: lowbit's Hessians and llama-imatrix's "
                            "importance matrix for llama-quantize" if im_file else
                            f"WikiText-2 validation, {args.samples} x 512 tokens (lowbit only; llama.cpp without imatrix)")}
    (out_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# GGUF: lowbit vs llama.cpp's quantizer on {meta['model']}", "", f"Eval: {meta['eval']}. Calibration: {meta['calibration']}.", "",
             "| type | llama.cpp size MB | lowbit size MB | size ratio | llama.cpp KLD | lowbit KLD | KLD ratio | llama.cpp top-1 | lowbit top-1 | llama.cpp PPL | lowbit PPL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in args.types:
        ll = next(r for r in rows if r["type"] == t and r["side"] == "llama.cpp")
        lb = next(r for r in rows if r["type"] == t and r["side"] != "llama.cpp")
        lines.append(f"| {t} | {ll['size_bytes']/1e6:.2f} | {lb['size_bytes']/1e6:.2f} | {lb['size_bytes']/ll['size_bytes']:.3f} | "
                     f"{ll['kld']:.4f} | {lb['kld']:.4f} | {lb['kld']/max(ll['kld'], 1e-12):.2f} | {ll['top1']:.3f} | {lb['top1']:.3f} | "
                     f"{ll['ppl']:.2f} | {lb['ppl']:.2f} |")
    if budget_rows:
        lines += ["", "Size-budgeted: lowbit chooses each tensor's type to fit llama.cpp's file size "
                  "(`lowbit quantize --method gptq --to gguf --max-size SIZE`), pricing each type's error by the diagonal "
                  f"Fisher information from {args.fisher_windows} calibration windows.", "",
                  "| budget | lowbit types from | llama.cpp MB | lowbit MB | llama.cpp KLD | lowbit KLD | KLD ratio | "
                  "Fisher-estimated KLD (RTN) | lowbit PPL | types chosen (tensors) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for ll, lb in budget_rows:
            counts = ", ".join(f"{k} {v}" for k, v in lb["type_counts"].items())
            lines.append(f"| {lb['type']} | {lb['side'].split('(')[1].rstrip(')')} | {ll['size_bytes']/1e6:.2f} | "
                         f"{lb['size_bytes']/1e6:.2f} | {ll['kld']:.4f} | {lb['kld']:.4f} | {lb['kld']/max(ll['kld'], 1e-12):.2f} | "
                         f"{lb['predicted_kld_rtn']:.4f} | {lb['ppl']:.2f} | {counts} |")
    lines.append(f"\nReference F32 PPL (llama.cpp): {rows[0]['ppl']:.2f}")
    if im_file is not None:
        lines.append(CAVEATS_IMATRIX)
    argv = " ".join("BIN" if a == args.llama_bin else a for a in sys.argv[1:])
    lines.append(f"\nCommand: `python bench/gguf_vs_llamacpp.py {argv}`")
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
