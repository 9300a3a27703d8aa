"""Benchmark: llama.cpp's lattice-grid i-quants (IQ3_S ... IQ1_S) written by lowbit and by llama.cpp.

On the embedded default (SmolLM2-135M-Instruct), WikiText-2 validation as calibration text,
WikiText-2 test for scoring, KLD against the unquantized model:

1. Encoders, one variable at a time: only the 30 ffn_down weights (576 x 1536; the other weights
   have 576 columns, which 256-weight super-blocks do not divide) are quantized, the rest stays
   F32; the same llama.cpp importance matrix weighs both quantizers:
   - llama.cpp's quantizer (ggml_quantize_chunk of the ggml that llama-cpp-python ships);
   - lowbit's RTN grid search (`--method rtn --imatrix FILE`);
   - lowbit's GPTQ with joint-vector steps (its own Hessians from the calibration text).
   All rows decoded by gguf-py's reference and scored by the same PyTorch forward. Also the
   importance-weighted relative error of each quantizer on those weights.
2. Whole llama.cpp mixes (IQ2_M, IQ2_XXS, ...): `llama-quantize --imatrix` against
   `lowbit quantize --to gguf --type MIX --imatrix` with llama.cpp's fallback table, both scored
   by llama.cpp's own logits (needs llama-quantize / llama-imatrix, see bench/imatrix.py).

    python bench/iq_grids.py [--llama-bin .../vendor/llama.cpp/build/bin] [--types IQ2_XS ...]

Writes bench/results/iq_grids.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
TYPES = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
MIXES = ["IQ3_M", "IQ2_M", "IQ2_XXS", "IQ1_M"]


def main() -> None:
    import gguf.quants as gq
    import torch
    from gguf.constants import GGMLQuantizationType
    from gguf_vs_llamacpp import llama_logits, score
    from imatrix import run

    from lowbit.api import quantize
    from lowbit.calib import CalibrationConfig, imatrix
    from lowbit.data import token_windows
    from lowbit.eval.llama_quant import llama_cpp_quantize
    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import load_source
    from lowbit.model.targets import select_targets
    from lowbit.scheme import WeightScheme

    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", help="folder with llama-quantize (part 2 is skipped without it)")
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--mixes", nargs="*", default=MIXES)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--work", default="/tmp/lowbit-iq-bench")
    ap.add_argument("--render-log", metavar="LOG", help="only write the results files from the JSON rows a run "
                                                        "printed (a run stopped before its end)")
    args = ap.parse_args()
    if args.render_log:
        rows = [json.loads(ln[ln.index("{"):]) for ln in Path(args.render_log).read_text().splitlines() if '"part"' in ln]
        render(rows, _meta(args, f"python bench/iq_grids.py --types {' '.join(args.types)} (part 1; rendered from its "
                                 "log with --render-log: part 2 was stopped for time)"))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    calib = WIKI / "valid.txt"

    loaded = load_source(None)
    tok = loaded.tokenizer
    windows = token_windows(tok, (WIKI / "test.txt").read_text(), 512, args.windows)

    def torch_logits(model) -> list[np.ndarray]:
        with torch.no_grad():
            return [model(w[None]).logits[0].float().numpy() for w in windows]

    ref = torch_logits(loaded.model)
    wnp = windows.numpy()

    # the importance matrix both quantizers use: lowbit's statistics written as llama.cpp's file
    im_path = work / "imatrix.gguf"
    targets = [t for t in select_targets(loaded.model) if t.kind in ("linear", "conv1d")]
    if not im_path.exists():
        cal = CalibrationConfig(str(calib), args.chunks, 512, 0).windows(tok)
        stats = imatrix.collect(loaded.model, targets, cal, progress=False)
        imatrix.write(im_path, stats, imatrix.gguf_names(loaded.model), args.chunks, 512, str(calib))
    means = imatrix.read(im_path).mean_squares()
    names = imatrix.gguf_names(loaded.model)
    down = [t for t in targets if t.name.endswith("mlp.down_proj.weight")]

    rows = [{"part": "encoders", "type": "F32", "quantizer": "reference", **score(ref, ref, wnp)}]
    for t in args.types:
        fmt = f"gguf_{t.lower()}"
        gt = GGMLQuantizationType[t]
        # llama.cpp's quantizer, weights in place of the originals
        model = load_source(None).model
        params = dict(model.named_parameters())
        num, den, t0 = 0.0, 0.0, time.perf_counter()
        for target in down:
            W = params[target.name].data
            imp = means[names[target.name]]
            data = llama_cpp_quantize(W.numpy(), t, imp.numpy())
            Q = torch.from_numpy(gq.dequantize(data, gt).reshape(W.shape).copy())
            num += float((((W - Q) ** 2) * imp).sum())
            den += float(((W ** 2) * imp).sum())
            W.copy_(Q)
        secs = time.perf_counter() - t0
        rows.append({"part": "encoders", "type": t, "quantizer": "llama.cpp ggml_quantize_chunk + imatrix",
                     "weighted_rel_err": num / den, "seconds": secs, **score(ref, torch_logits(model), wnp)})
        print(json.dumps(rows[-1]), flush=True)
        # lowbit RTN with the same file
        t0 = time.perf_counter()
        qm = quantize(None, WeightScheme(fmt, None, -1), include=[r"mlp\.down_proj"], imatrix=str(im_path),
                      progress=False)
        secs = time.perf_counter() - t0
        num = den = 0.0
        orig = dict(loaded.model.named_parameters())
        qp = dict(qm.model.named_parameters())
        for target in down:
            W, imp = orig[target.name].data, means[names[target.name]]
            Q = qm.tensors[target.name].dequantize().reshape(W.shape)
            num += float((((W - Q) ** 2) * imp).sum())
            den += float(((W ** 2) * imp).sum())
        del qp
        rows.append({"part": "encoders", "type": t, "quantizer": "lowbit rtn + imatrix",
                     "weighted_rel_err": num / den, "seconds": secs, **score(ref, torch_logits(qm.model), wnp)})
        print(json.dumps(rows[-1]), flush=True)
        if not args.no_gptq:
            t0 = time.perf_counter()
            qm = quantize(None, WeightScheme(fmt, None, -1), method="gptq", include=[r"mlp\.down_proj"],
                          calibration=CalibrationConfig(str(calib), args.chunks, 512, 0), progress=False)
            secs = time.perf_counter() - t0
            num = den = 0.0
            for target in down:
                W, imp = orig[target.name].data, means[names[target.name]]
                Q = qm.tensors[target.name].dequantize().reshape(W.shape)
                num += float((((W - Q) ** 2) * imp).sum())
                den += float(((W ** 2) * imp).sum())
            rows.append({"part": "encoders", "type": t, "quantizer": "lowbit gptq (joint-vector steps)",
                         "weighted_rel_err": num / den, "seconds": secs, **score(ref, torch_logits(qm.model), wnp)})
            print(json.dumps(rows[-1]), flush=True)

    if args.llama_bin:
        bin_dir = Path(args.llama_bin)
        f32 = write_gguf(loaded, work / "f32.gguf", full_precision="F32", force=True)
        lref = llama_logits(f32, wnp)
        for mix in args.mixes:
            out = work / f"llamacpp-{mix}.gguf"
            run([str(bin_dir / "llama-quantize"), "--imatrix", str(im_path), str(f32), str(out), mix, str(os.cpu_count())])
            rows.append({"part": "mixes", "type": mix, "quantizer": "llama-quantize --imatrix",
                         "size_bytes": out.stat().st_size, **score(lref, llama_logits(out, wnp), wnp)})
            print(json.dumps(rows[-1]), flush=True)
            out = work / f"lowbit-{mix}.gguf"
            r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "--to", "gguf", "--type", mix, "--imatrix",
                                str(im_path), "--fallback", "llama.cpp", "-o", str(out), "--force"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"lowbit quantize --type {mix} failed: {r.stderr[-800:]}")
            rows.append({"part": "mixes", "type": mix, "quantizer": "lowbit rtn --imatrix (same fallbacks)",
                         "size_bytes": out.stat().st_size, **score(lref, llama_logits(out, wnp), wnp)})
            print(json.dumps(rows[-1]), flush=True)

    render(rows, _meta(args, "python bench/iq_grids.py " + " ".join(sys.argv[1:])))


def _meta(args, command: str) -> dict:
    return {"model": "SmolLM2-135M-Instruct (embedded default)",
            "calibration": f"WikiText-2 validation, {args.chunks} x 512 tokens (imatrix and GPTQ)",
            "eval": f"WikiText-2 test, {args.windows} x 512 tokens, KLD against the unquantized model",
            "command": command}


def render(rows: list[dict], meta: dict) -> None:
    """bench/results/iq_grids.{json,md} from the rows of a run."""
    out_dir = ROOT / "bench" / "results"
    (out_dir / "iq_grids.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# llama.cpp's i-quant grids: lowbit's encoders and llama.cpp's", "",
             f"Model: {meta['model']}. Calibration: {meta['calibration']}. Eval: {meta['eval']}.", "",
             "## 1. Encoders: only the 30 ffn_down weights quantized (576 x 1536), the rest F32", "",
             "Same importance matrix for both quantizers (lowbit's statistics written as llama.cpp's imatrix file; "
             "GPTQ uses its own Hessians from the same text). Weighted error: sum of imatrix x (W - Q)^2 over "
             "sum of imatrix x W^2. PyTorch logits for every row.", "",
             "| type | quantizer | weighted rel. error | PPL | KLD | KLD p99 | top-1 | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "encoders":
            err = f"{r['weighted_rel_err']:.4f}" if "weighted_rel_err" in r else "–"
            secs = f"{r['seconds']:.0f}" if "seconds" in r else "–"
            lines.append(f"| {r['type']} | {r['quantizer']} | {err} | {r['ppl']:.3f} | {r['kld']:.4f} | "
                         f"{r['kld_p99']:.3f} | {r['top1']:.3f} | {secs} |")
    if any(r["part"] == "mixes" for r in rows):
        lines += ["", "## 2. Whole mixes, scored by llama.cpp", "",
                  "Every other tensor follows llama.cpp's mix rules; rows 256 does not divide fall back to IQ4_NL "
                  "(llama.cpp's table, `--fallback llama.cpp`), so most of SmolLM2 is IQ4_NL/Q8_0 in both files.", "",
                  "| mix | quantizer | size MB | PPL | KLD | KLD p99 | top-1 |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["part"] == "mixes":
                lines.append(f"| {r['type']} | {r['quantizer']} | {r['size_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | "
                             f"{r['kld']:.4f} | {r['kld_p99']:.3f} | {r['top1']:.3f} |")
    lines += ["", "Caveat: SmolLM2's shipped decoder weights lie on a Q4_1 grid, which no i-quant grid can express, "
              "so these errors are real quantization error. Seconds are wall time on a shared 2-core machine.",
              "", f"Command: `{meta['command']}`.", ""]
    (out_dir / "iq_grids.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
