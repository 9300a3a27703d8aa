"""Inference measurements: resident memory after load, prefill and decode tokens/s.

Each model is measured in its own fresh process (`python -m lowbit.eval.speed WORKER_JSON`), so
its resident memory is its own: RSS is read from /proc after the load (after a garbage
collection and glibc's malloc_trim, done alike for every row), minus the RSS of the same process
just before the load (Python, torch and transformers imported): the bytes the model itself keeps
resident. RSS is read again after one warm-up generation (memory-mapped weights are resident by
then) and that second reading is the row's `model_rss`. Prefill: one forward over the prompt with an empty cache; decode: greedy steps of one
token each through the cache. Every model runs the same prompt tokens with the same number of
threads; results are meant as ratios within one run, never as absolute claims.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

from lowbit import heap


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    heap.trim()   # not glibc: RSS is read as is


def _torch_model(spec: dict):
    """(model, tokenizer, description) for a 'source', 'packed' or 'decoded' row."""
    import torch

    if spec["runtime"] == "source":
        from lowbit.model.load import load_source

        loaded = load_source(spec["path"])
        return loaded.model, loaded.tokenizer, {}
    from lowbit.export.native import load

    qm = load(spec["path"], runtime=spec["runtime"], compute_dtype=getattr(torch, spec.get("compute_dtype", "bfloat16")))
    kernels: dict[str, int] = {}
    for m in qm.model.modules():
        k = getattr(m, "kernel", None)
        if k is not None:
            kernels[k] = kernels.get(k, 0) + 1
    return qm.model, qm.tokenizer, {"kernels": kernels} if kernels else {}


def _measure_torch(spec: dict, prompt: list[int]) -> dict:
    import torch

    torch.manual_seed(0)
    model, _, info = _torch_model(spec)
    return {**info, **measure_model(model, prompt, spec)}


def measure_model(model, prompt: list[int], spec: dict) -> dict:
    """RSS after load and after a warm-up generation, then timed prefill and greedy decode of
    `model` (a transformers causal LM) on `prompt`, with spec's KV cache and torch.compile."""
    import torch
    from transformers import DynamicCache

    _trim()
    rss_after = rss_bytes()
    kv_spec = None
    if spec.get("kv"):
        from lowbit.runtime.kv_cache import KVCacheSpec, make_cache

        kv_spec = KVCacheSpec(**spec["kv"]) if isinstance(spec["kv"], dict) else KVCacheSpec(spec["kv"])
    forward = torch.compile(model.forward, dynamic=True) if spec.get("compile") else model.forward
    ids = torch.tensor([prompt])
    n_new = spec["decode_tokens"]

    def run():
        cache = make_cache(kv_spec, model.config) if kv_spec else DynamicCache(config=model.config)
        with torch.inference_mode():
            t0 = time.perf_counter()
            # logits of the last position only, as a serving runtime (and llama.cpp) computes them
            out = forward(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            tok = out.logits[:, -1:].argmax(-1)
            generated = [int(tok)]
            for _ in range(n_new - 1):
                out = forward(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
                generated.append(int(tok))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, generated

    return _timed(run, rss_after, len(prompt), n_new, spec.get("repeats", 1))


def _timed(run, rss_after: int, n_prompt: int, n_new: int, repeats: int) -> dict:
    """A warm-up run (and compilation; memory-mapped weights are resident after it), the RSS
    then, and the fastest of `repeats` timed runs; run() -> (prefill s, decode s, tokens)."""
    t0 = time.perf_counter()
    run()
    warmup = time.perf_counter() - t0
    _trim()
    rss_run = rss_bytes()
    prefill, decode, generated = min((run() for _ in range(repeats)), key=lambda r: r[0] + r[1])
    return {"rss_after_load": rss_after, "rss_after_run": rss_run, "warmup_seconds": warmup,
            "prefill_seconds": prefill, "decode_seconds": decode,
            "prefill_tok_s": n_prompt / prefill, "decode_tok_s": (n_new - 1) / decode, "generated": generated}


def _measure_llama_cpp(spec: dict, prompt: list[int]) -> dict:
    import numpy as np
    from llama_cpp import Llama

    one_at_a_time = spec.get("llama_cpp_batch") == 1
    llm = Llama(model_path=spec["path"], n_ctx=len(prompt) + spec["decode_tokens"] + 8, n_threads=spec["threads"],
                n_batch=1 if one_at_a_time else len(prompt), logits_all=False, verbose=False, seed=0)
    _trim()
    rss_after = rss_bytes()
    n_new = spec["decode_tokens"]

    def run():
        llm.reset()
        t0 = time.perf_counter()
        if one_at_a_time:
            for tok in prompt:
                llm.eval([tok])
        else:
            llm.eval(prompt)
        t1 = time.perf_counter()
        generated = []

        def last_logits():   # without logits_all, llama.cpp keeps only the last position's
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        tok = int(last_logits().argmax())
        generated.append(tok)
        for _ in range(n_new - 1):
            llm.eval([tok])
            tok = int(last_logits().argmax())
            generated.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, generated

    return _timed(run, rss_after, len(prompt), n_new, spec.get("repeats", 1))


def _warm_imports(folder: str) -> None:
    """Build (and drop) an empty skeleton and the tokenizer of the architecture first: the
    modeling code's imports (~150 MB here) then count in the baseline, not in the model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with init_empty_weights(include_buffers=False):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    AutoTokenizer.from_pretrained(folder)


def worker(spec: dict) -> dict:
    """Measure one model in this (fresh) process."""
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers  # noqa: F401  (imported before the baseline RSS, like torch)

    if spec["runtime"] == "llama.cpp":
        import llama_cpp  # noqa: F401
    elif spec.get("warm_config"):
        _warm_imports(spec["warm_config"])
    _trim()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    prompt = spec["prompt"]
    if spec["runtime"] == "llama.cpp":
        out = _measure_llama_cpp(spec, prompt)
    else:
        out = _measure_torch(spec, prompt)
    out.update({"label": spec["label"], "runtime": spec["runtime"], "path": spec["path"],
                "rss_before_load": rss_before, "model_rss": out["rss_after_run"] - rss_before,
                "seconds_total": time.perf_counter() - t0})
    return out


def measure(spec: dict, worker_cmd: list[str] | None = None) -> dict:
    """Run `worker(spec)` (or `worker_cmd SPEC_JSON`, a peer's worker) in a fresh Python process
    and return its result."""
    cmd = worker_cmd or [sys.executable, "-m", "lowbit.eval.speed"]
    proc = subprocess.run([*cmd, json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None and proc.returncode < 0 and spec["runtime"] == "llama.cpp" and "llama_cpp_batch" not in spec:
        # llama-cpp-python 0.3.36 on an Intel Xeon with AMX dies (SIGSEGV in its AMX matmul, SIGILL) when it
        # evaluates several tokens at once on quantized weights; one token per eval works: measured so, said
        row = measure({**spec, "llama_cpp_batch": 1}, worker_cmd)
        row["note"] = (f"llama.cpp died with signal {-proc.returncode} evaluating the prompt in one batch on this CPU; "
                       "measured one token per eval, so its prefill tok/s is a lower bound")
        return row
    if line is None:
        err = (proc.stderr.strip().splitlines() or [f"no output (exit status {proc.returncode})"])[-1]
        return {"label": spec["label"], "runtime": spec["runtime"], "path": spec["path"], "error": err}
    return json.loads(line[len("RESULT "):])


def with_ratios(rows: list[dict], reference_label: str) -> list[dict]:
    """Each row's memory and speed as ratios to the reference row's (same run)."""
    ref = next((r for r in rows if r["label"] == reference_label and "error" not in r), None)
    for r in rows:
        if ref is None or "error" in r:
            continue
        r["model_rss_ratio"] = r["model_rss"] / ref["model_rss"]
        r["prefill_speedup"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
        r["decode_speedup"] = r["decode_tok_s"] / ref["decode_tok_s"]
        same = sum(a == b for a, b in zip(r["generated"], ref["generated"]))
        r["same_tokens_as_reference"] = f"{same}/{len(ref['generated'])}"
    return rows


def prompt_tokens(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        from lowbit.errors import DataError

        raise DataError(f"the prompt text has {len(ids)} tokens, fewer than --prompt-tokens {n}; give more text or fewer tokens")
    return list(ids[:n])


if __name__ == "__main__":
    result = worker(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()
    os._exit(0)   # skip interpreter teardown: llama.cpp's and torch's destructors add nothing
