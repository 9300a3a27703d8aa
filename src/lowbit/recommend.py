"""`lowbit recommend`: the field's decision table as the starting point, then measured.

The table names, for each use, the few candidates worth trying and the runtime that loads each.
Every candidate whose planned size fits the budget is quantized (on a small calibration set),
written in its runtime's format, and evaluated against the source; the recommendation is the
lowest measured KLD among the files that came out within the budget."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

from lowbit.errors import DataError

INT4_G32 = {"weights": {"format": "int", "bits": 4, "group_size": 32, "symmetric": False}}


@dataclasses.dataclass(frozen=True)
class Choice:
    name: str
    recipe: dict        # a lowbit recipe: method and scheme, or a llama.cpp mix
    container: str      # the exporter: native | gguf | compressed-tensors | gptq | awq
    runtime: str        # what loads the file
    why: str            # the table's reason to try it


def _gguf(mix: str, why: str) -> Choice:
    return Choice(f"GGUF {mix}", {"method": "rtn", "gguf": {"mix": mix}}, "gguf",
                  "llama.cpp (llama-cli, llama-server, Ollama, LM Studio)", why)


TABLE: dict[str, tuple[Choice, ...]] = {
    "cpu": (
        _gguf("Q8_0", "start with 8 bits: near-lossless, llama.cpp's fast int8 dot products"),
        _gguf("Q5_K_M", "the k-quant mix to try when Q8_0 is too large"),
        _gguf("Q4_K_M", "llama.cpp's usual default: 4-bit k-quants, 6-bit where it matters most"),
        _gguf("Q3_K_M", "when 4 bits do not fit; quality drops faster from here"),
        Choice("int4 g32 GPTQ (packed)", {"method": "gptq", "scheme": INT4_G32}, "native",
               "lowbit's packed runtime: lowbit.load(OUT, runtime='packed') (torch int4 CPU kernels)",
               "GPTQ's error feedback at 4 bits, packed int4 matmuls in torch"),
    ),
    "gpu-serving": (
        Choice("W8A8 SmoothQuant+GPTQ", {"method": "smoothquant", "scheme": "W8A8", "options": {"rounding": "gptq"}},
               "compressed-tensors", "vLLM / SGLang (compressed-tensors int8 W8A8)",
               "int8 weights and activations: int8 tensor cores, SmoothQuant moves outliers into the weights"),
        Choice("FP8 dynamic (GPTQ)", {"method": "gptq", "scheme": "FP8_DYNAMIC"}, "compressed-tensors",
               "vLLM / SGLang on Ada or Hopper (compressed-tensors FP8)", "8-bit floats, no activation calibration"),
        Choice("W4A16 GPTQ", {"method": "gptq", "scheme": "W4A16"}, "compressed-tensors",
               "vLLM / SGLang (compressed-tensors pack-quantized, Marlin kernels)",
               "4-bit weights for memory-bound decoding at small batch sizes"),
        Choice("NVFP4A16 GPTQ", {"method": "gptq", "scheme": "NVFP4A16"}, "compressed-tensors",
               "vLLM on Blackwell (compressed-tensors NVFP4)", "4-bit floats with FP8 block scales"),
    ),
    "fine-tuning": (
        Choice("NF4 double-quant", {"method": "rtn", "scheme": "NF4"}, "native",
               "lowbit qlora / peft (the QLoRA base)", "QLoRA's base: NF4 with double-quantized scales"),
        Choice("int8 per-channel", {"method": "rtn", "scheme": "W8A16"}, "native",
               "lowbit qlora --bits 8 --group-size -1 / peft", "an 8-bit base when memory allows: less base error to train around"),
        Choice("int4 g32 GPTQ", {"method": "gptq", "scheme": INT4_G32}, "gptq",
               "peft on a GPTQ base (transformers + gptqmodel)", "a GPTQ base keeps more quality at 4 bits than NF4's RTN"),
    ),
    "max-quality": (
        Choice("int8 per-channel GPTQ", {"method": "gptq", "scheme": "W8A16"}, "compressed-tensors",
               "vLLM / SGLang, transformers (compressed-tensors)", "8-bit weights: the smallest loss the field knows"),
        _gguf("Q8_0", "8-bit blocks of 32 in llama.cpp"),
        _gguf("Q6_K", "6-bit k-quants: close to Q8_0 at three quarters of its size"),
        Choice("int4 g32 GPTQ mse", {"method": "gptq", "scheme": {"weights": {**INT4_G32["weights"], "observer": "mse"}}}, "native",
               "lowbit's packed runtime", "the best 4-bit lowbit measures, when 8 bits do not fit"),
    ),
}
USES = tuple(TABLE)


@dataclasses.dataclass
class Outcome:
    choice: Choice
    planned_bytes: int
    status: str = "planned"         # measured | over budget (planned) | over budget (measured) | not storable: ...
    file_bytes: int | None = None   # the written weights file
    kld: float | None = None
    top1: float | None = None
    ppl: float | None = None
    seconds: float | None = None
    path: Path | None = None

    def as_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("choice", "path")}
        return {**dataclasses.asdict(self.choice), **d}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def recommend(loaded, use: str, budget: int, calibration, windows, workdir: Path, progress: bool = True) -> list[Outcome]:
    """Every candidate the table names for `use`, planned, and those within `budget` bytes
    quantized, written under workdir and evaluated on `windows`; sorted best first."""
    from lowbit.api import execute
    from lowbit.errors import SchemeError
    from lowbit.eval.divergence import compare, run_reference
    from lowbit.export import weights_bytes, write
    from lowbit.plan import build_plan
    from lowbit.plan.recipe import as_recipe

    if use not in TABLE:
        raise DataError(f"--for {use!r}: choose one of {', '.join(USES)}")
    outcomes = []
    for choice in TABLE[use]:
        recipe = as_recipe({**choice.recipe, "calibration": dataclasses.asdict(calibration)})
        try:
            plan = build_plan(loaded, recipe, choice.container, progress=False)
        except SchemeError as e:   # e.g. a group size that does not divide this model's rows
            outcomes.append((Outcome(choice, 0, f"not storable: {e}"), None))
            continue
        o = Outcome(choice, plan.estimated_file_bytes)
        if o.planned_bytes > budget:
            o.status = "over budget (planned)"
        outcomes.append((o, plan))
    fitting = [(o, p) for o, p in outcomes if o.status == "planned"]
    if all(p is None for _, p in outcomes):
        raise DataError(f"no candidate of the table for --for {use} can be stored for this model: "
                        + "; ".join(f"{o.choice.name}: {o.status}" for o, _ in outcomes))
    if not fitting:
        smallest = min((o for o, p in outcomes if p is not None), key=lambda o: o.planned_bytes)
        raise DataError(f"--budget {budget / 1e6:.4g} MB is smaller than every candidate for --for {use}: the smallest, "
                        f"{smallest.choice.name}, plans {smallest.planned_bytes / 1e6:.1f} MB; raise --budget")
    reference = run_reference(loaded.model, windows, progress)
    for o, plan in fitting:
        t0 = time.perf_counter()
        work = copy.deepcopy(loaded)
        qm = execute(work, plan, progress=progress)
        o.path = workdir / (_slug(o.choice.name) + (".gguf" if o.choice.container == "gguf" else ""))
        write(qm, o.choice.container, o.path)
        o.file_bytes = weights_bytes(o.path)
        res = compare(qm.model, reference, progress)
        o.kld, o.top1, o.ppl = res.kld, res.top1, res.ppl
        o.seconds = time.perf_counter() - t0
        o.status = "measured" if o.file_bytes <= budget else "over budget (measured)"
        del work, qm
    rank = {"measured": 0, "over budget (measured)": 1, "over budget (planned)": 2}
    return sorted((o for o, _ in outcomes), key=lambda o: (rank.get(o.status, 3), o.kld if o.kld is not None else 0,
                                                           o.planned_bytes))


def explain(best: Outcome, outcomes: list[Outcome], budget: int) -> str:
    within = [o for o in outcomes if o.status == "measured"]
    return (f"{best.choice.name}: the lowest measured KLD ({best.kld:.4f}) of the {len(within)} candidate(s) whose "
            f"file came out within {budget / 1e6:.4g} MB ({best.file_bytes / 1e6:.1f} MB); the table tries it because "
            f"{best.choice.why}; it loads in {best.choice.runtime}")


def keep(best: Outcome, output: str | os.PathLike) -> Path:
    """Move the chosen candidate's output to `output` (a rename: nothing half-written)."""
    from lowbit.export.native import remove_output

    out = Path(output)
    if out.exists():
        remove_output(out)
    os.replace(best.path, out)
    return out
