"""Benchmark: fuzz the readers of files that come from strangers — safetensors, config JSON,
GGUF, YAML recipes, a sharded checkpoint's index — with seeded mutations (bytes flipped mostly
in the header, truncations, garbage spliced in). Every case must pass or raise lowbit's own
error (one line for the user); anything else is a crash. Each case's time is recorded (a hang
shows as a maximum), and so is the process's peak memory (a size read from a header and
allocated would show there).

    python bench/fuzz_readers.py                 # 10^5 cases (20,000 per reader)
    python bench/fuzz_readers.py --cases 2000    # a quick look
Writes bench/results/fuzz_readers.{json,md}. The test suite runs the same loop on a small sample.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def mutations(data: bytes, rng: random.Random, n: int):
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(3)
        if kind == 0:                                   # flip bytes, mostly in the header region
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(min(len(b), 4096))] = rng.randrange(256)
        elif kind == 1:                                 # truncate anywhere
            b = b[: rng.randrange(len(b))]
        else:                                           # splice in garbage
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        yield bytes(b)


def make_inputs(folder: Path) -> dict[str, Path]:
    """Small real files of each kind (a tiny LLaMA's weights and config, a GGUF, a recipe, an index)."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model_dir = folder / "model"
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(model_dir, max_shard_size="40KB")
    w = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_token_scores([0.0] * 100)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((100, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.random.default_rng(1).standard_normal((32, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (folder / "recipe.yaml").write_text("method: gptq\nscheme:\n  format: int\n  bits: 4\n  group_size: 128\n"
                                        "calibration: {samples: 16, seqlen: 256}\nignore: [lm_head]\n"
                                        "groups:\n  - targets: ['down_proj']\n    scheme: {bits: 8, group_size: -1}\n")
    shard = sorted(model_dir.glob("model-*.safetensors"))[0]
    return {"safetensors": shard, "config": model_dir / "config.json", "gguf": folder / "tiny.gguf",
            "recipe": folder / "recipe.yaml", "index": model_dir / "model.safetensors.index.json"}


def readers(inputs: dict[str, Path]):
    from lowbit.model.files import check_gguf, check_json, check_safetensors
    from lowbit.model.lazy import CheckpointWeights
    from lowbit.plan import load_recipe

    return {"safetensors": check_safetensors, "config": check_json, "gguf": check_gguf, "recipe": load_recipe,
            "index": lambda p: CheckpointWeights(p.parent)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000, help="in all, split evenly over the readers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from lowbit.errors import LowbitError

    work = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    try:
        inputs = make_inputs(work)
        check = readers(inputs)
        per = args.cases // len(inputs)
        rows, crashes = [], []
        for kind, src in inputs.items():
            rng = random.Random(f"{args.seed}-{kind}")
            original = src.read_bytes()
            out = {"reader": kind, "cases": 0, "passed": 0, "refused": 0, "crashed": 0, "max_ms": 0.0}
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t_all = time.perf_counter()
            for data in mutations(original, rng, per):
                src.write_bytes(data)
                t0 = time.perf_counter()
                try:
                    check[kind](src)
                    out["passed"] += 1
                except LowbitError:
                    out["refused"] += 1
                except Exception as e:   # noqa: BLE001 -- what the benchmark looks for
                    out["crashed"] += 1
                    if len(crashes) < 20:
                        crashes.append({"reader": kind, "error": f"{type(e).__name__}: {e}"[:300],
                                        "where": traceback.format_exc().splitlines()[-3][:300]})
                out["max_ms"] = max(out["max_ms"], (time.perf_counter() - t0) * 1000)
                out["cases"] += 1
            src.write_bytes(original)
            out["seconds"] = time.perf_counter() - t_all
            out["peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
            rows.append(out)
            print(json.dumps(out), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = ROOT / "bench" / "results"
    (results / "fuzz_readers.json").write_text(json.dumps({"seed": args.seed, "rows": rows, "crashes": crashes}, indent=1))
    lines = ["# Fuzzed readers of untrusted files", "",
             f"`python bench/fuzz_readers.py --cases {args.cases}`, seed {args.seed}. Seeded mutations of small real "
             "files (bytes flipped mostly in the first 4 KiB, truncation anywhere, 1-64 garbage bytes spliced in). "
             "Refused = lowbit's own one-line error; crashed = any other exception. Peak RSS growth: the process's "
             "high-water mark while that reader ran (a header's claimed size allocated would show here).", "",
             "| reader | cases | passed | refused | crashed | slowest case ms | peak RSS growth MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['reader']} | {r['cases']} | {r['passed']} | {r['refused']} | {r['crashed']} | "
                     f"{r['max_ms']:.1f} | {r['peak_rss_growth_mb']:.1f} |")
    if crashes:
        lines += ["", "Crashes (first 20):", ""] + [f"- {c['reader']}: {c['error']} ({c['where']})" for c in crashes]
    (results / "fuzz_readers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
