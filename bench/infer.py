"""Benchmark: lowbit's packed runtime on the embedded default — resident memory, prefill and
decode tokens/s as ratios to FP32 in one run, beside llama.cpp on GGUF files of the same bits
and torchao's CPU int4 weight-only kernel; plus each candidate's KLD to FP32 on WikiText-2.

    python bench/infer.py            # 128-token prompt, 64 greedy tokens, 4 KLD windows of 512
    python bench/infer.py --quick    # 64-token prompt, 32 greedy tokens, 2 KLD windows

Peers: llama.cpp through llama-cpp-python (a dev dependency); torchao's int4 CPU layout
("opaque", torch's own int4pack kernel), which torchao 0.18 dropped: install 0.14.1 aside,
`pip install --no-deps --target /tmp/tao014 torchao==0.14.1`, and pass `--torchao-path
/tmp/tao014` (it is not a lowbit dependency; without it the row says why it failed). Each row runs in a fresh process (lowbit.eval.speed), so its memory is its own.
Writes bench/results/infer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
WORK = ROOT / "bench" / "results" / ".infer"

# (label, recipe for lowbit quantize, GGUF export of the same quantization or None)
CANDIDATES = [
    ("W4 g32 sym, embeddings fp32 (int4pack)",
     {"scheme": {"weights": {"format": "int", "bits": 4, "group_size": 32, "symmetric": True}}}, None),
    ("Q4_0 on every weight incl. embeddings (int4pack)",
     {"scheme": {"weights": {"format": "gguf_q4_0", "bits": None, "group_size": 32}},
      "targets": ["self_attn", "mlp", "embed_tokens"], "ignore": ["norm"]}, "Q4_0"),
    ("W8 per-channel weight-only (int8pack)", {"scheme": "W8A16"}, None),
    ("Q8_0 on every weight incl. embeddings (decode per call)",
     {"scheme": {"weights": {"format": "gguf_q8_0", "bits": None, "group_size": 32}},
      "targets": ["self_attn", "mlp", "embed_tokens"], "ignore": ["norm"]}, "Q8_0"),
    ("W8A8 int8 per-token dynamic (int_mm)", {"scheme": "W8A8"}, None),
    ("NF4 g64 (decode per call)", {"scheme": "NF4"}, None),
    # the decoder as row 0, the tied embedding/head in int8 per row: gathered from int8 rows, the head
    # through the int8pack kernel; in GGUF exactly Q4_0 blocks and Q8_0 blocks sharing each row's scale
    ("W4 g32 sym, embeddings int8 per row (int4pack + int8pack)",
     {"scheme": {"weights": {"format": "int", "bits": 4, "group_size": 32, "symmetric": True}},
      "targets": ["self_attn", "mlp", "embed_tokens"], "ignore": ["norm"],
      "groups": [{"name": "embeddings", "targets": ["embed_tokens"], "scheme": "W8A16"}]}, "Q4_0-Q8_0"),
    # W8A8 on the decoder, the tied embedding/head int8 per row (weight-only: the head's inputs stay fp32)
    ("W8A8 int8 per-token dynamic, embeddings int8 per row (int_mm + int8pack)",
     {"scheme": "W8A8", "targets": ["self_attn", "mlp", "embed_tokens"], "ignore": ["norm"],
      "groups": [{"name": "embeddings", "targets": ["embed_tokens"], "scheme": "W8A16"}]}, None),
]


def quantize_candidates(only: list[str] | None) -> list[tuple[str, Path, Path | None]]:
    """Quantize (RTN) each candidate once into bench/results/.infer/, and export its GGUF."""
    from lowbit.api import quantize
    from lowbit.export import native
    from lowbit.export.gguf import write_gguf

    WORK.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (label, recipe, gguf_type) in enumerate(CANDIDATES):
        if only and i not in only:
            continue
        folder = WORK / f"c{i}"
        if not (folder / "lowbit.json").exists():
            qm = quantize(None, recipe=recipe, progress=False)
            native.save(qm, folder, force=True)
            if gguf_type:
                write_gguf(qm, folder / f"{gguf_type}.gguf")   # the same codes and scales, for llama.cpp
        out.append((label, folder, folder / f"{gguf_type}.gguf" if gguf_type else None))
    return out


def torchao_worker(spec: dict) -> dict:
    """The FP32 source in bf16 with torchao's int4 weight-only CPU layout on every decoder Linear."""
    if spec.get("torchao_path"):
        sys.path.insert(0, spec["torchao_path"])
    import torch

    from lowbit.eval.speed import _trim, _warm_imports, measure_model, rss_bytes

    torch.set_num_threads(spec["threads"])
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    _warm_imports(spec["warm_config"])
    _trim()
    before = rss_bytes()
    from lowbit.model.load import load_source

    model = load_source(None).model.to(torch.bfloat16)
    head = model.get_output_embeddings()
    quantize_(model, Int4WeightOnlyConfig(group_size=spec["group_size"], int4_packing_format="opaque"),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and m is not head)
    r = measure_model(model, spec["prompt"], spec)
    r.update(label=spec["label"], runtime="torchao", path=None, rss_before_load=before,
             model_rss=r["rss_after_run"] - before)
    return r


def _cpu_name() -> str:
    """The CPU's model name (llama.cpp's and torch's kernels differ between AMX, AVX-512 and AVX2)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def kld_rows(cands, windows) -> dict[str, dict]:
    """KLD / top-1 against FP32 of each candidate in the packed runtime and as decoded."""
    import torch

    from lowbit.eval.divergence import compare, run_reference
    from lowbit.export.native import load
    from lowbit.model.load import load_source

    ref = run_reference(load_source(None).model, windows, progress=False)
    out = {}
    for label, folder, _ in cands:
        row = {}
        for runtime in ("decoded", "packed"):
            qm = load(folder, runtime=runtime)
            with torch.inference_mode():
                r = compare(qm.model, ref, progress=False)
            row[runtime] = {"kld": r.kld, "top1": r.top1}
            del qm
        out[label] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", type=int, nargs="*", help="candidate indices (default all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", type=int, nargs="*", metavar="INDEX",
                    help="add a torch.compile row for these candidates (no index: the first int4pack one)")
    ap.add_argument("--torchao-path", help="a folder holding torchao 0.14.1 (see the module docstring)")
    ap.add_argument("--name", help="results file name (bench/results/NAME.{json,md})")
    ap.add_argument("--torchao-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torchao_worker:
        print("RESULT " + json.dumps(torchao_worker(json.loads(args.torchao_worker))), flush=True)
        os._exit(0)

    import torch

    from lowbit.data import token_windows
    from lowbit.eval.speed import measure, prompt_tokens, with_ratios
    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import load_source

    n_prompt, n_decode, n_kld = (64, 32, 2) if args.quick else (128, 64, 4)
    cands = quantize_candidates(args.only)
    loaded = load_source(None)
    text = (WIKI / "test.txt").read_text()
    prompt = prompt_tokens(loaded.tokenizer, text, n_prompt)
    windows = token_windows(loaded.tokenizer, text, 512, n_kld)
    f32_gguf = WORK / "F32.gguf"
    if not f32_gguf.exists():
        write_gguf(loaded, f32_gguf, full_precision="F32")
    del loaded
    base = {"prompt": prompt, "decode_tokens": n_decode, "threads": args.threads, "warm_config": str(cands[0][1]),
            "repeats": 2}
    specs = [({**base, "label": "FP32 (transformers)", "runtime": "source", "path": None}, None),
             ({**base, "label": "FP32 GGUF (llama.cpp)", "runtime": "llama.cpp", "path": str(f32_gguf)}, None)]
    for label, folder, gguf in cands:
        specs.append(({**base, "label": label, "runtime": "packed", "path": str(folder)}, None))
        if gguf is not None:
            specs.append(({**base, "label": f"{gguf.stem} GGUF of the row above (llama.cpp)", "runtime": "llama.cpp",
                           "path": str(gguf)}, None))
    if args.compile is not None:
        chosen = ([c for c in cands if c[1].name in {f"c{i}" for i in args.compile}] if args.compile
                  else [next(c for c in cands if "int4pack" in c[0])])
        for label, folder, _ in chosen:
            specs.append(({**base, "label": label + " + torch.compile", "runtime": "packed", "path": str(folder),
                           "compile": True}, None))
    specs.append(({**base, "label": "torchao int4 weight-only g32 (bf16 model, opaque CPU layout)", "runtime": "torchao",
                   "path": None, "group_size": 32, "torchao_path": args.torchao_path}, [sys.executable, __file__, "--torchao-worker"]))
    rows = []
    for spec, cmd in specs:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = measure(spec, cmd)
        r["wall_seconds"] = time.perf_counter() - t0
        r["loadavg_1m"] = [load_before, os.getloadavg()[0]]
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "generated"}), flush=True)
    rows = with_ratios(rows, "FP32 (transformers)")
    klds = kld_rows(cands, windows)
    for r in rows:
        if r["runtime"] == "packed" and r["label"] in klds:
            r["kld"] = klds[r["label"]]
    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "threads": args.threads, "prompt_tokens": n_prompt,
            "decode_tokens": n_decode, "kld_windows": f"WikiText-2 test, {n_kld} x 512 tokens", "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "cpu": _cpu_name(), "command": "python bench/infer.py " + " ".join(sys.argv[1:])}
    out_dir = ROOT / "bench" / "results"
    name = args.name or ("infer_quick" if args.quick else "infer")
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Inference on {meta['model']}", "",
             f"{n_prompt}-token WikiText-2 prompt, {n_decode} greedy tokens, {args.threads} threads; each row in a fresh "
             "process, the fastest of 2 timed runs after a warm-up. Resident MB: RSS after load and one warm-up "
             "generation minus the process's RSS just before the load (Python, torch, transformers and the "
             "architecture's modeling code imported). Ratios are to the FP32 transformers row of this run. "
             f"KLD: against FP32 on {meta['kld_windows']}, as lowbit measured the quantized model (decoded fp32) and in "
             "the packed runtime (bf16 inputs to torch's int4/int8 kernels).", "",
             "Quality caveat: SmolLM2's shipped weights lie on a Q4_1 grid, which none of these formats reproduces "
             "exactly, so the KLDs are real quantization error, not a grid artefact.", "",
             "| model | resident MB | × FP32 | prefill tok/s | × FP32 | decode tok/s | × FP32 | same greedy tokens | KLD decoded | KLD packed | kernels | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |||||||||||")
            continue
        kld = r.get("kld", {})
        fmt = lambda d: f"{d['kld']:.4f}" if d else "–"  # noqa: E731
        lines.append(f"| {r['label']} | {r['model_rss'] / 1e6:.0f} | {r['model_rss_ratio']:.3f} | {r['prefill_tok_s']:.1f} | "
                     f"{r['prefill_speedup']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f} | "
                     f"{r['same_tokens_as_reference']} | {fmt(kld.get('decoded'))} | {fmt(kld.get('packed'))} | "
                     f"{', '.join(f'{k} {v}' for k, v in r.get('kernels', {}).items()) or '–'} | "
                     f"{'–'.join(f'{x:.1f}' for x in r['loadavg_1m'])} |")
    notes = [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", f"Machine: {meta['cpu']}, torch {meta['torch']}. Command: `{meta['command']}`."]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
