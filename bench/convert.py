"""Benchmark: a GPTQ checkpoint to GGUF, converted (lowbit convert) against dequantized and
quantized again (what users do today), scored by llama.cpp on the embedded default.

For a symmetric and an asymmetric INT4 g32 GPTQ (lowbit's GPTQ, calibrated on WikiText-2
validation, written as a GPTQ checkpoint):
1. `lowbit convert CKPT --to gguf`: Q4_0 / Q4_1 blocks with the checkpoint's own codes;
2. the checkpoint dequantized to an F32 GGUF, then llama.cpp's quantizer to Q4_0 / Q4_1;
3. for scale, llama.cpp's quantizer on the original F32 model (no GPTQ at all).
llama.cpp computes every file's logits on the same WikiText-2 test windows; KLD is against the
F32 source. (SmolLM2's weights lie on a Q4_1 grid: llama.cpp's own Q4_1 of the F32 model is
close to exact, which is why the asymmetric rows compare at Q4_1 and the symmetric at Q4_0.)

    python bench/convert.py [--windows 4] [--samples 64]

Writes bench/results/convert.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_vs_llamacpp import llama_logits, score  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"


def main() -> None:
    import llama_cpp

    from lowbit.cli import main as lowbit
    from lowbit.convert import read_quantized
    from lowbit.data import token_windows
    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import load_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--work", default="/tmp/lowbit-bench-convert")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_source(None)
    windows = token_windows(loaded.tokenizer, (WIKI / "test.txt").read_text(), 512, args.windows).numpy()
    f32 = write_gguf(loaded, work / "f32.gguf", full_precision="F32", force=True)
    ref = llama_logits(f32, windows)

    def llama_quantize(src: Path, t: str) -> Path:
        out = work / f"{src.stem}-llamacpp-{t}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}")
        params.nthread = os.cpu_count()
        # keep the token embedding (the tied head) in F32 as the GPTQ checkpoint does: the files
        # then differ only in the quantized linear layers
        params.token_embedding_type = params.output_tensor_type = 0   # GGML_TYPE_F32
        if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize failed for {t}")
        return out

    rows = []

    def row(label: str, path: Path, **extra):
        r = {"file": label, "size_bytes": path.stat().st_size, **extra, **score(ref, llama_logits(path, windows), windows)}
        print(json.dumps(r), flush=True)
        rows.append(r)

    calib = ["--calib", str(WIKI / "valid.txt"), "--samples", str(args.samples), "--seqlen", "512"]
    for sym, t in ((True, "Q4_0"), (False, "Q4_1")):
        name = "gptq-int4-g32-" + ("sym" if sym else "asym")
        ck = work / name
        if not ck.exists():
            assert lowbit(["--quiet", "quantize", "--method", "gptq", "--bits", "4", "--group-size", "32",
                           *([] if sym else ["--asym"]), *calib, "--to", "gptq", "-o", str(ck)]) == 0
        t0 = time.perf_counter()
        converted = work / f"{name}-converted.gguf"
        assert lowbit(["--quiet", "convert", str(ck), "--to", "gguf", "-o", str(converted), "--force"]) == 0
        t_convert = time.perf_counter() - t0
        row(f"{name} -> lowbit convert ({t})", converted, seconds=t_convert)
        dequantized = write_gguf(read_quantized(ck), work / f"{name}-f32.gguf", full_precision="F32", force=True)
        t0 = time.perf_counter()
        requant = llama_quantize(dequantized, t)
        row(f"{name} -> F32 -> llama.cpp {t}", requant, seconds=time.perf_counter() - t0)
        row(f"source F32 -> llama.cpp {t} (no GPTQ)", llama_quantize(f32, t))
    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "eval": f"WikiText-2 test, {args.windows} x 512 "
            f"tokens, logits by llama.cpp (llama-cpp-python {llama_cpp.__version__}, n_batch=1)",
            "calibration": f"WikiText-2 validation, {args.samples} x 512 tokens", "load_average": os.getloadavg()}
    results = ROOT / "bench" / "results"
    (results / "convert.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# A GPTQ checkpoint to GGUF: converted vs dequantized and quantized again", "",
             f"{meta['model']}. Eval: {meta['eval']}. GPTQ calibration: {meta['calibration']}. "
             "Command: `python bench/convert.py`. KLD against the F32 source, by llama.cpp.", "",
             "| file | MB | KLD | KLD p99 | top-1 | PPL |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['size_bytes'] / 1e6:.2f} | {r['kld']:.4f} | {r['kld_p99']:.4f} | {r['top1']:.3f} | "
              f"{r['ppl']:.2f} |" for r in rows]
    lines += ["", "Caveats, in the same table: SmolLM2's shipped weights lie on a Q4_1 grid (4-bit, groups of 32, "
              "float minimum), so llama.cpp's Q4_1 of the F32 model is nearly exact and no 4-bit method beats it "
              "there; the asymmetric GPTQ's integer zero-points cannot express that grid. Every file keeps the "
              "token embedding (the tied head) in F32, as the GPTQ checkpoint does (llama.cpp's quantizer told so "
              "with token_embedding_type/output_tensor_type), so the files differ only in the linear layers."]
    (results / "convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
