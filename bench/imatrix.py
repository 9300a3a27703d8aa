"""Benchmark: importance matrices across lowbit and llama.cpp, scored by llama.cpp.

On the embedded default, with WikiText-2 validation as calibration text and WikiText-2 test for
scoring (llama.cpp's logits, KLD against the F32 GGUF of the same weights):

1. llama.cpp's `llama-imatrix` and `lowbit imatrix` each write an importance matrix from the same
   text (32 chunks of 512 tokens: llama.cpp's from the start of the file, lowbit's at seeded
   positions); per tensor, the cosine similarity of the two mean-square vectors.
2. lowbit reads llama.cpp's file and llama.cpp's `llama-quantize --imatrix` reads lowbit's (the
   run fails if it cannot).
3. For each type, llama-quantize without an imatrix, with llama.cpp's, with lowbit's; and lowbit's
   own RTN fit into the same type weighted by llama.cpp's file (`lowbit quantize --imatrix`).

llama-quantize and llama-imatrix are not in llama-cpp-python's wheel; build them from its sdist:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF && \\
        cmake --build build -j2 --target llama-quantize llama-imatrix      # ~8 min on 2 cores

    python bench/imatrix.py --llama-bin .../vendor/llama.cpp/build/bin [--types IQ4_NL Q4_0] [--windows 4]

Writes bench/results/imatrix.{json,md}.
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
TYPES = ["IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K_S"]
LOWBIT_FORMATS = {"IQ4_NL": "gguf_iq4_nl", "Q4_0": "gguf_q4_0"}   # types lowbit's RTN writes at every width here


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:2]))} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    return r.stdout + r.stderr


def main() -> None:
    import torch

    from gguf_vs_llamacpp import llama_logits, score

    from lowbit.api import quantize
    from lowbit.calib import CalibrationConfig, imatrix
    from lowbit.data import token_windows
    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import load_source
    from lowbit.model.targets import select_targets

    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", required=True, help="folder with llama-quantize and llama-imatrix")
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--work", default="/tmp/lowbit-imatrix-bench")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(args.llama_bin)
    calib = WIKI / "valid.txt"
    torch.manual_seed(0)

    loaded = load_source(None)
    f32 = write_gguf(loaded, work / "f32.gguf", full_precision="F32", force=True)
    windows = token_windows(loaded.tokenizer, (WIKI / "test.txt").read_text(), 512, args.windows).numpy()
    ref = llama_logits(f32, windows)

    # 1. both importance matrices from the same text
    t0 = time.perf_counter()
    ll_im = work / "llamacpp.imatrix.gguf"
    run([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "-c", "512", "--chunks", str(args.chunks),
         "-o", str(ll_im), "-t", str(os.cpu_count()), "--no-ppl"])
    t_ll = time.perf_counter() - t0
    t0 = time.perf_counter()
    lb_im = work / "lowbit.imatrix.gguf"
    lb_dat = work / "lowbit.imatrix.dat"
    targets = [t for t in select_targets(loaded.model) if t.kind in ("linear", "conv1d")]
    cal_windows = CalibrationConfig(str(calib), args.chunks, 512, 0).windows(loaded.tokenizer)
    stats = imatrix.collect(loaded.model, targets, cal_windows, progress=False)
    names = imatrix.gguf_names(loaded.model)
    imatrix.write(lb_im, stats, names, args.chunks, 512, str(calib))
    imatrix.write(lb_dat, stats, names, args.chunks, 512, str(calib))
    t_lb = time.perf_counter() - t0
    ll_means = imatrix.read(ll_im).mean_squares()
    lb_means = imatrix.read(lb_im).mean_squares()
    common = sorted(set(ll_means) & set(lb_means))
    cos = {n: float(torch.nn.functional.cosine_similarity(ll_means[n].double(), lb_means[n].double(), dim=0)) for n in common}
    ratio = {n: float(ll_means[n].sum() / lb_means[n].sum()) for n in common}
    rel = {n: max(r, 1 / r) for n, r in ratio.items()}   # the larger total over the smaller
    worst = min(cos, key=cos.get)
    stats_row = {"llama_entries": len(ll_means), "lowbit_entries": len(lb_means), "common": len(common),
                 "cosine_min": cos[worst], "cosine_min_tensor": worst, "cosine_median": float(np.median(list(cos.values()))),
                 "total_ratio_max": max(rel.values()), "llama_imatrix_seconds": t_ll, "lowbit_imatrix_seconds": t_lb}
    print(json.dumps(stats_row), flush=True)

    rows = [{"type": "F32", "imatrix": "–", "quantizer": "reference", "size_bytes": f32.stat().st_size,
             **score(ref, ref, windows)}]
    loads = {}
    for t in args.types:
        for label, im, slug in (("none", None, "none"), ("llama.cpp's", ll_im, "llama"),
                                ("lowbit's (.gguf)", lb_im, "lowbit-gguf"), ("lowbit's (.dat)", lb_dat, "lowbit-dat")):
            out = work / f"llamacpp-{t}-{slug}.gguf"
            cmd = [str(bin_dir / "llama-quantize")] + (["--imatrix", str(im)] if im else []) + [str(f32), str(out), t,
                                                                                               str(os.cpu_count())]
            log = run(cmd)
            if im is not None:
                line = next((ln for ln in log.splitlines() if "loaded" in ln and "importance matrix entries" in ln), "")
                loads[label] = line.strip()
            rows.append({"type": t, "imatrix": label, "quantizer": "llama-quantize", "size_bytes": out.stat().st_size,
                         **score(ref, llama_logits(out, windows), windows)})
            print(json.dumps(rows[-1]), flush=True)
        if t in LOWBIT_FORMATS:
            from lowbit.scheme import WeightScheme

            qm = quantize(load_source(None), WeightScheme(format=LOWBIT_FORMATS[t], bits=None, group_size=32),
                          imatrix=str(ll_im), progress=False)
            out = write_gguf(qm, work / f"lowbit-{t}-llamacpp-imatrix.gguf", force=True)
            rows.append({"type": t, "imatrix": "llama.cpp's", "quantizer": "lowbit rtn (decoder weights only)",
                         "size_bytes": out.stat().st_size, "weighted": qm.recipe["imatrix"]["weighted"],
                         **score(ref, llama_logits(out, windows), windows)})
            print(json.dumps(rows[-1]), flush=True)

    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "calibration": f"WikiText-2 validation, {args.chunks} x 512",
            "eval": f"WikiText-2 test, {args.windows} x 512 tokens, llama.cpp logits, KLD against the F32 GGUF",
            "llama_quantize_read": loads, "stats": stats_row,
            "command": "python bench/imatrix.py --llama-bin BIN " + " ".join(sys.argv[3:])}
    out_dir = ROOT / "bench" / "results"
    (out_dir / "imatrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Importance matrices: lowbit and llama.cpp, scored by llama.cpp", "",
             f"Model: {meta['model']}. Calibration: {meta['calibration']} (llama-imatrix: consecutive chunks from the "
             "start; lowbit imatrix: seeded positions). Eval: " + meta["eval"] + ".", "",
             f"Statistics: {stats_row['common']} tensors in both files; cosine similarity of the per-column mean "
             f"squares, median {stats_row['cosine_median']:.4f}, lowest {stats_row['cosine_min']:.4f} "
             f"({stats_row['cosine_min_tensor']}); totals within a factor {stats_row['total_ratio_max']:.3f}.", "",
             "llama-quantize reading lowbit's files: " + "; ".join(f"{k}: `{v}`" for k, v in loads.items()), "",
             "| type | imatrix | quantizer | size MB | PPL | KLD | KLD p99 | top-1 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['imatrix']} | {r['quantizer']} | {r['size_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | "
                     f"{r['kld']:.4f} | {r['kld_p99']:.3f} | {r['top1']:.3f} |")
    lines += ["", "Caveat: SmolLM2's shipped decoder weights lie on a Q4_1 grid; none of these types reproduces it "
              "(IQ4_NL's grid is non-linear, Q4_0 has no minimum), so the KLDs are real quantization error. lowbit's "
              "rows quantize the decoder weights only (embeddings F32), llama-quantize's also the embeddings "
              "(and use k-quant fallbacks where 256 does not divide a row): compare lowbit's row with llama-quantize's "
              "by size as well.", "", f"Command: `{meta['command']}`.", ""]
    (out_dir / "imatrix.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
