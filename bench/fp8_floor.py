"""Benchmark: where FP8_DYNAMIC's error comes from on the embedded default.

Splits the preset (E4M3 weights per output channel, E4M3 inputs per token, dynamic) into its
parts, on the quick evaluation of bench/methods.py (WikiText-2 test, 8 x 512 tokens, KLD against
the fp32 model): inputs alone (weights left in full precision), weights alone per channel and
in groups, and both. Inputs are fake-quantized by lowbit.nn.act_quant (the function the
quantized model runs); weights by lowbit's RTN.

    python bench/fp8_floor.py          # -> bench/results/fp8_floor.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit import WeightScheme
from lowbit.api import quantize
from lowbit.data import token_windows
from lowbit.eval.divergence import compare, run_reference
from lowbit.model.load import load_source
from lowbit.model.targets import select_targets
from lowbit.nn.act_quant import fake_quantize_input, input_quant_spec
from lowbit.scheme import preset

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"


def main() -> None:
    torch.manual_seed(0)
    loaded = load_source(None)
    windows = token_windows(loaded.tokenizer, (WIKI / "test.txt").read_text(), 512, 8)
    ref = run_reference(loaded.model, windows, progress=False)
    spec = input_quant_spec(preset("FP8_DYNAMIC").activations)
    rows = []

    def measure(label, model, inputs_fp8):
        hooks = [model.get_submodule(name).register_forward_pre_hook(lambda _m, a: (fake_quantize_input(a[0], spec),) + a[1:])
                 for name in targets] if inputs_fp8 else []
        try:
            r = compare(model, ref, progress=False)
        finally:
            for h in hooks:
                h.remove()
        rows.append({"what": label, "kld": r.kld, "top1": r.top1, "ppl": r.ppl, "ref_ppl": r.ref_ppl})
        print(json.dumps(rows[-1]), flush=True)

    # the quantization targets (the tied head is not one): the Linears whose inputs the preset quantizes
    targets = sorted({t.module_name for t in select_targets(loaded.model)})
    measure("inputs E4M3 per token, weights fp32", loaded.model, True)
    for label, gs in (("per channel", -1), ("g128", 128), ("g32", 32)):
        # quantize() replaces the Linears it quantizes: each scheme starts from a fresh load
        qm = quantize(load_source(None), WeightScheme("fp8_e4m3", None, gs), method="rtn", progress=False)
        measure(f"weights E4M3 {label} (RTN), inputs fp32", qm.model, False)
        if gs == -1:
            measure("weights E4M3 per channel (RTN) + inputs E4M3 per token = FP8_DYNAMIC", qm.model, True)
    out = ROOT / "bench" / "results"
    (out / "fp8_floor.json").write_text(json.dumps({"eval": "WikiText-2 test, 8 x 512 tokens", "rows": rows}, indent=1))
    lines = ["# FP8_DYNAMIC on SmolLM2-135M-Instruct, part by part", "",
             "Eval: WikiText-2 test, 8 x 512 tokens (bench/methods.py --quick's windows), KLD against the fp32 model. "
             "Inputs of every quantized Linear (not the tied head) fake-quantized as the preset says; "
             "weights by RTN. SmolLM2's weights lie on a Q4_1 grid that E4M3 cannot express.", "",
             "| what | KLD | top-1 | PPL | ref PPL |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['kld']:.4f} | {r['top1']:.3f} | {r['ppl']:.3f} | {r['ref_ppl']:.3f} |" for r in rows]
    (out / "fp8_floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
