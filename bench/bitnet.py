"""Benchmark: BitNet b1.58 trained from scratch beside the same model in FP32.

A small LLaMA (the embedded default's tokenizer) from one random initialisation, trained twice
on WikiText-2 validation windows -- ternary weights (per-tensor absmean) with 8-bit per-token
inputs and straight-through gradients, and plain FP32 -- with the same batches, AdamW and
schedule (lowbit.train.bitnet.run_bitnet, what `lowbit bitnet-train` runs). Held-out loss on
WikiText-2 test windows; the ternary weights also leave as a TQ2_0 GGUF that llama.cpp scores.

    python bench/bitnet.py                  # 4 layers x 256, 400 steps x 256 tokens
    python bench/bitnet.py --steps 1000 --layers 6

Writes bench/results/bitnet.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"


def llama_cpp_loss(path: Path, windows: torch.Tensor) -> float | None:
    """Mean next-token loss llama.cpp computes on the windows (None if llama-cpp-python is absent)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          verbose=False)
    total, n = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32))
        total += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    args = ap.parse_args()

    from lowbit.data import token_windows
    from lowbit.export.gguf import write_gguf
    from lowbit.model.load import load_source
    from lowbit.train.bitnet import TinyLlama, run_bitnet, without_input_quant
    from lowbit.train.loop import Schedule, training_windows

    tokenizer = load_source(None).tokenizer
    windows = training_windows(tokenizer, (WIKI / "valid.txt").read_text(), args.ctx, 1)
    held_out = token_windows(tokenizer, (WIKI / "test.txt").read_text(), args.ctx, 8)
    shape = TinyLlama(args.layers, args.hidden, args.intermediate, args.heads, args.heads, args.ctx)
    res = run_bitnet(tokenizer, windows, held_out, shape, Schedule(args.steps, args.lr), progress=False)
    import dataclasses

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = write_gguf(without_input_quant(res.qm), Path(tmp) / "bitnet.gguf")
        gguf_bytes = gguf_path.stat().st_size
        cpp_loss = llama_cpp_loss(gguf_path, held_out)
    every = max(1, args.steps // 10)
    meta = {"shape": dataclasses.asdict(shape), "steps": args.steps, "lr": args.lr, "train": "WikiText-2 validation",
            "held_out": "WikiText-2 test, 8 windows", "machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__}
    out = ROOT / "bench" / "results"
    result = {"meta": meta, "losses": res.losses, "held_out_loss": res.eval_loss, "seconds": res.seconds,
              "bits_per_weight": res.qm.bits_per_weight, "gguf_tq2_0_bytes": gguf_bytes,
              "llama_cpp_held_out_loss": cpp_loss}
    (out / "bitnet.json").write_text(json.dumps(result, indent=1))
    lines = [f"# BitNet b1.58 from scratch vs FP32 ({args.layers} layers x {args.hidden}, vocabulary of SmolLM2's tokenizer)",
             "", f"{args.steps} steps x 1 window of {args.ctx} tokens of WikiText-2 validation, AdamW lr {args.lr} (5% "
             "warm-up, cosine), the same initial weights and batches for both. Ternary: every decoder Linear with "
             "per-tensor absmean ternary weights and 8-bit per-token inputs (STE); embeddings and norms in fp32. "
             "Held-out: next-token loss on 8 windows of WikiText-2 test.", "",
             "| step | train loss ternary | train loss FP32 |", "|---|---|---|"]
    for i in range(args.steps):
        if (i + 1) % every == 0 or i == 0:
            lines.append(f"| {i + 1} | {res.losses['ternary'][i]:.4f} | {res.losses['fp32'][i]:.4f} |")
    lines += ["", "| model | held-out loss | held-out PPL | bits/weight (decoder Linears) | train s |", "|---|---|---|---|---|"]
    for kind in ("ternary", "fp32"):
        loss = res.eval_loss[kind]
        bpw = f"{res.qm.bits_per_weight:.2f}" if kind == "ternary" else "32"
        lines.append(f"| {kind} | {loss:.4f} | {torch.tensor(loss).exp():.1f} | {bpw} | {res.seconds[kind]:.0f} |")
    if cpp_loss is not None:
        lines.append(f"| ternary as GGUF TQ2_0 in llama.cpp (its own Q8_K inputs) | {cpp_loss:.4f} | "
                     f"{torch.tensor(cpp_loss).exp():.1f} | file {gguf_bytes / 1e6:.1f} MB (embeddings F32) | - |")
    (out / "bitnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
