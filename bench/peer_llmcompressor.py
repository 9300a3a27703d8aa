"""Peer comparison: llm-compressor's GPTQ (oneshot) against lowbit's GPTQ, same setup.

Runs in its own environment (llm-compressor pins other torch/transformers versions than lowbit):

    python3 -m venv /work/peervenv
    /work/peervenv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /work/peervenv/bin/pip install llmcompressor -c <(echo torch==2.13.0+cpu)

The token windows come from lowbit itself (so both libraries see identical tokens); make them
with lowbit's venv first:

    CalibrationConfig(text=shared/data/wikitext2/valid.txt, samples=128, seqlen=512, seed=0).windows(tok)
        -> /tmp/peer_calib.safetensors   {"input_ids": (128, 512)}
    token_windows(tok, shared/data/wikitext2/test.txt, 512, 16)
        -> /tmp/peer_eval.safetensors    {"input_ids": (16, 512)}

then

    /work/peervenv/bin/python bench/peer_llmcompressor.py [--samples 8 --out-name peer_smoke]

Scheme: lowbit's "int4 g32 asym" (integer zero point, minmax), GPTQ with act-order + static
groups, damp 0.01, block 128, layer-sequential calibration with quantized layers' outputs fed
forward; Linear layers only, lm_head and embeddings kept. Evaluation reimplements
lowbit.eval.divergence (PPL, mean KL(ref || cand) per token, p99 KL, top-1 agreement).

Writes bench/results/peer_llmcompressor.json and .md (with lowbit's GPTQ row and the ratios
when bench/results/methods.json exists).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "results"
CACHE_GLOB = str(Path.home() / ".cache" / "lowbit" / "gguf-SmolLM2-135M-Instruct.Q4_1-*")
LOWBIT_SCHEME = "int4 g32 asym"


def load_windows(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["input_ids"].long()


def load_model(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    model.eval()
    return model


# -- evaluation: the formulas of lowbit.eval.divergence -----------------------------------------

@torch.no_grad()
def window_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    logits = model(window.unsqueeze(0)).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def run_reference(model, windows: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    lps, nll_sum, count = [], 0.0, 0
    for w in windows:
        lp = window_logprobs(model, w)
        nll_sum += float(-lp.gather(1, w[1:, None]).sum())
        count += w.numel() - 1
        lps.append(lp)
    return lps, nll_sum / count


@torch.no_grad()
def compare(candidate, windows: torch.Tensor, ref_lps: list[torch.Tensor], ref_nll: float) -> dict:
    nll_sum, count, agree = 0.0, 0, 0
    klds = []
    for w, ref_lp in zip(windows, ref_lps):
        lp = window_logprobs(candidate, w)
        nll_sum += float(-lp.gather(1, w[1:, None]).sum())
        count += w.numel() - 1
        klds.append((ref_lp.exp() * (ref_lp - lp)).sum(dim=-1).clamp_min(0))
        agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
    kl = torch.cat(klds)
    return {"ppl": math.exp(nll_sum / count), "ref_ppl": math.exp(ref_nll), "kld": float(kl.mean()),
            "kld_p99": float(torch.quantile(kl.double(), 0.99)), "top1": agree / count, "n_tokens": count}


# -- checks on the quantized model ---------------------------------------------------------------

@torch.no_grad()
def grid_check(model) -> dict:
    """Do the Linear weights lie on their int4 group grid (codes 0..15, 32 columns per group)?"""
    worst_frac, worst_range, n, skipped, g = 0.0, (10**9, -10**9), 0, [], None
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or not hasattr(m, "weight_scale"):
            if isinstance(m, torch.nn.Linear):
                skipped.append(name)
            continue
        W, s = m.weight.float(), m.weight_scale.float()
        zp = getattr(m, "weight_zero_point", torch.zeros_like(s)).float()
        g = W.shape[1] // s.shape[1]
        q = W / s.repeat_interleave(g, dim=1) + zp.repeat_interleave(g, dim=1)
        worst_frac = max(worst_frac, float((q - q.round()).abs().max()))
        worst_range = (min(worst_range[0], int(q.round().min())), max(worst_range[1], int(q.round().max())))
        n += 1
    return {"quantized_linears": n, "group_size_seen": g if n else None, "max_distance_from_grid": worst_frac,
            "code_range": list(worst_range), "linears_without_scale": skipped}


# -- lowbit's row ---------------------------------------------------------------------------------

_LOWBIT_KEYS = ("ppl", "ref_ppl", "kld", "kld_p99", "top1", "seconds_quantize", "peak_rss_mb", "bits_per_weight")


def lowbit_rows(rerun: str | None) -> dict[str, dict]:
    """lowbit's GPTQ int4 g32 asym: from bench/results/methods.json, and from a back-to-back rerun
    (the RESULT lines that `bench/methods.py --worker` prints for fp_forward and this gptq config)."""
    rows = {}
    path = OUT_DIR / "methods.json"
    if path.exists():
        data = json.loads(path.read_text())
        row = next((r for r in data["rows"] if r.get("method") == "gptq" and r.get("scheme") == LOWBIT_SCHEME), None)
        if row is not None and "ppl" in row:
            rows["methods_json"] = {**{k: row.get(k) for k in _LOWBIT_KEYS},
                                    "fp_forward_seconds": data["meta"]["fp_forward_seconds"],
                                    "source": "bench/results/methods.json"}
    if rerun:
        got = [json.loads(l[7:]) for l in Path(rerun).read_text().splitlines() if l.startswith("RESULT ")]
        fp = next(r for r in got if r["method"] == "fp_forward")
        row = next(r for r in got if r["method"] == "gptq" and r.get("scheme") == LOWBIT_SCHEME)
        rows["rerun"] = {**{k: row.get(k) for k in _LOWBIT_KEYS}, "fp_forward_seconds": fp["seconds"],
                         "stage_seconds": row.get("stage_seconds"),
                         "source": "bench/methods.py --worker (fp_forward, gptq int4 g32 asym), run right after "
                                   "this script on the same idle machine"}
    for r in rows.values():
        r["quantize_over_fp_forward"] = r["seconds_quantize"] / r["fp_forward_seconds"]
    return rows


def attach_lowbit(result: dict, rerun: str | None) -> None:
    """lowbit's rows and the ratios peer / lowbit (timings against the rerun when there is one)."""
    result.pop("lowbit_gptq", None), result.pop("ratios_peer_over_lowbit", None)
    rows = lowbit_rows(rerun)
    if not rows or "error" in result:
        return
    result["lowbit_gptq"] = rows
    lb = rows.get("rerun") or rows["methods_json"]
    result["ratios_peer_over_lowbit"] = {
        "against": "rerun" if "rerun" in rows else "methods_json",
        "ppl": result["ppl"] / lb["ppl"], "kld": result["kld"] / lb["kld"], "top1": result["top1"] / lb["top1"],
        "quantize_seconds": result["oneshot_seconds"] / lb["seconds_quantize"],
        "fp_forward_seconds": result["fp_forward_seconds"] / lb["fp_forward_seconds"],
        "quantize_over_fp_forward": result["oneshot_over_fp_forward"] / lb["quantize_over_fp_forward"],
    }


def write(result: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{name}.md").write_text(markdown(result) + "\n")
    print(markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", default="/tmp/peer_calib.safetensors")
    ap.add_argument("--eval", default="/tmp/peer_eval.safetensors")
    ap.add_argument("--model", default=None, help="HF folder (default: lowbit's converted GGUF cache)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (of the 128 saved)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch (lowbit: 8)")
    ap.add_argument("--out-name", default="peer_llmcompressor")
    ap.add_argument("--out-dir", default=str(OUT_DIR), help="where the JSON/markdown go")
    ap.add_argument("--lowbit-rerun", help="file with the RESULT lines of `bench/methods.py --worker` for "
                                           "fp_forward and gptq int4 g32 asym, run on the same idle machine")
    ap.add_argument("--render", help="no run: re-render this result JSON (e.g. with --lowbit-rerun)")
    args = ap.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        attach_lowbit(result, args.lowbit_rerun)
        write(result, Path(args.out_dir), args.out_name)
        return

    folder = args.model or sorted(glob.glob(CACHE_GLOB))[0]
    calib = load_windows(args.calib)[: args.samples]
    windows = load_windows(args.eval)[: args.eval_windows]
    torch.manual_seed(0)

    import compressed_tensors
    import llmcompressor
    import transformers

    meta = {"model": "SmolLM2-135M-Instruct (embedded default, lowbit's converted GGUF folder)", "model_folder": folder,
            "eval": f"WikiText-2 test, {windows.shape[0]} x {windows.shape[1]} tokens (lowbit.data.token_windows)",
            "calibration": f"WikiText-2 validation, {calib.shape[0]} x {calib.shape[1]} tokens "
                           "(lowbit CalibrationConfig seed 0 windows)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                         "python": sys.version.split()[0]},
            "machine": f"{os.cpu_count()} CPU cores", "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": os.getloadavg()}
    recipe_desc = {"scheme": "weights int4, strategy group, group_size 32, symmetric False, observer minmax",
                   "targets": ["Linear"], "ignore": ["lm_head"], "actorder": None, "dampening_frac": 0.01,
                   "block_size": 128, "num_calibration_samples": calib.shape[0], "max_seq_length": calib.shape[1],
                   "batch_size": args.batch_size, "pipeline": "independent (-> sequential), quantization-aware calibration",
                   "shuffle_calibration_samples": False}
    result: dict = {"meta": meta, "recipe": recipe_desc}

    # reference: a fresh unquantized load, evaluated first (as bench/methods.py does)
    ref_model = load_model(folder)
    t0 = time.perf_counter()
    ref_lps, ref_nll = run_reference(ref_model, windows)
    result["seconds_reference_eval"] = time.perf_counter() - t0
    # one full-precision forward over the calibration windows, batches of 8 (bench/methods.py's fp_forward)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, calib.shape[0], 8):
            ref_model(calib[i: i + 8], use_cache=False)
    fp_seconds = time.perf_counter() - t0
    result["fp_forward_seconds"] = fp_seconds
    del ref_model
    print(f"reference PPL {math.exp(ref_nll):.3f}; fp forward over {calib.shape[0]} windows {fp_seconds:.1f} s", flush=True)

    try:
        from compressed_tensors.quantization import ActivationOrdering, QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier

        # "static" is an alias of "weight": groups fitted up front, columns in decreasing-H order
        actorder = "static" if hasattr(ActivationOrdering, "STATIC") else "weight"
        recipe_desc["actorder"] = actorder
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False,
                                   observer="minmax", actorder=actorder)
        recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                              ignore=["lm_head"], dampening_frac=0.01, block_size=128)
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        model = load_model(folder)
        seen: list[torch.Tensor] = []   # the token ids llm-compressor actually feeds (checked below)
        hook = model.get_input_embeddings().register_forward_pre_hook(
            lambda _m, a: seen.append(a[0].detach().clone()) if a[0].device.type != "meta" else None)
        t0 = time.perf_counter()
        model = oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
                        max_seq_length=calib.shape[1], batch_size=args.batch_size, shuffle_calibration_samples=False,
                        pipeline="independent") or model
        oneshot_seconds = time.perf_counter() - t0
        hook.remove()
        model.eval()
        fed = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]) if seen else torch.empty(0, 0, dtype=torch.long)
        result["calibration_fed"] = {"batches": len(seen), "shape": list(fed.shape),
                                     # the first subgraph (with the embedding) runs twice per batch:
                                     # calibrate, then propagate with the quantized layer
                                     "every_window_fed": all(any(torch.equal(c, f) for f in fed) for c in calib),
                                     "only_calibration_windows": all(any(torch.equal(c, f) for c in calib) for f in fed)}
        result["oneshot_seconds"] = oneshot_seconds
        result["oneshot_over_fp_forward"] = oneshot_seconds / fp_seconds
        print(f"oneshot {oneshot_seconds:.1f} s ({oneshot_seconds / fp_seconds:.2f} x fp forward)", flush=True)
        result["grid_check"] = grid_check(model)
        t0 = time.perf_counter()
        result.update(compare(model, windows, ref_lps, ref_nll))
        result["seconds_candidate_eval"] = time.perf_counter() - t0
    except Exception as e:  # record llm-compressor's failure instead of dying
        traceback.print_exc()
        result["error"] = (traceback.format_exception_only(type(e), e)[-1]).strip()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta["loadavg_at_end"] = os.getloadavg()   # timings are only comparable on an otherwise idle machine

    attach_lowbit(result, args.lowbit_rerun)
    write(result, Path(args.out_dir), args.out_name)


def markdown(r: dict) -> str:
    m = r["meta"]
    v = m["versions"]
    lines = [f"# llm-compressor GPTQ vs lowbit GPTQ on {m['model'].split(' (')[0]}", "",
             f"Eval: {m['eval']}. Calibration: {m['calibration']}. Scheme: int4 g32 asymmetric (minmax), "
             f"act-order {r['recipe'].get('actorder')} (static groups), damp 0.01, Linear layers except lm_head.", "",
             f"llm-compressor {v['llmcompressor']} (compressed-tensors {v['compressed_tensors']}, transformers "
             f"{v['transformers']}, torch {v['torch']}), {m['machine']}, {m['torch_threads']} torch threads.", ""]
    if "error" in r:
        lines += [f"llm-compressor failed: `{r['error']}`", "",
                  f"Full-precision forward over the calibration windows: {r['fp_forward_seconds']:.1f} s."]
        return "\n".join(lines)
    lines += ["| | PPL | ref PPL | KLD | KLD p99 | top-1 | quantize s | fp forward s | × fp forward | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| llm-compressor GPTQ | {r['ppl']:.3f} | {r['ref_ppl']:.3f} | {r['kld']:.4f} | {r['kld_p99']:.4f} | "
              f"{r['top1']:.3f} | {r['oneshot_seconds']:.1f} | {r['fp_forward_seconds']:.1f} | {r['oneshot_over_fp_forward']:.2f} | "
              f"{r['peak_rss_mb']:.0f} |"]
    rows = r.get("lowbit_gptq") or {}
    labels = {"rerun": "lowbit GPTQ (rerun, same idle machine)", "methods_json": "lowbit GPTQ (bench/results/methods.json)"}
    for key in ("rerun", "methods_json"):
        lb = rows.get(key)
        if lb:
            lines.append(f"| {labels[key]} | {lb['ppl']:.3f} | {lb['ref_ppl']:.3f} | {lb['kld']:.4f} | {lb['kld_p99']:.4f} | "
                         f"{lb['top1']:.3f} | {lb['seconds_quantize']:.1f} | {lb['fp_forward_seconds']:.1f} | "
                         f"{lb['quantize_over_fp_forward']:.2f} | {lb['peak_rss_mb']:.0f} |")
    if rows:
        q = r["ratios_peer_over_lowbit"]
        lines.append(f"| ratio llm-compressor / lowbit ({q['against']}) | {q['ppl']:.3f} | | {q['kld']:.3f} | | {q['top1']:.3f} | "
                     f"{q['quantize_seconds']:.2f} | {q['fp_forward_seconds']:.2f} | {q['quantize_over_fp_forward']:.2f} | |")
        lines += ["", "Timings are only comparable between runs on an otherwise idle machine (2 cores: any other "
                  "process slows torch's threaded kernels far more than its share); the rerun row was timed right "
                  "after this run with nothing else running. Each \"× fp forward\" divides by the same process's "
                  "own full-precision forward over the 128 calibration windows (batches of 8)."]
    else:
        lines.append("\n(lowbit's row: bench/results/methods.json not found; run bench/methods.py first)")
    if "grid_check" in r:
        g = r["grid_check"]
        lines.append(f"\nCheck: {g['quantized_linears']} Linear weights on their int4 grid (codes {g['code_range']}, "
                     f"max distance {g['max_distance_from_grid']:.1e}); calibration fed every one of lowbit's "
                     f"{r['recipe']['num_calibration_samples']} windows: {r.get('calibration_fed', {}).get('every_window_fed')}.")
    lines.append("\nDifferences from lowbit's setup: compressed-tensors' minmax widens each group's range to include 0 "
                 "(lowbit's uses the group's own min and max); llm-compressor runs in its own venv (transformers "
                 f"{v['transformers']}; lowbit's venv has its own); llm-compressor's sequential pipeline runs each "
                 "decoder layer twice per batch (collect Hessians with the layer in full precision, quantize all its "
                 "Linears, then propagate), while lowbit's GPTQ runs each layer once, staged: it pauses before each "
                 "group of Linears sharing an input (q/k/v, o, gate/up, down) and quantizes it, so o_proj and the "
                 "MLP's Hessians already see the quantized attention. Peak RSS of both includes "
                 "the reference log-probabilities kept for the KLD (16 x 511 x 49152 floats, 1.6 GB).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
