"""Benchmark: best PTQ vs PTQ + QAT vs PTQ + QAT + distillation at low bits on the embedded default.

The PTQ start is GPTQ with the mse observer (lowbit's best W3 row in methods.md), calibrated on
WikiText-2 validation; QAT then trains on WikiText-2 validation windows (disjoint from the
test text it is judged on) for a fixed number of steps, all from the same PTQ tensors, with
lowbit.train.run_qat (LSQ scales, AdamW, warm-up + cosine). Evaluation: WikiText-2 test, KLD
/ PPL / top-1 against the fp32 model, like bench/methods.py.

    python bench/qat.py --quick                  # W3 g32: 32 calibration windows, 8 eval windows, 100 steps x 256 tokens
    python bench/qat.py --bits 3 2 --steps 300 --ctx 512
    python bench/qat.py --quick --lr 1e-5 5e-5 --name qat_lr   # a learning-rate sweep
    python bench/qat.py --quick --torchao-path /tmp/tao  # + torchao's QAT (pip install --no-deps --target /tmp/tao torchao)

torchao's QAT (quantize_ with QATConfig(step="prepare"), IntxFakeQuantizeConfig: int{bits}
asymmetric, groups of 32, scales from the current weights at every forward) starts from the
fp32 model, as its workflow does, and trains the same weights with the same loss, optimizer,
schedule and batches; it is scored on its fake-quantized forward (what its convert step stores).

Writes bench/results/qat[_quick].{json,md} (or --name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"


def torchao_qat(path: str, loaded, teacher, bits: int, steps: int, ctx: int, lr: float, train_text: str, ref,
                label: str) -> dict:
    """torchao's QAT prepare on the fp32 model, trained like lowbit's distilled QAT."""
    import sys

    sys.path.insert(0, path)
    import torchao
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    from lowbit.eval.divergence import compare
    from lowbit.train.loop import Schedule, train_steps, training_windows
    from lowbit.train.qat import qat_loss

    model = loaded.model
    targets = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    wc = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=32, is_symmetric=False)
    quantize_(model, QATConfig(weight_config=wc, step="prepare"), filter_fn=lambda m, fqn: fqn in targets)
    for n, p in model.named_parameters():
        p.requires_grad_(n.rsplit(".", 1)[0] in targets)
    teacher.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    windows = training_windows(loaded.tokenizer, train_text, ctx, 1)
    with torch.no_grad():
        start = compare(model, ref, progress=False)
    t0 = time.perf_counter()
    losses = train_steps(model, opt, windows, Schedule(steps, lr), 1, 0, lambda ids: qat_loss(model, teacher, ids),
                         progress=False)
    t = time.perf_counter() - t0
    with torch.no_grad():
        res = compare(model, ref, progress=False)
    return {"what": f"torchao {torchao.__version__} QAT + distillation (from fp32; step 0 KLD {start.kld:.4f})",
            "scheme": label.replace(" (mse observer)", " (minmax, per step)"), "steps": steps, "ctx": ctx, "lr": lr,
            "kld": res.kld, "ppl": res.ppl, "ref_ppl": res.ref_ppl, "top1": res.top1, "seconds": t,
            "seconds_per_step": t / steps, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "kld_step0": start.kld}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bits", type=int, nargs="+", default=[3])
    ap.add_argument("--steps", type=int, default=None, help="default 100 (quick) / 300")
    ap.add_argument("--ctx", type=int, default=None, help="training tokens per step; default 256 (quick) / 512")
    ap.add_argument("--lr", type=float, nargs="+", default=[5e-5])
    ap.add_argument("--no-ce", action="store_true", help="only the distilled QAT rows")
    ap.add_argument("--torchao-path", help="a folder holding torchao (installed with --target): adds its QAT row")
    ap.add_argument("--name")
    args = ap.parse_args()

    from lowbit import WeightScheme
    from lowbit.api import execute, make_recipe
    from lowbit.calib import CalibrationConfig
    from lowbit.data import token_windows
    from lowbit.eval.divergence import compare, run_reference
    from lowbit.model.load import LoadedModel, load_source
    from lowbit.plan import build_plan
    from lowbit.train import QATConfig, run_qat

    samples, n_eval = (32, 8) if args.quick else (128, 16)
    steps = args.steps or (100 if args.quick else 300)
    ctx = args.ctx or (256 if args.quick else 512)
    torch.manual_seed(0)
    fp = load_source(None)
    windows = token_windows(fp.tokenizer, (WIKI / "test.txt").read_text(), 512, n_eval)
    ref = run_reference(fp.model, windows, progress=False)
    train_text = (WIKI / "valid.txt").read_text()
    calibration = CalibrationConfig(str(WIKI / "valid.txt"), samples, 512, 0)
    rows = []

    def fresh() -> LoadedModel:
        import copy

        return LoadedModel(copy.deepcopy(fp.model), fp.tokenizer, fp.source, fp.kind)

    def record(r):
        r["loadavg_1m"] = os.getloadavg()[0]
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)

    for bits in args.bits:
        scheme = WeightScheme("int", bits, 32, False, observer="mse")
        label = f"int{bits} g32 asym (mse observer)"
        loaded = fresh()
        plan = build_plan(loaded, make_recipe(scheme, "gptq", calibration=calibration), "native", progress=False)
        t0 = time.perf_counter()
        ptq = execute(loaded, plan, progress=False)
        t_ptq = time.perf_counter() - t0
        res = compare(ptq.model, ref, progress=False)
        record({"what": "PTQ: gptq", "scheme": label, "steps": 0, "kld": res.kld, "ppl": res.ppl, "ref_ppl": res.ref_ppl,
                "top1": res.top1, "seconds": t_ptq, "bits_per_weight": ptq.bits_per_weight})
        init = ptq.tensors
        del ptq, loaded
        for lr in args.lr:
            for distill in ([True] if args.no_ce else [False, True]):
                cfg = QATConfig(steps, lr=lr, ctx=ctx, distill=distill, checkpoint_every=0)
                loaded = fresh()
                plan = build_plan(loaded, make_recipe(scheme, "gptq", calibration=calibration), "native", progress=False)
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    out = run_qat(loaded, plan, train_text, "wikitext2-valid", cfg, Path(tmp) / "out", progress=False,
                                  init={k: dataclasses.replace(v) for k, v in init.items()})
                t_qat = time.perf_counter() - t0
                res = compare(out.qm.model, ref, progress=False)
                record({"what": "PTQ + QAT" + (" + distillation" if distill else ""), "scheme": label, "steps": steps,
                        "ctx": ctx, "lr": lr, "kld": res.kld, "ppl": res.ppl, "ref_ppl": res.ref_ppl, "top1": res.top1,
                        "seconds": t_qat, "seconds_per_step": t_qat / steps, "bits_per_weight": out.qm.bits_per_weight,
                        "loss_first": out.losses[0], "loss_last": out.losses[-1], "losses": out.losses})
                del out, loaded
                if args.torchao_path and distill:
                    record(torchao_qat(args.torchao_path, fresh(), fp.model, bits, steps, ctx, lr, train_text, ref, label))

    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "eval": f"WikiText-2 test, {n_eval} x 512 tokens",
            "calibration": f"WikiText-2 validation, {samples} x 512 tokens", "train": f"WikiText-2 validation, {steps} steps "
            f"x 1 window of {ctx} tokens", "machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__}
    name = args.name or ("qat_quick" if args.quick else "qat")
    out_dir = ROOT / "bench" / "results"
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# QAT on {meta['model']}", "", f"Eval: {meta['eval']}. PTQ calibration: {meta['calibration']}. "
             f"QAT: {meta['train']}, from the PTQ result (latent weights and LSQ scales start at its codes and "
             "scales), AdamW (betas 0.9/0.95), 5% warm-up, cosine to 0. Distillation: KL(fp32 model || student) on "
             "the logits. Seconds are wall time on a shared machine (the JSON has the load average).", "",
             "| what | scheme | steps | lr | KLD | PPL | ref PPL | top-1 | seconds | s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['scheme']} | {r['steps']} | {r.get('lr', '-')} | {r['kld']:.4f} | {r['ppl']:.3f} | "
                     f"{r['ref_ppl']:.3f} | {r['top1']:.3f} | {r['seconds']:.0f} | "
                     f"{r['seconds_per_step']:.2f} |" if r["steps"] else
                     f"| {r['what']} | {r['scheme']} | 0 | - | {r['kld']:.4f} | {r['ppl']:.3f} | {r['ref_ppl']:.3f} | "
                     f"{r['top1']:.3f} | {r['seconds']:.0f} | - |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
