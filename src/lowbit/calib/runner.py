"""Layer-sequential calibration.

Capture the inputs of decoder layer 0 once; then, for each decoder layer: run the calibration
batches through it with hooks on its weight-holding modules (collecting what the method needs),
let the method quantize the layer, and run the batches through the *quantized* layer to produce
the next layer's inputs. Only the current layer's activations are resident, and the runner
touches one layer's weights at a time, so weights could be streamed per layer from disk.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from lowbit.errors import SchemeError, SourceError
from lowbit.model.targets import WeightTarget


@dataclasses.dataclass
class InputStats:
    """Statistics of one module's input X (tokens, in_features), over all calibration tokens."""

    n_tokens: int = 0
    hessian: torch.Tensor | None = None   # sum of X^T X (in, in), float32
    absmax: torch.Tensor | None = None    # max |X| per input channel
    abssum: torch.Tensor | None = None    # sum |X| per input channel
    sample: torch.Tensor | None = None    # first rows of X (for search-based methods)

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(1, self.n_tokens)

    def add(self, X: torch.Tensor, request: "StatsRequest") -> None:
        X = X.reshape(-1, X.shape[-1]).float()
        if request.hessian:
            if self.hessian is None:
                self.hessian = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
            accumulate_gram(self.hessian, X, request.hessian_precision)
        if request.channel_stats:
            a = X.abs()
            amax, asum = a.amax(dim=0), a.sum(dim=0)
            self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
            self.abssum = asum if self.abssum is None else self.abssum.add_(asum)
        sample_rows = request.sample_rows
        if sample_rows and (self.sample is None or self.sample.shape[0] < sample_rows):
            need = sample_rows - (0 if self.sample is None else self.sample.shape[0])
            part = X[:need].clone()
            self.sample = part if self.sample is None else torch.cat([self.sample, part])
        self.n_tokens += X.shape[0]


HESSIAN_PRECISIONS = ("fp32", "bf16")


def check_hessian_precision(precision: str) -> str:
    if precision not in HESSIAN_PRECISIONS:
        raise SchemeError(f"unknown Hessian precision {precision!r}; use one of {', '.join(HESSIAN_PRECISIONS)}")
    return precision


def _cpu_has_bf16_matmul() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)() or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())


class _Bf16Products:
    """Within: float32 matmuls on the CPU round their inputs to bf16 and accumulate in fp32
    (oneDNN on AMX/AVX512-BF16). Without that hardware the caller rounds the inputs itself, so
    the numbers are the same either way."""

    def __init__(self, device: torch.device):
        mkldnn = getattr(torch.backends, "mkldnn", None)
        self.matmul = getattr(mkldnn, "matmul", None)
        self.active = (device.type == "cpu" and _cpu_has_bf16_matmul() and hasattr(self.matmul, "fp32_precision"))

    def round(self, X: torch.Tensor) -> torch.Tensor:
        return X if self.active else X.to(torch.bfloat16).float()

    def __enter__(self):
        if self.active:
            self.saved, self.matmul.fp32_precision = self.matmul.fp32_precision, "bf16"
        return self

    def __exit__(self, *exc):
        if self.active:
            self.matmul.fp32_precision = self.saved


# wide inputs (down_proj's 1536) are accumulated in row panels of the lower triangle: ~1/2 + 1/(2k)
# of the full product's work, and larger panels keep the matmuls efficient
_PANEL = 192


def _add_lower_gram(H: torch.Tensor, A: torch.Tensor) -> None:
    """Lower triangle (at least) of H += A^T A."""
    d = A.shape[1]
    k = d // _PANEL if d >= 4 * _PANEL else 1
    if k == 1:
        H.addmm_(A.T, A)
        return
    bounds = [i * d // k for i in range(k + 1)]
    for a0, a1 in zip(bounds, bounds[1:]):
        H[a0:a1, :a1].addmm_(A[:, a0:a1].T, A[:, :a1])


def accumulate_gram(H: torch.Tensor, X: torch.Tensor, precision: str = "fp32") -> None:
    """H += X^T X (float32 accumulation); H comes out exactly symmetric (lower triangle mirrored).

    fp32: float32 products (the default).
    bf16: H += bf16(X)^T bf16(X), one product at bf16 speed where the CPU has AMX/AVX512-BF16
        (2.8x faster here); still a Gram matrix, so positive semi-definite, with inputs off by up
        to 2^-9. On SmolLM2 W4 g32 GPTQ took 82 s instead of 100 s with KLD 0.0965 instead of
        0.0924: opt-in. (Rounding the *output* to bf16 would break positive-definiteness.)"""
    check_hessian_precision(precision)
    if precision == "fp32":
        _add_lower_gram(H, X)
    else:
        ctx = _Bf16Products(X.device)
        with ctx:
            _add_lower_gram(H, ctx.round(X))
    lower = torch.tril(H)
    H.copy_(lower + torch.tril(H, -1).T)


@dataclasses.dataclass(frozen=True)
class StatsRequest:
    """What a method needs from calibration.

    staged: quantize each group of modules sharing an input as soon as every batch has reached
    it, so later modules of the same layer see inputs from already-quantized ones, and each
    layer runs once. Methods that fold scales into the op *before* a module (AWQ, SmoothQuant)
    cannot be staged: that op has already run when the module is reached."""

    hessian: bool = False
    sample_rows: int = 0
    staged: bool = False
    channel_stats: bool = True         # per-channel max |X| and mean |X| (AWQ, SmoothQuant)
    hessian_precision: str = "fp32"    # see accumulate_gram; set from CalibrationConfig


class _StopForward(Exception):
    pass


def find_decoder_layers(model: torch.nn.Module, targets: list[WeightTarget]) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList holding most target weights (model.layers, transformer.h, decoder.layers...)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            count = sum(t.module_name.startswith(name + ".") for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise SourceError("found no stack of decoder layers holding the target weights; this model needs --method rtn")
    return best


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, windows: torch.Tensor,
                         batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) that the model passes to its first decoder layer, per batch."""
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(windows[i: i + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layers(model: torch.nn.Module, windows: torch.Tensor, targets: list[WeightTarget],
               quantize_layer: Callable[[int, list[WeightTarget], dict[str, InputStats]], None],
               request: StatsRequest, batch_size: int = 8, sequential: bool = True,
               progress: bool = True, seconds: dict | None = None) -> list[WeightTarget]:
    """Drive `quantize_layer(index, layer_targets, stats_by_target_name)` over the decoder layers.

    With sequential=True each layer sees inputs produced by the already-quantized layers before
    it. Returns the targets outside the decoder layers (the caller quantizes them without data).
    `seconds`, if given, accumulates wall time per stage (capture, observe, quantize, propagate)."""
    import time

    clock = seconds if seconds is not None else {}

    def tick(stage, t0):
        clock[stage] = clock.get(stage, 0.0) + time.perf_counter() - t0

    prefix, layers = find_decoder_layers(model, targets)
    by_layer: dict[int, list[WeightTarget]] = {}
    outside = []
    for t in targets:
        rest = t.module_name[len(prefix) + 1:] if t.module_name.startswith(prefix + ".") else None
        if rest is None:
            outside.append(t)
            continue
        by_layer.setdefault(int(rest.split(".")[0]), []).append(t)
    t0 = time.perf_counter()
    batches = capture_layer_inputs(model, layers[0], windows, batch_size)
    tick("capture", t0)
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress, unit="layer")):
        layer_targets = by_layer.get(i, [])
        if request.staged and sequential:
            outputs = _staged_layer(model, i, layer, layer_targets, batches, quantize_layer, request, tick)
        else:
            outputs = _two_pass_layer(model, i, layer, layer_targets, batches, quantize_layer, request, sequential, tick)
        batches = [(out, kwargs) for out, (_, kwargs) in zip(outputs, batches)]
    return outside


def _observing_hook(stats: dict, last_input: dict, request: StatsRequest, name: str):
    """A pre-hook adding a module's input to its statistics; modules fed the same tensor
    (q/k/v, gate/up) share one statistics object. Holding the tensor in `last_input` keeps its
    memory from being reused by a later, different input."""

    def hook(_m, args):
        x = args[0]
        owner = next((n for n, prev in last_input.items() if prev.data_ptr() == x.data_ptr() and prev.shape == x.shape), None)
        if owner is not None:
            stats[name] = stats[owner]
            return
        last_input[name] = x
        stats.setdefault(name, InputStats()).add(x, request)

    return hook


def _two_pass_layer(model, i, layer, layer_targets, batches, quantize_layer, request, sequential, tick):
    """Observe the whole layer in full precision, quantize it, then run it again quantized."""
    import time

    stats: dict[str, InputStats] = {}
    last_input: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(t.module_name).register_forward_pre_hook(_observing_hook(stats, last_input, request, t.name))
             for t in layer_targets if t.kind != "experts"]  # experts: routed inside the module, no single input
    outputs = []
    t0 = time.perf_counter()
    try:
        for hidden, kwargs in batches:
            last_input.clear()
            out = _layer_output(layer(hidden, **kwargs))
            if not sequential:
                outputs.append(out)
    finally:
        for h in hooks:
            h.remove()
    tick("observe", t0)
    t0 = time.perf_counter()
    quantize_layer(i, layer_targets, stats)
    tick("solve", t0)
    t0 = time.perf_counter()
    if sequential:
        outputs = [_layer_output(layer(hidden, **kwargs)) for hidden, kwargs in batches]
    tick("propagate", t0)
    return outputs


def _discover_stages(model, layer, layer_targets, hidden, kwargs) -> list[list[WeightTarget]]:
    """Groups of target modules sharing one input, in execution order, from one probe window."""
    order: list[tuple[WeightTarget, torch.Tensor]] = []
    hooks = []
    for t in layer_targets:
        if t.kind == "experts":
            continue

        def hook(_m, args, t=t):
            if all(t is not seen for seen, _ in order):
                order.append((t, args[0]))

        hooks.append(model.get_submodule(t.module_name).register_forward_pre_hook(hook))
    try:
        probe_kwargs = {k: (v[:1] if isinstance(v, torch.Tensor) and v.shape[:1] == hidden.shape[:1] else v)
                        for k, v in kwargs.items()}
        layer(hidden[:1], **probe_kwargs)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[WeightTarget]] = []
    prev = None
    for t, x in order:
        if prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape:
            stages[-1].append(t)
        else:
            stages.append([t])
        prev = x
    return stages


class _StagedBatch:
    """One calibration batch running through a layer in its own greenlet, parking at the first
    module of each stage until the controller has quantized that stage.

    Greenlets, not threads: every batch runs on the controller's OS thread, so torch keeps one
    OpenMP thread team. (With one parked thread per batch, each holding its own team, libgomp
    sees more threads than cores and throttles every barrier: GPTQ's small per-column ops ran
    3x slower while batches were parked.)"""

    def __init__(self, layer, hidden, kwargs):
        from greenlet import greenlet

        self.layer, self.hidden, self.kwargs = layer, hidden, kwargs
        self.parked_at: int | None = None
        self.out, self.done = None, False
        self.greenlet = greenlet(self._run)
        # a weak reference: a cycle batch <-> greenlet would keep every layer's activations
        # alive until the cyclic garbage collector happens to run (memory grew with depth)
        self.greenlet.batch = weakref.ref(self)

    @staticmethod
    def current() -> "_StagedBatch | None":
        from greenlet import getcurrent

        ref = getattr(getcurrent(), "batch", None)
        return ref() if ref is not None else None

    def _run(self):
        try:
            self.out = _layer_output(self.layer(self.hidden, **self.kwargs))
        finally:
            self.done, self.parked_at = True, None
            self.hidden = self.kwargs = None  # the layer's input is not needed any more

    def park(self, stage: int) -> None:
        self.parked_at = stage
        self.greenlet.parent.switch()

    def step(self) -> None:
        """Run this batch until it parks or finishes (its exceptions propagate here)."""
        self.greenlet.switch()

    def abandon(self) -> None:
        if not self.greenlet.dead:
            self.greenlet.throw()  # GreenletExit unwinds the parked forward


def _staged_layer(model, i, layer, layer_targets, batches, quantize_layer, request, tick):
    """Run the layer once per batch, quantizing each stage when all batches have reached it."""
    import time

    t0 = time.perf_counter()
    experts = [t for t in layer_targets if t.kind == "experts"]
    if experts:  # no observable input: quantized before the layer runs
        quantize_layer(i, experts, {})
    stages = _discover_stages(model, layer, layer_targets, *batches[0])
    stage_of = {t.name: k for k, st in enumerate(stages) for t in st}
    stats: dict[str, InputStats] = {}
    done: set[int] = set()
    hooks = []
    for k, stage in enumerate(stages):
        first = stage[0]

        def hook(_m, args, k=k, stage=stage):
            batch = _StagedBatch.current()
            if batch is None or k in done:
                return
            st = stats.setdefault(stage[0].name, InputStats())
            for t in stage:
                stats[t.name] = st
            st.add(args[0], request)
            batch.park(k)

        hooks.append(model.get_submodule(first.module_name).register_forward_pre_hook(hook))
    runs = [_StagedBatch(layer, hidden, kwargs) for hidden, kwargs in batches]
    solve = 0.0
    try:
        while True:
            for r in runs:
                if not r.done:
                    r.step()
            parked = {r.parked_at for r in runs if not r.done}
            if not parked:
                break
            if len(parked) > 1:
                raise RuntimeError(f"calibration batches reached different modules ({sorted(parked)}) in layer {i}; "
                                   "data-dependent control flow cannot be staged")
            k = parked.pop()
            ts = time.perf_counter()
            quantize_layer(i, stages[k], stats)
            solve += time.perf_counter() - ts
            done.add(k)
    finally:
        for r in runs:
            r.abandon()
        for h in hooks:
            h.remove()
    never = [t for t in layer_targets if t.kind != "experts" and stage_of.get(t.name) not in done]
    if never:  # modules the layer did not call: quantized without data
        quantize_layer(i, never, {})
    total = time.perf_counter() - t0
    tick("solve", time.perf_counter() - solve)  # tick adds (now - start): pass starts giving durations
    tick("observe_and_propagate", time.perf_counter() - (total - solve))
    return [r.out for r in runs]
