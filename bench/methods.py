"""Benchmark: every method at several schemes on the embedded default, side by side.

Each configuration runs in its own subprocess (so peak RSS is its own), on the same calibration
windows and the same evaluation windows; the full-precision forward pass over the calibration
tokens is timed in the same run, so GPTQ's cost is reported as a ratio to it.

    python bench/methods.py                 # full: 128 x 512 calibration tokens, 16 x 512 eval
    python bench/methods.py --quick         # 32 calibration windows, 8 eval windows
    python bench/methods.py --only gptq --scheme "int4 g32 asym" --hessian-precision fp32 bf16
    python bench/methods.py --quick --rows activations   # activation and budget rows -> activations.{json,md}
    python bench/methods.py --rows rotation      # rotated rows beside unrotated, LLM.int8 -> rotation.{json,md}
    python bench/methods.py --rows sparsity      # 2:4 SparseGPT / Wanda + INT4, rotated W4A8 -> sparsity.{json,md}
    python bench/methods.py --quick --rows sparsity codebooks   # both sets, one table -> sparsity_codebooks.{json,md}
    python bench/methods.py --rows rotation --calib default --name rotation_genre   # calibrated on another genre

Writes bench/results/methods.json and bench/results/methods.md (a subset: methods_<names>.*).
With --hessian-precision each selected row runs once per Hessian precision, and the results go
to bench/results/hessian_precision.{json,md}, which name the CPU and the bf16 path it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    # activations quantized too (the preset's activation spec is named in the row)
    ("rtn", dict(preset="W8A8"), {}),
    ("smoothquant", dict(preset="W8A8"), {}),
    ("smoothquant", dict(preset="W8A8"), {"alpha_grid": 10}),
    ("smoothquant", dict(preset="W8A8"), {"rounding": "gptq"}),
    ("gptq", dict(preset="W8A8"), {}),
    ("rtn", dict(preset="W8A8_STATIC"), {}),
    ("rtn", dict(preset="W8A16"), {}),                                   # weight-only baselines of
    ("rtn", dict(format="fp8_e4m3", bits=None, group_size=-1), {}),      # the W8A8 / FP8 rows
    ("rtn", dict(preset="FP8_DYNAMIC"), {}),
    ("gptq", dict(preset="FP8_DYNAMIC"), {}),
    ("smoothquant", dict(preset="FP8_DYNAMIC"), {}),
    ("gptq", dict(preset="W4A8"), {}),
    ("rtn", dict(preset="NVFP4"), {}),
    ("gptq", dict(preset="NVFP4"), {}),
    # mixed precision: each tensor's scheme chosen under a bits-per-weight budget (Fisher-priced
    # RTN error, int2..int8 at g32/g64/g128 sym), against uniform int4 g64 sym at the same 4.25
    ("gptq", dict(format="int", bits=4, group_size=64, symmetric=True, target_bpw=4.25), {}),
    # rotations (QuaRot R1 + R2, randomized Hadamard) before the method
    ("rtn", dict(format="int", bits=3, group_size=32, symmetric=False, rotate="hadamard"), {}),
    ("gptq", dict(format="int", bits=4, group_size=32, symmetric=False, rotate="hadamard"), {}),
    ("gptq", dict(format="int", bits=3, group_size=32, symmetric=False, rotate="hadamard"), {}),
    ("gptq", dict(format="int", bits=3, group_size=32, symmetric=False, observer="mse", rotate="hadamard"), {}),
    ("gptq", dict(format="int", bits=2, group_size=32, symmetric=False), {}),
    ("gptq", dict(format="int", bits=2, group_size=32, symmetric=False, rotate="hadamard"), {}),
    ("gptq", dict(format="int", bits=2, group_size=32, symmetric=False, observer="mse"), {}),
    ("gptq", dict(format="int", bits=2, group_size=32, symmetric=False, observer="mse", rotate="hadamard"), {}),
    ("llm_int8", dict(preset="LLM_INT8"), {}),
    ("gptq", dict(preset="W4A16"), {}),
    ("gptq", dict(preset="W4A16", rotate="hadamard"), {}),
    ("gptq", dict(preset="W4A8", rotate="hadamard"), {}),
    # 2:4 sparsity with INT4 on the survivors, against the same INT4 dense
    ("rtn", dict(format="int", bits=4, group_size=32, symmetric=True), {}),
    ("gptq", dict(format="int", bits=4, group_size=32, symmetric=True), {}),
    ("wanda", dict(format="int", bits=4, group_size=32, symmetric=True), {"sparsity": "2:4"}),
    ("sparsegpt", dict(format="int", bits=4, group_size=32, symmetric=True), {"sparsity": "2:4"}),
    ("sparsegpt", dict(format="int", bits=8, group_size=-1, symmetric=True), {"sparsity": "2:4"}),
    ("aqlm", dict(format="aqlm_2x8", bits=None, group_size=-1), {}),
    ("rtn", dict(format="aqlm_2x8", bits=None, group_size=-1), {}),
    # QuIP#-style E8P lattice at 2 bits, beside GPTQ's int2 with the same storage per row
    ("quip", dict(format="e8p", bits=None, group_size=-1), {}),
    ("quip", dict(format="e8p", bits=None, group_size=-1, rotate="hadamard"), {}),
    ("rtn", dict(format="e8p", bits=None, group_size=-1), {}),
    ("gptq", dict(format="int", bits=2, group_size=-1, symmetric=False, observer="mse"), {}),
]


# `--rows activations`: the activation-quantization and budget rows with their weight-only baseline
ACTIVATION_ROWS = [
    "rtn|W8A8: int8 per-channel sym, inputs int8 per-token dynamic",
    "smoothquant|W8A8: int8 per-channel sym, inputs int8 per-token dynamic",
    "smoothquant+gptq|W8A8: int8 per-channel sym, inputs int8 per-token dynamic",
    "gptq|W8A8: int8 per-channel sym, inputs int8 per-token dynamic",
    "rtn|W8A16: int8 per-channel sym",
    "rtn|fp8_e4m3 per-channel",
    "rtn|FP8_DYNAMIC: fp8_e4m3 per-channel, inputs fp8_e4m3 per-token dynamic",
    "gptq|FP8_DYNAMIC: fp8_e4m3 per-channel, inputs fp8_e4m3 per-token dynamic",
    "gptq|W4A8: int4 g128 sym, inputs int8 per-token dynamic",
    "gptq|NVFP4: nvfp4 g16, inputs nvfp4 block16 static global (minmax)",
    "gptq|int4 g64 sym",
    "gptq|budget --target-bpw 4.25 (int2..int8 g32/g64/g128 sym)",
]

# `--rows sparsity`: 2:4 pruning (+ INT4 / INT8 on the survivors) beside the dense rows; W4A8 rotated
SPARSITY_ROWS = [
    "rtn|int4 g32 sym", "gptq|int4 g32 sym", "wanda+sparsity=2:4|int4 g32 sym", "sparsegpt+sparsity=2:4|int4 g32 sym",
    "gptq|W4A16: int4 g128 sym", "gptq|W4A8: int4 g128 sym, inputs int8 per-token dynamic",
    "gptq|W4A8: int4 g128 sym, inputs int8 per-token dynamic rotated",
]

# `--rows codebooks`: 2-bit AQLM-style additive codebooks beside 2-bit GPTQ
CODEBOOK_ROWS = ["aqlm|aqlm_2x8 per-channel", "rtn|aqlm_2x8 per-channel", "gptq|int2 g32 asym"]

# `--rows lattice`: QuIP#-style E8P (incoherence + BlockLDLQ) beside its own nearest rounding and 2-bit GPTQ
LATTICE_ROWS = ["quip|e8p per-channel", "quip|e8p per-channel rotated", "rtn|e8p per-channel",
                "gptq|int2 per-channel asym mse", "gptq|int2 g32 asym", "gptq|int2 g32 asym rotated"]

# `--rows rotation`: rotated rows beside the same rows unrotated, and LLM.int8 beside W8A8
ROTATION_ROWS = [
    "rtn|int3 g32 asym", "rtn|int3 g32 asym rotated",
    "gptq|int4 g32 asym", "gptq|int4 g32 asym rotated", "rtn|int4 g32 asym",
    "gptq|int3 g32 asym", "gptq|int3 g32 asym rotated",
    "gptq|int3 g32 asym mse", "gptq|int3 g32 asym mse rotated",
    "gptq|int2 g32 asym", "gptq|int2 g32 asym rotated",
    "gptq|int2 g32 asym mse", "gptq|int2 g32 asym mse rotated",
    "rtn|W8A8: int8 per-channel sym, inputs int8 per-token dynamic",
    "llm_int8|LLM_INT8: int8 per-channel sym, inputs int8 per-token dynamic, columns reaching 6 in full precision",
]


# paragraphs the tables of a row set carry above their rows (the caveats stand with the numbers)
ROW_SET_NOTES = {
    "sparsity": [
        "2:4 rows: two of every four consecutive input weights of every quantized Linear are zero (SparseGPT: "
        "pruned inside the GPTQ solver, the rest compensating; Wanda: |W|·‖X‖ scores, no update). bits/weight "
        "counts the stored codes and scales, zeros included: lowbit's formats and compressed-tensors' dense "
        "sparsity record store them densely, and no CPU kernel here skips them, so 2:4 costs quality and buys no "
        "size or speed on this machine (sparse tensor-core kernels on a GPU are where it pays).", "",
        "W4A16 / W4A8 rows: int4 g128 sym (576 columns: four groups of 128 and one of 64); rotated rows as in "
        "rotation.md.", ""],
    "codebooks": [
        "aqlm_2x8 rows: every 8 weights are two 8-bit codes into two codebooks of 256 vectors per tensor (fp16, "
        "counted in bits/weight with the fp16 row scales). aqlm: k-means initialised, codes by coordinate descent "
        "under the Hessian's diagonal, codebooks and scales by Adam on the layer's output error (methods/aqlm.py; "
        "AQLM's full beam search and end-to-end fine-tuning are not done); rtn: the format's own k-means and "
        "nearest codes, no calibration.", ""],
    "lattice": [
        "e8p rows: every 8 weights of the incoherent W̃ = Uᵀ W V (seeded random-sign Hadamards; 576 = 16 · Paley "
        "36, 1536 = 128 · Paley 12) are one 16-bit word into QuIP#'s E8P codebook (2^16 points of E8 + 1/4), times "
        "an fp16 scale per row; bits/weight counts codes, scales and the two seeds. quip: BlockLDLQ rounding against "
        "the rotated Hessian (methods/quip.py; QuIP#'s fine-tuning is not done); rtn: nearest codewords. int2 "
        "per-channel asym: 2 bits plus an fp16 scale and zero per row, e8p's storage.", ""],
    "rotation": [
        "Rotated rows: norms folded, then a randomized Hadamard on the residual stream (576 = 16 · Paley 36) and "
        "per head on V/O (QuaRot R1 + R2, no online rotations), before the method; logits of the rotated "
        "full-precision model equal the source's (relative change < 1e-5). SmolLM2's head is tied to its "
        "embedding: rotating unties it, so a rotated checkpoint holds one more 49152 × 576 matrix in full "
        "precision (bits/weight counts the quantized decoder weights only, as in every row). SmolLM2's "
        "shipped Q4_1 grid favours unrotated 4-bit rows; rotation removes it.", "",
        "LLM.int8 row: int8 rows (fp16 scales) and int8 per-token inputs with the input columns that reach 6.0 "
        "kept in float (bitsandbytes' load_in_8bit; tests/test_llm_int8.py compares with bitsandbytes).", ""],
}


def row_suffix(options: dict) -> str:
    """How a row's options show in its method column: +gptq (rounding), +alpha_grid=10."""
    return "".join(f"+{k}={v}" if k != "rounding" else f"+{v}" for k, v in options.items())


def make_scheme(s: dict):
    """(scheme for quantize(), budget or None, row label) of a CONFIGS entry."""
    from lowbit import WeightScheme
    from lowbit.scheme import preset

    s = dict(s)
    bpw = s.pop("target_bpw", None)
    rotate = s.pop("rotate", None)
    if "preset" in s:
        scheme, label = s["preset"], f"{s['preset']}: {preset(s['preset']).label()}"
    else:
        ws = WeightScheme(**s)
        scheme, label = ws, ws.label() + (f" {ws.observer}" if ws.observer != "minmax" else "")
    if bpw is not None:
        label = f"budget --target-bpw {bpw} (int2..int8 g32/g64/g128 sym)"
    if rotate is not None:
        label += " rotated"
    return scheme, bpw, label


def run_one(spec: dict) -> dict:
    """Quantize + evaluate one configuration (runs in a subprocess)."""
    import torch

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
    calibration = CalibrationConfig(spec["calib_text"], spec["samples"], spec["seqlen"], 0,
                                    hessian_precision=spec.get("hessian_precision", "fp32"))
    if spec["method"] == "fp_forward":
        cal = calibration.windows(loaded.tokenizer)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, cal.shape[0], calibration.batch_size):
                loaded.model(cal[i: i + calibration.batch_size], use_cache=False)
        return {"method": "fp_forward", "seconds": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    get_method(spec["method"])
    scheme, bpw, label = make_scheme(spec["scheme"])
    import lowbit.calib.runner as runner

    gram = {"seconds": 0.0}
    accumulate_gram = runner.accumulate_gram

    def timed_gram(*args, **kwargs):  # the X^T X products alone (part of the "observe" stage)
        t = time.perf_counter()
        accumulate_gram(*args, **kwargs)
        gram["seconds"] += time.perf_counter() - t

    runner.accumulate_gram = timed_gram
    t0 = time.perf_counter()
    if bpw is None:
        qm = quantize(loaded, scheme, method=spec["method"], calibration=calibration, options=spec["options"],
                      rotate=spec["scheme"].get("rotate"), progress=False)
    else:
        from lowbit.api import make_recipe
        from lowbit.plan import Budget

        qm = quantize(loaded, recipe=make_recipe(scheme, spec["method"], calibration=calibration,
                                                 options=spec["options"], budget=Budget(target_bpw=bpw)), progress=False)
    t_q = time.perf_counter() - t0
    cal = qm.recipe.get("calibration", {})
    res = compare(qm.model, ref, progress=False)
    return {"method": spec["method"] + row_suffix(spec["options"]), "scheme": label,
            "budget": qm.recipe.get("budget", {}).get("counts"),
            "bits_per_weight": qm.bits_per_weight, "ppl": res.ppl, "ref_ppl": res.ref_ppl, "kld": res.kld,
            "kld_p99": res.kld_p99, "top1": res.top1, "seconds_quantize": t_q, "seconds_reference_eval": t_ref,
            "stage_seconds": qm.recipe.get("seconds", {}), "gram_seconds": gram["seconds"],
            "hessian_precision": cal.get("hessian_precision"), "hessian_precision_path": cal.get("hessian_precision_path"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cpu_info() -> dict:
    """The CPU's model name and its bf16 matmul features (Linux: /proc/cpuinfo, as lscpu reads it)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": name, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "amx_tile": "amx_tile" in flags}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="methods to run (default all)")
    ap.add_argument("--scheme", nargs="*", help='scheme labels to run, as in the table ("int4 g32 asym"; default all)')
    ap.add_argument("--hessian-precision", nargs="*", choices=["fp32", "bf16"],
                    help="run each selected row with these Hessian precisions; writes hessian_precision.{json,md}")
    ap.add_argument("--rows", nargs="*", help='rows as "METHOD+OPTIONS|scheme label" (e.g. "gptq|W4A8: ..."); default all')
    ap.add_argument("--name", help="results file name (bench/results/NAME.{json,md}); default methods[_ONLY...]")
    ap.add_argument("--calib", default="wikitext2-valid",
                    help="calibration text: wikitext2-valid (default), 'default' (lowbit's own calibration text, "
                         "the Python reference manual: another genre than the WikiText-2 evaluation) or a file")
    ap.add_argument("--from-log", help="write the tables from the rows an interrupted run printed (its stdout)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sets = {"activations": ACTIVATION_ROWS, "rotation": ROTATION_ROWS, "sparsity": SPARSITY_ROWS,
            "codebooks": CODEBOOK_ROWS, "lattice": LATTICE_ROWS}
    if args.rows and all(r in sets for r in args.rows):   # named row sets: their rows, one table
        args.name = args.name or "_".join(args.rows)
        args.rows = [row for r in args.rows for row in sets[r]]
    if (args.scheme or args.rows) and not args.name and not args.hessian_precision and not args.only:
        raise SystemExit("a --scheme subset needs --name (so it does not overwrite the full table)")
    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(run_one(spec)))
        return

    import torch

    from lowbit.data import token_windows
    from lowbit.model.load import load_source

    samples, n_eval = (32, 8) if args.quick else (128, 16)
    eval_text = (WIKI / "test.txt")
    calib_text = {"wikitext2-valid": WIKI / "valid.txt", "default": None}.get(args.calib, args.calib)
    loaded = load_source(None)
    windows = token_windows(loaded.tokenizer, eval_text.read_text(), 512, n_eval)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    win_file = out_dir / (".eval_windows_quick.pt" if args.quick else ".eval_windows.pt")  # concurrent runs keep theirs
    torch.save(windows, win_file)
    del loaded
    base = {"eval_windows": str(win_file), "calib_text": None if calib_text is None else str(calib_text),
            "samples": samples, "seqlen": 512}
    specs = [{**base, "method": "fp_forward", "scheme": {}, "options": {}}]

    def label(s):
        return make_scheme(s)[2]

    precisions = args.hessian_precision or [None]
    specs += [{**base, "method": m, "scheme": s, "options": o, **({"hessian_precision": p} if p else {})}
              for m, s, o in CONFIGS if (not args.only or m in args.only) and (not args.scheme or label(s) in args.scheme)
              and (not args.rows or f"{m}{row_suffix(o)}|{label(s)}" in args.rows)
              for p in precisions]
    rows = []
    if args.from_log:   # an interrupted run: the rows its log printed, each as it was measured
        rows = [json.loads(line) for line in Path(args.from_log).read_text().splitlines()
                if line.startswith('{"method"')]
        done = {f"{r['method']}|{r.get('scheme')}" for r in rows}
        skipped = [f"{sp['method']}{row_suffix(sp['options'])}|{label(sp['scheme'])}" for sp in specs[1:]
                   if f"{sp['method']}{row_suffix(sp['options'])}|{label(sp['scheme'])}" not in done]
        specs = []
    for spec in specs:
        load_before = os.getloadavg()[0]  # others' work on the machine inflates the seconds
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
        r["loadavg_1m"] = [load_before, os.getloadavg()[0]]
        rows.append(r)
        print(json.dumps(r), flush=True)
    fp = next(r for r in rows if r["method"] == "fp_forward")
    for r in rows:
        if "seconds_quantize" in r:
            r["quantize_over_fp_forward"] = r["seconds_quantize"] / fp["seconds"]
    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "eval": f"WikiText-2 test, {n_eval} x 512 tokens",
            **({"interrupted": {"log": Path(args.from_log).name, "rows_not_run": skipped}} if args.from_log else {}),
            "calibration": f"{ {'wikitext2-valid': 'WikiText-2 validation', 'default': 'lowbit default calibration text (Python reference manual)'}.get(args.calib, args.calib)}, "
                           f"{samples} x 512 tokens (seeded positions)",
            "fp_forward_seconds": fp["seconds"], "machine": f"{os.cpu_count()} CPU cores", "torch_threads": torch.get_num_threads()}
    name = "methods_quick" if args.quick else "methods"
    if args.only:  # a subset never overwrites the full table
        name += "_" + "_".join(args.only)
    if args.name:
        name = args.name
    if args.hessian_precision:
        from lowbit.calib.runner import bf16_gram_path

        name = "hessian_precision" + ("_quick" if args.quick else "")
        meta.update(cpu_info())
        meta["torch"] = torch.__version__
        meta["bf16_gram_path"] = bf16_gram_path()
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Methods on {meta['model']}", "", f"Eval: {meta['eval']}. Calibration: {meta['calibration']}. "
             f"One full-precision forward over the calibration tokens: {fp['seconds']:.1f} s.", "",
             "Note: SmolLM2's shipped weights lie on a Q4_1 grid (4-bit, groups of 32, float min), which W4 g32 "
             "with an integer zero-point cannot express exactly; W3 is where methods separate.", "",
             "Rows named by a preset quantize the inputs of every quantized Linear as the preset says (int8 per token, "
             "FP8 E4M3 per token, NVFP4 with a calibrated global scale, ...); the others are weight-only. "
             "The budget row picks each tensor's scheme under 4.25 bits/weight (scales included); its "
             "counts are in the JSON.", "",
             "Seconds are wall time; others' work on the machine inflates them (the JSON has each row's 1-minute "
             "load average before and after).", "",
             "| method | scheme | bits/weight | PPL | ref PPL | KLD | top-1 | quantize s | × fp forward | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    note = [line for key, text in ROW_SET_NOTES.items() if key in name.split("_") for line in text]
    if args.from_log:
        note += [f"This run was stopped before its last rows ({'; '.join(skipped) or 'none'}); the table holds the "
                 f"rows it finished, from its log (`--from-log`).", ""]
    if note:
        head = next(i for i, line in enumerate(lines) if line.startswith("| method"))
        lines[head:head] = note
    if args.hessian_precision:
        head = next(i for i, line in enumerate(lines) if line.startswith("| method"))
        lines[head:head + 2] = [f"CPU: {meta['cpu']} (avx512_bf16: {meta['avx512_bf16']}, amx_bf16: {meta['amx_bf16']}), "
                      f"torch {meta['torch']}; bf16 Hessians take the `{meta['bf16_gram_path']}` path here. Seconds are wall "
                      "time, inflated by whatever else the machine runs: `load` is the 1-minute load average before and after.", "",
                      "| method | scheme | Hessian | path | PPL | ref PPL | KLD | top-1 | quantize s | × fp forward | XᵀX s | load | peak RSS MB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['scheme']} | failed: {r['error']} |||||||")
        elif "ppl" in r and args.hessian_precision:
            lines.append(f"| {r['method']} | {r['scheme']} | {r['hessian_precision']} | {r['hessian_precision_path']} | "
                         f"{r['ppl']:.3f} | {r['ref_ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.3f} | {r['seconds_quantize']:.1f} | "
                         f"{r['quantize_over_fp_forward']:.2f} | {r['gram_seconds']:.1f} | "
                         f"{'–'.join(f'{x:.1f}' for x in r.get('loadavg_1m', []))} | {r['peak_rss_mb']:.0f} |")
        elif "ppl" in r:
            lines.append(f"| {r['method']} | {r['scheme']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['ref_ppl']:.3f} | "
                         f"{r['kld']:.4f} | {r['top1']:.3f} | {r['seconds_quantize']:.1f} | {r['quantize_over_fp_forward']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
