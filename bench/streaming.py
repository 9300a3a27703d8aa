"""Benchmark: peak memory of a layer-streamed quantization against a resident one, on
synthetic checkpoints with 7B-class layer shapes (hidden 4096, intermediate 11008, 32 heads,
8 KV heads; bf16; random weights, made here on the fly, sharded with an index).

Each run is its own subprocess; its peak RSS is its own VmHWM (/proc/self/status, which exec
resets: a fork's inherited high-water mark, as in os.wait4's ru_maxrss, would count ours). The
resident run is lowbit's in-memory path (the whole model in fp32, then saved); the streamed one
is what `lowbit quantize` does with a safetensors folder. Both write the same bytes (checked).

    python bench/streaming.py --quick      # RTN and GPTQ, depth 2/4 (and 4/8 for RTN)
    python bench/streaming.py              # + depth 8 for GPTQ, width series, a >= 3 GB checkpoint
Writes bench/results/streaming.{json,md}. Checkpoints are made under --work (default /tmp).
"""

from __future__ import annotations

import argparse
import hashlib
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

CHILD = r"""
import json, sys, time
from lowbit.calib import CalibrationConfig
from lowbit.api import execute, make_recipe
from lowbit.model.load import load_lazy, load_source
from lowbit.plan import build_plan
from lowbit.scheme import WeightScheme
from lowbit.streaming import quantize_streamed
mode, src, out, method, calib, samples, seqlen, container, rotate, budget = sys.argv[1:11]
cal = CalibrationConfig(samples=int(samples), seqlen=int(seqlen), text=calib)
scheme = WeightScheme("gguf_q4_0", None, -1) if container == "gguf" else WeightScheme(bits=4, group_size=128, symmetric=True)
from lowbit.plan.recipe import Budget
extra = {"budget": Budget(target_bpw=float(budget), fisher_windows=int(samples))} if budget else {}
recipe = make_recipe(scheme, method=method, calibration=cal, rotate=rotate or None, **extra)
def hwm():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) * 1024
layer_peaks = []   # each layer's own peak: the high-water mark is reset (clear_refs 5) as its part is written
import lowbit.streaming as streaming
real_write = streaming._atomic_safetensors
def write(path, tensors, metadata):
    real_write(path, tensors, metadata)
    if path.name.startswith("layer-"):
        layer_peaks.append(hwm())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
streaming._atomic_safetensors = write
t0 = time.perf_counter()
if mode == "streamed":
    lazy = load_lazy(src)
    assert lazy is not None
    quantize_streamed(lazy, build_plan(lazy, recipe, container, False), out, progress=False)
else:
    from lowbit.export import write
    loaded = load_source(src)
    write(execute(loaded, build_plan(loaded, recipe, container, False), progress=False), container, out)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_bytes": max([hwm(), *layer_peaks]), "layer_peaks": layer_peaks}))
"""


def make_checkpoint(folder: Path, layers: int, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
                    kv_heads: int = 8, seed: int = 0) -> int:
    """A LLaMA-shaped bf16 checkpoint, one shard per layer plus one for the rest; its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from lowbit.model.load import default_gguf_path

    if (folder / "config.json").exists():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def layer(i):
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rand(hidden, hidden),
                p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, hidden),
                p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                p + "mlp.up_proj.weight": rand(intermediate, hidden),
                p + "mlp.down_proj.weight": rand(hidden, intermediate),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}

    def rest():
        return {"model.embed_tokens.weight": rand(len(tokenizer), hidden), "lm_head.weight": rand(len(tokenizer), hidden),
                "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}

    weight_map, total = {}, 0
    n = layers + 1
    for k in range(n):   # one shard in memory at a time
        part = rest() if k == 0 else layer(k - 1)
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(part, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in part})
        total += sum(v.numel() * 2 for v in part.values())
        del part
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_child(mode: str, src: Path, out: Path, method: str, calib: str, samples: int, seqlen: int,
              container: str = "native", rotate: str = "", budget: str = "") -> dict:
    _remove(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(src), str(out), method, calib, str(samples), str(seqlen),
                             container, rotate, budget],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.perf_counter()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {method} on {src.name} failed:\n{stderr[-3000:]}")
    return {"wall_seconds": wall, **json.loads(stdout.strip().splitlines()[-1])}


def _remove(path: Path) -> None:
    if path.is_file():
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)


def digest(path: Path) -> str:
    """A folder's file names and bytes, or one file's bytes."""
    h = hashlib.sha256()
    for p in ([path] if path.is_file() else sorted(path.iterdir())):
        if p != path:
            h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default="/tmp/lowbit-streaming-bench")
    ap.add_argument("--samples", type=int, default=8, help="GPTQ calibration windows (default 8)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--only", choices=["rtn", "gptq"], help="one method's rows -> streaming_<method>.{json,md}")
    ap.add_argument("--only-rows", action="store_true", help="only the --row rows")
    ap.add_argument("--name", help="results file name (default streaming[_METHOD])")
    ap.add_argument("--to", choices=["native", "gguf", "gptq", "awq", "compressed-tensors"], default="native",
                    help="the output: a lowbit folder (int4 g128 sym), a GGUF file (Q4_0: int4 sym in blocks of 32), "
                         "or a GPTQ/AWQ/compressed-tensors folder (int4 g128 sym)")
    ap.add_argument("--rotate", choices=["hadamard"], help="rotate first (streamed: layer by layer into a hidden "
                    "float32 checkpoint beside the output, which needs the checkpoint's size x 2 (bf16) of disk)")
    ap.add_argument("--budget", type=float, help="plan under a size budget of this many bits per weight (the "
                    "streamed run's diagonal Fisher runs layer by layer over --samples windows)")
    ap.add_argument("--row", action="append", default=[],
                    help='an extra row as JSON [method, layers, hidden, intermediate, [modes]], e.g. '
                         '\'["gptq", 32, 4096, 11008, ["streamed"]]\' (a 7B-sized checkpoint: 13.5 GB of disk)')
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = str(WIKI / "valid.txt")
    # (method, layers, hidden, intermediate, modes)
    both = ("streamed", "resident")
    rows = [("rtn", 2, 4096, 11008, both), ("rtn", 4, 4096, 11008, both), ("rtn", 8, 4096, 11008, both),
            ("gptq", 2, 4096, 11008, both), ("gptq", 4, 4096, 11008, both)]
    if not args.quick:
        rows += [("gptq", 8, 4096, 11008, ("streamed",)),
                 ("rtn", 4, 1024, 2816, both), ("rtn", 4, 2048, 5504, both), ("gptq", 4, 2048, 5504, both)]
    if args.only_rows:
        rows = []
    rows += [tuple(json.loads(r)) for r in args.row]
    if args.only:
        rows = [r for r in rows if r[0] == args.only]
    results = []
    for method, layers, hidden, inter, modes in rows:
        ckpt = work / f"llama-{layers}x{hidden}"
        size = make_checkpoint(ckpt, layers, hidden, inter, heads=hidden // 128, kv_heads=max(1, hidden // 512))
        digests = {}
        for mode in modes:
            out = work / (f"out-{mode}.gguf" if args.to == "gguf" else f"out-{mode}")
            r = run_child(mode, ckpt, out, method, calib, args.samples, args.seqlen, args.to, args.rotate or "",
                          str(args.budget) if args.budget else "")
            digests[mode] = digest(out)
            row = {"method": method, "mode": mode, "to": args.to, "rotate": args.rotate, "budget_bpw": args.budget, "layers": layers, "hidden": hidden, "intermediate": inter,
                   "checkpoint_bytes": size, **r, "rss_over_checkpoint": r["peak_rss_bytes"] / size,
                   "load_average": os.getloadavg()[0]}
            results.append(row)
            print(json.dumps(row), flush=True)
            _remove(out)
        if len(digests) == 2:
            for row in results[-2:]:
                row["same_bytes_as_resident"] = digests["streamed"] == digests["resident"]
    if not args.keep:
        for p in work.glob("llama-*"):
            shutil.rmtree(p, ignore_errors=True)
    write_results(results, args)


def _layer_peaks(row: dict) -> str:
    peaks = [p / 1e9 for p in row.get("layer_peaks") or []]
    if row["mode"] != "streamed" or not peaks:
        return "-"
    later = f"{min(peaks[1:]):.2f}-{max(peaks[1:]):.2f}" if len(peaks) > 1 else "-"
    return f"{peaks[0]:.2f} / {later}"


OUTPUTS = {"gguf": "one GGUF file, Q4_0 (int4 sym, blocks of 32), written tensor by tensor", "native": "a lowbit folder"}


def write_results(results: list[dict], args) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "calibration": f"GPTQ: {args.samples} x {args.seqlen} WikiText-2 validation tokens",
            "scheme": "Q4_0 (int4 sym g32, fp16 scales)" if args.to == "gguf" else "int4 g128 sym"}
    name = args.name or ("streaming" + (f"_{args.only}" if args.only else ""))
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    lines = ["# Layer-streamed vs resident quantization: peak RSS", "",
             f"`python bench/streaming.py{' --quick' if args.quick else ''}{f' --only {args.only}' if args.only else ''}"
             f"{' --only-rows' if args.only_rows else ''}{''.join(f' --row {r!r}' for r in args.row)}"
             f"{f' --name {args.name}' if args.name else ''}{f' --to {args.to}' if args.to != 'native' else ''}"
             f"{f' --rotate {args.rotate}' if args.rotate else ''}{f' --budget {args.budget}' if args.budget else ''}"
             f"{f' --samples {args.samples}' if args.samples != 8 else ''}{f' --seqlen {args.seqlen}' if args.seqlen != 256 else ''}`. "
             f"{f'A size budget of {args.budget} bits per weight (diagonal Fisher over {args.samples} x {args.seqlen} tokens; streamed: layer by layer). ' if args.budget else ''}"
             f"{'Rotated first (--rotate hadamard): streamed, layer by layer into a hidden float32 checkpoint (the first layer peak includes that whole pass); resident, in memory. ' if args.rotate else ''}"
             f"Output: {OUTPUTS.get(args.to, f'a {args.to} checkpoint folder, written by its exporter from the parts')}. "
             "Synthetic LLaMA checkpoints, bf16, "
             "random weights (N(0, 0.02)), vocab 49152 (SmolLM2's tokenizer), untied head; 7B layer shapes unless "
             f"the width says otherwise. {meta['scheme']}; {meta['calibration']}. {meta['cores']} cores, shared with "
             "other work (seconds are indicative; RSS is not affected). Peak RSS: the run process's own VmHWM, "
             "which includes ~0.4-0.5 GB of Python, torch and transformers.", "",
             "Layer peaks: each decoder layer's own peak RSS (the high-water mark reset as its part is written); "
             "the first layer's includes reading the calibration data through the embedding.", "",
             "| method | layers | hidden | checkpoint GB | mode | peak RSS GB | RSS / checkpoint | layer peaks GB: first / later (min-max) | seconds | same bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        same = r.get("same_bytes_as_resident")
        lines.append(f"| {r['method']} | {r['layers']} | {r['hidden']} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['mode']} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['rss_over_checkpoint']:.0%} | {_layer_peaks(r)} | {r['wall_seconds']:.0f} | "
                     f"{'-' if same is None else ('yes' if same else 'NO')} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
