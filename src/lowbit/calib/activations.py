"""Static activation ranges: what a static (per-tensor) activation scale is fitted to.

One pass of calibration data through the weight-quantized model, with a pre-hook on every
Linear whose input gets a static scale: each keeps the exact absmax of its input and a strided
sample of its values (at most SAMPLE_PER_BATCH per batch, deterministic). The scheme's observer
then turns them into the clipping absmax the scale is built from:
minmax: the absmax; percentile: the p-th percentile of |x|; mse: the clip ratio (1 .. 0.3 of
absmax) whose fake quantization of the sample has least squared error; kl: TensorRT's entropy
calibration of |x| (lowbit.observers.kl_threshold).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from lowbit.errors import SchemeError
from lowbit.observers import kl_threshold
from lowbit.scheme import ActivationScheme

SAMPLE_PER_BATCH = 16384


@dataclasses.dataclass
class InputRange:
    absmax: float = 0.0
    samples: list = dataclasses.field(default_factory=list)

    def add(self, x: torch.Tensor, keep_sample: bool) -> None:
        flat = x.detach().reshape(-1).float()
        self.absmax = max(self.absmax, float(flat.abs().max()) if flat.numel() else 0.0)
        if keep_sample and flat.numel():
            stride = max(1, flat.numel() // SAMPLE_PER_BATCH)
            self.samples.append(flat[::stride].clone())


def clip_absmax(r: InputRange, act: ActivationScheme) -> float:
    """The absmax a static scale is built from, after the scheme's observer."""
    if act.observer == "minmax" or r.absmax == 0.0:
        return r.absmax
    if act.format == "nvfp4" and act.observer in ("mse", "kl"):
        raise SchemeError("the NVFP4 activation global scale takes the minmax or percentile observer; "
                          f"{act.observer} assumes one scale per tensor")
    x = torch.cat(r.samples)
    if act.observer == "percentile":
        return float(torch.quantile(x.abs(), act.percentile / 100))
    if act.observer == "kl":
        levels = 2 ** (act.bits - 1) if act.format == "int" else 128
        return float(kl_threshold(x, levels))
    from lowbit.nn.act_quant import fake_quantize_input, input_quant_spec

    best, best_err = r.absmax, float("inf")
    for ratio in torch.linspace(1.0, 0.3, 36).tolist():
        clip = r.absmax * ratio
        err = float((fake_quantize_input(x, input_quant_spec(act, clip)) - x).square().sum())
        if err < best_err:
            best, best_err = clip, err
    return best


@torch.no_grad()
def observe_input_ranges(model: torch.nn.Module, modules: dict[str, tuple[str, ActivationScheme]],
                         run: Callable[[torch.nn.Module], None]) -> dict[str, float]:
    """Clipping absmax per entry of `modules` ({key: (module name, activation scheme)}), from the
    inputs those modules see while `run(model)` feeds calibration data through the model."""
    ranges = {key: InputRange() for key in modules}
    handles = []
    for key, (module_name, act) in modules.items():
        keep = act.observer != "minmax"

        def hook(_m, args, r=ranges[key], keep=keep):
            r.add(args[0], keep)

        handles.append(model.get_submodule(module_name).register_forward_pre_hook(hook))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return {key: clip_absmax(ranges[key], modules[key][1]) for key in modules}


def window_runner(windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Callable[[torch.nn.Module], None]:
    """A `run` for observe_input_ranges feeding token windows in batches."""

    def run(model):
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="activation ranges", disable=not progress, unit="batch"):
            model(windows[i: i + batch_size], use_cache=False)

    return run
