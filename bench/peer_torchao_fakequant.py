"""Peer check: torchao's QAT fake quantizer against lowbit's RTN, weight by weight, at int3 g32
asymmetric on the embedded default (why torchao's QAT row in qat_quick.md starts at a high KLD).

    pip install --no-deps --target /tmp/tao torchao
    python bench/peer_torchao_fakequant.py --torchao-path /tmp/tao   # -> bench/results/peer_torchao_fakequant.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torchao-path", required=True)
    ap.add_argument("--bits", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, args.torchao_path)
    import torchao
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    from lowbit import WeightScheme, quantize_tensor
    from lowbit.model.load import load_source

    model = load_source(None).model
    fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(getattr(torch, f"int{args.bits}"), group_size=32, is_symmetric=False))
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            W = mod.weight.detach()
            with torch.no_grad():
                ours = quantize_tensor(W, WeightScheme("int", args.bits, 32, False)).dequantize()
                theirs = fq(W)
            rel = lambda a: float((a - W).pow(2).mean() / W.pow(2).mean())  # noqa: E731
            rows.append((name, rel(theirs), rel(ours), float((theirs - W).abs().max()), float((ours - W).abs().max()),
                         float(W.abs().max())))
    rows.sort(key=lambda r: -r[3] / r[5])
    lines = [f"# torchao {torchao.__version__} fake quantization vs lowbit RTN, int{args.bits} g32 asymmetric", "",
             "Every decoder Linear of SmolLM2-135M-Instruct; relative error = mean squared error / mean square weight. "
             "The five weights where torchao's largest error is largest against the weight's largest magnitude:", "",
             "| weight | rel. error torchao | rel. error lowbit | max abs error torchao | max abs error lowbit | max abs weight |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {a:.4f} | {b:.4f} | {c:.3f} | {d:.3f} | {e:.3f} |" for n, a, b, c, d, e in rows[:5]]
    mean = lambda i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
    lines += ["", f"Mean over {len(rows)} weights: relative error torchao {mean(1):.4f}, lowbit {mean(2):.4f}."]
    (ROOT / "bench" / "results" / "peer_torchao_fakequant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
