"""Benchmark: lowbit's quantized KV caches on the embedded default at 2048 context, WikiText-2 test.

Every row runs the same windows with the same forwards (lowbit eval --kv's protocol: the first
1024 tokens of a window in one prefill forward, then forwards of 32 tokens, the last 16 tokens
one at a time); the reference is transformers' DynamicCache through the same forwards. For each
cache: KLD / top-1 against the reference over every position, over the decoded positions only
(after the prefill) and over the single-token steps only (the last 16 of each window), and the
cache's bytes after 2048 tokens, measured from its stored tensors, as a ratio to a 16-bit cache
of the same tokens. transformers' own QuantizedCache (quanto, HQQ and fp8 backends) runs beside
it where the backend imports.

    python bench/kv_cache.py                # 8 windows x 2048 tokens
    python bench/kv_cache.py --quick        # 2 windows
    python bench/kv_cache.py --windows 4 --rows int8 kivi2
    python bench/kv_cache.py --threads 1    # on a machine others are using

Writes bench/results/kv_cache.json and .md (--quick: kv_cache_quick.*).
Both read the tokens of a forward as computed and everything cached before as stored (the
`read-back` row shows lowbit's stricter write-then-read); transformers' layers keep a 128-token
full-precision residual, so each lowbit kind also runs with R128 beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2" / "test.txt"

TARGETS = {"int8": 0.002, "fp8": 0.005, "int4": 0.03, "kivi4": 0.03, "kivi2": 0.05}   # kivi4: int4's target

# (row name, lowbit KVCacheSpec kwargs): the kinds with lowbit's defaults (sink 1; R128 and
# the mse range for KIVI-2), the same kinds with transformers' 128-token residual, per-head
# variants, plain KIVI-2 (no sink, min-max) and int4 read back from storage
LOWBIT_ROWS = [
    ("none", dict(kind="none")),
    ("int8", dict(kind="int8")),
    ("int8 R128", dict(kind="int8", residual=128)),
    ("int8 g32 R128", dict(kind="int8", granularity="group", residual=128)),
    # min-max ranges (a scale and a minimum per 32 channels), as HQQ's int8 cache stores them
    ("int8 g32 asym R128", dict(kind="int8", granularity="group", symmetric=False, residual=128)),
    ("int8 per-head", dict(kind="int8", granularity="head")),
    ("fp8", dict(kind="fp8")),
    ("fp8 R128", dict(kind="fp8", residual=128)),
    ("fp8 per-head", dict(kind="fp8", granularity="head")),
    ("int4", dict(kind="int4")),
    ("int4 read-back", dict(kind="int4", new_tokens="stored")),
    ("int4 R128", dict(kind="int4", residual=128)),
    ("kivi4", dict(kind="kivi4")),
    ("kivi2", dict(kind="kivi2")),
    ("kivi2 plain", dict(kind="kivi2", sink=0, clip="minmax")),
]
# (row name, QuantizedCache backend, kwargs, the lowbit rows it is a peer of: same bits)
PEER_ROWS = [
    ("hf-fp8 (per tensor)", "fp8", {}, ("fp8", "fp8 R128")),
    ("hf-hqq int8 g32", "hqq", dict(nbits=8, q_group_size=32, axis_key=1, axis_value=1),
     ("int8", "int8 R128", "int8 g32 R128", "int8 g32 asym R128")),
    ("hf-quanto int4 g32", "quanto", dict(nbits=4, q_group_size=32), ("int4", "int4 R128", "kivi4")),
    ("hf-hqq int4 g32", "hqq", dict(nbits=4, q_group_size=32, axis_key=1, axis_value=1), ("int4", "int4 R128", "kivi4")),
    ("hf-quanto int2 g32", "quanto", dict(nbits=2, q_group_size=32), ("kivi2", "kivi2 plain")),
    ("hf-hqq int2 g32", "hqq", dict(nbits=2, q_group_size=32, axis_key=1, axis_value=1), ("kivi2", "kivi2 plain")),
]


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from obj (tensor subclasses through their inner tensors)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.element_size() * obj.numel()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def peer_bytes(cache) -> int:
    """A transformers QuantizedCache's bytes: its layers' quantized states and residual states."""
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


@torch.no_grad()
def run_window(model, ids, make_cache, bounds):
    """(log-probs (n-1, vocab), cache) of one window through a fresh cache, forwards at `bounds`."""
    cache = make_cache()
    pieces = [model(ids[:, a:e], cache=cache, use_cache=True).logits.float() for a, e in zip(bounds[:-1], bounds[1:])]
    return F.log_softmax(torch.cat(pieces, dim=1)[0, :-1], dim=-1), cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 windows")
    ap.add_argument("--windows", type=int, help="windows of --ctx tokens (default 8, --quick 2)")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--rows", nargs="*", help="row names to run (default all), e.g. int8 kivi2 'hf-quanto int4 g32'")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (default torch's); on a shared machine 1 avoids "
                                                 "oversubscription, which slows 2-thread runs several-fold")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DynamicCache
    from transformers.cache_utils import QuantizedCache

    from lowbit.data import token_windows
    from lowbit.eval.divergence import CacheProtocol
    from lowbit.model.load import load_source
    from lowbit.runtime.kv_cache import KVCacheSpec, QuantizedKVCache

    n_windows = args.windows or (2 if args.quick else 8)
    loaded = load_source(None)
    model, config = loaded.model, loaded.model.config
    windows = token_windows(loaded.tokenizer, WIKI.read_text(encoding="utf-8"), args.ctx, n_windows)
    protocol = CacheProtocol.for_window(KVCacheSpec("none"), args.ctx, chunk=args.chunk)
    bounds = protocol.bounds(args.ctx)

    rows = {}   # name -> maker, meta
    for name, kw in LOWBIT_ROWS:
        spec = KVCacheSpec(**kw)
        rows[name] = (lambda spec=spec: QuantizedKVCache(spec, config), {"impl": "lowbit", "label": spec.label(),
                                                                           "kind": spec.kind})
    peer_errors = {}
    if not args.no_peers:
        for name, backend, kw, peer_of in PEER_ROWS:
            try:  # a backend that cannot import or run is recorded, not fatal
                c = QuantizedCache(backend, config, **kw)
                x = torch.randn(1, config.num_key_value_heads, 4, config.head_dim)
                c.update(x, x, 0)
                rows[name] = (lambda backend=backend, kw=kw: QuantizedCache(backend, config, **kw),
                              {"impl": "transformers QuantizedCache", "backend": backend, **kw, "peer_of": peer_of})
            except Exception as e:  # noqa: BLE001 - any failure of a third-party backend
                peer_errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"{name}: unavailable ({peer_errors[name]})", flush=True)
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows}

    stats = {name: {"nll": 0.0, "kl": [], "kl_decode": [], "kl_tail": [], "agree": 0, "agree_decode": 0, "seconds": 0.0}
             for name in rows}
    ref_nll, ref_seconds, count, count_decode = 0.0, 0.0, 0, 0
    decode_from = protocol.prefill - 1   # log-prob row i predicts token i+1; rows >= prefill-1 come from decode forwards
    bytes_at_end = {}
    load = [os.getloadavg()[0]]
    for wi, w in enumerate(windows):
        ids = w.unsqueeze(0)
        target = w[1:, None]
        t0 = time.perf_counter()
        ref_lp, _ = run_window(model, ids, lambda: DynamicCache(config=config), bounds)
        ref_seconds += time.perf_counter() - t0
        ref_nll += float(-ref_lp.gather(1, target).sum())
        count += target.numel()
        count_decode += target.numel() - decode_from
        ref_p = ref_lp.exp()
        ref_top = ref_lp.argmax(-1)
        for name, (make, _) in rows.items():
            t0 = time.perf_counter()
            lp, cache = run_window(model, ids, make, bounds)
            st = stats[name]
            st["seconds"] += time.perf_counter() - t0
            kl = (ref_p * (ref_lp - lp)).sum(-1).clamp_min(0)
            st["nll"] += float(-lp.gather(1, target).sum())
            st["kl"].append(kl)
            st["kl_decode"].append(kl[decode_from:])
            st["kl_tail"].append(kl[-protocol.tail:])
            agree = lp.argmax(-1) == ref_top
            st["agree"] += int(agree.sum())
            st["agree_decode"] += int(agree[decode_from:].sum())
            bytes_at_end[name] = cache.nbytes() if isinstance(cache, QuantizedKVCache) else peer_bytes(cache)
            print(f"window {wi + 1}/{len(windows)} {name}: KLD {float(kl.mean()):.5f}", flush=True)
        load.append(os.getloadavg()[0])

    n_layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    fp16_bytes = 2 * n_layers * kv_heads * head_dim * args.ctx * 2
    out_rows = []
    for name, (_, meta) in rows.items():
        st = stats[name]
        kl = torch.cat(st["kl"])
        kl_dec = torch.cat(st["kl_decode"])
        r = {"row": name, **meta, "kld": float(kl.mean()), "kld_p99": float(torch.quantile(kl.double(), 0.99)),
             "top1": st["agree"] / count, "kld_decode": float(kl_dec.mean()), "top1_decode": st["agree_decode"] / count_decode,
             "kld_single_token": float(torch.cat(st["kl_tail"]).mean()),
             "ppl": math.exp(st["nll"] / count), "cache_bytes": bytes_at_end[name],
             "ratio_fp16": bytes_at_end[name] / fp16_bytes, "seconds": st["seconds"]}
        if meta["impl"] == "lowbit" and name in TARGETS:
            r["target_kld"] = TARGETS[name]
            r["meets_target"] = r["kld"] <= TARGETS[name]
        out_rows.append(r)
    for r in out_rows:  # each lowbit kind beside its peers at the same bits
        if r["impl"] == "lowbit" and r["row"] != "none":
            peers = [p for p in out_rows if r["row"] in p.get("peer_of", ())]
            r["below_peers_kld"] = all(r["kld"] < p["kld"] for p in peers) if peers else None
            r["below_peers_kld_decode"] = all(r["kld_decode"] < p["kld_decode"] for p in peers) if peers else None
    meta = {"model": loaded.source, "model_name": "SmolLM2-135M-Instruct (embedded default), fp32 on CPU",
            "geometry": {"layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim},
            "eval": f"WikiText-2 test, {len(windows)} x {args.ctx} tokens (consecutive windows of the concatenated text)",
            "protocol": {"prefill": protocol.prefill, "chunk": protocol.chunk, "tail": protocol.tail,
                         "forwards_per_window": len(bounds) - 1},
            "reference": "transformers DynamicCache, same forwards", "ref_ppl": math.exp(ref_nll / count),
            "ref_seconds": ref_seconds, "fp16_cache_bytes": fp16_bytes, "peer_errors": peer_errors,
            "quick": args.quick, "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "loadavg_1m": load,
            "peer_versions": _peer_versions(),
            "command": "python bench/kv_cache.py" + (" --quick" if args.quick else "")
                       + (f" --windows {args.windows}" if args.windows else "")
                       + (f" --threads {args.threads}" if args.threads else "")
                       + (f" --ctx {args.ctx}" if args.ctx != 2048 else "") + (f" --chunk {args.chunk}" if args.chunk != 32 else "")
                       + (" --rows " + " ".join(f"'{r}'" for r in args.rows) if args.rows else "")}
    name = "kv_cache_quick" if args.quick else "kv_cache"
    if args.rows or args.ctx != 2048 or args.chunk != 32:
        name += "_subset"   # never overwrites the table of the documented settings
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / f"{name}.json", json.dumps({"meta": meta, "rows": out_rows}, indent=1))
    _write(out_dir / f"{name}.md", _markdown(meta, out_rows))
    print(_markdown(meta, out_rows))


def _peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "optimum-quanto", "hqq"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _kld(v: float) -> str:
    """Three significant digits: int8 caches differ in the sixth decimal."""
    return f"{v:.3g}"


def _markdown(meta: dict, rows: list[dict]) -> str:
    p = meta["protocol"]
    lines = [f"# KV cache quantization on {meta['model_name']}", "",
             f"Eval: {meta['eval']}. Each window: a prefill of {p['prefill']} tokens, then forwards of {p['chunk']} "
             f"tokens, the last {p['tail']} one at a time ({p['forwards_per_window']} forwards); reference: "
             f"{meta['reference']} (PPL {meta['ref_ppl']:.3f}). KLD = mean KL(reference || cache) per token over all "
             f"positions; 'decode' columns: positions after the prefill only. Bytes: the cache after {meta['eval'].split(' x ')[1].split()[0]} "
             f"tokens, measured from its stored tensors, / a 16-bit cache of the same tokens "
             f"({meta['fp16_cache_bytes'] / 1e6:.1f} MB). The lowbit `none` row stores fp32 as the model computes.",
             "'1-token': the last 16 positions of each window, one forward per token.",
             "", "| cache | implementation | KLD | KLD p99 | top-1 | KLD decode | top-1 decode | KLD 1-token | PPL | bytes / fp16 | target KLD | below peers (all / decode) | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        impl = r["impl"] if r["impl"] == "lowbit" else f"HF QuantizedCache ({r['backend']})"
        label = r.get("label", r["row"]) if r["impl"] == "lowbit" else r["row"]
        target = ""
        if "target_kld" in r:
            target = f"≤ {r['target_kld']} {'met' if r['meets_target'] else 'MISSED'}"
        below = ""
        if r.get("below_peers_kld") is not None:
            below = f"{'yes' if r['below_peers_kld'] else 'NO'} / {'yes' if r['below_peers_kld_decode'] else 'NO'}"
        lines.append(f"| {label} | {impl} | {_kld(r['kld'])} | {r['kld_p99']:.4f} | {r['top1']:.4f} | {_kld(r['kld_decode'])} | "
                     f"{r['top1_decode']:.4f} | {_kld(r['kld_single_token'])} | {r['ppl']:.3f} | {r['ratio_fp16']:.3f} | {target} | "
                     f"{below} | {r['seconds']:.0f} |")
    if meta["peer_errors"]:
        lines += ["", "Peers that did not run: " + "; ".join(f"{k}: {v}" for k, v in meta["peer_errors"].items())]
    lines += ["", f"Peers: {', '.join(f'{k} {v}' for k, v in meta['peer_versions'].items())} (installed with "
              "`pip install --no-deps`, against torch " + meta["torch"] + ").",
              f"Machine: {meta['machine']}, torch threads {meta['torch_threads']}, load average during the run "
              f"{min(meta['loadavg_1m']):.1f}-{max(meta['loadavg_1m']):.1f}. Command: `{meta['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
