"""Layer-sequential calibration.

Capture the inputs of decoder layer 0 once; then, for each decoder layer: run the calibration
batches through it with hooks on its weight-holding modules (collecting what the method needs),
let the method quantize the layer, and run the batches through the *quantized* layer to produce
the next layer's inputs. Only the current layer's activations are resident, and the runner
touches one layer's weights at a time, so weights could be streamed per layer from disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from lowbit.errors import SchemeError, SourceError
from lowbit.model.targets import WeightTarget


@dataclasses.dataclass
class InputStats:
    """Statistics of one module's input X (tokens, in_features), over all calibration tokens.

    XᵀX is a LowerGram (float64 panels) while batches arrive; `finish()` makes it the symmetric
    float32 matrix the methods read, the same whichever way the batches were grouped."""

    n_tokens: int = 0
    hessian: "torch.Tensor | LowerGram | None" = None   # sum of X^T X (in, in): LowerGram until finish()
    absmax: torch.Tensor | None = None    # max |X| per input channel
    abssum: torch.Tensor | None = None    # sum |X| per input channel, float64 (order-independent, as XᵀX)
    sample: torch.Tensor | None = None    # first rows of X (for search-based methods)
    finished: bool = False

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(1, self.n_tokens)).float()

    def add(self, X: torch.Tensor, request: "StatsRequest") -> None:
        if self.finished:
            raise RuntimeError("calibration statistics are final; no more inputs can be added")
        X = X.reshape(-1, X.shape[-1]).float()
        if request.hessian:
            if self.hessian is None:
                self.hessian = LowerGram(X.shape[1], X.device)
            self.hessian.add(X, request.hessian_precision)
        if request.channel_stats:
            a = X.abs()
            amax, asum = a.amax(dim=0), a.sum(dim=0, dtype=torch.float64)
            self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
            self.abssum = asum if self.abssum is None else self.abssum.add_(asum)
        sample_rows = request.sample_rows
        if sample_rows and (self.sample is None or self.sample.shape[0] < sample_rows):
            need = sample_rows - (0 if self.sample is None else self.sample.shape[0])
            part = X[:need].clone()
            self.sample = part if self.sample is None else torch.cat([self.sample, part])
        self.n_tokens += X.shape[0]

    def finish(self) -> None:
        """Make the Hessian final: symmetric, float32 (idempotent)."""
        if not self.finished and self.hessian is not None:
            self.hessian = self.hessian.finish()
        self.finished = True


def finish_stats(stats: dict, names: list[str]) -> None:
    """finish() the InputStats of `names` (objects shared between names once)."""
    for name in names:
        st = stats.get(name)
        if isinstance(st, InputStats):
            st.finish()


def release_stats(stats: dict, names: list[str]) -> None:
    """Drop what the solved weights `names` were calibrated with: a staged layer keeps its stats
    until it ends, and a wide input's XᵀX is hundreds of MB (11008 wide: 485 MB)."""
    for name in names:
        st = stats.pop(name, None)
        if isinstance(st, InputStats):
            st.hessian = st.sample = None


HESSIAN_PRECISIONS = ("fp32", "bf16")


def check_hessian_precision(precision: str) -> str:
    if precision not in HESSIAN_PRECISIONS:
        raise SchemeError(f"unknown Hessian precision {precision!r}; use one of {', '.join(HESSIAN_PRECISIONS)}")
    return precision


# Paths of accumulate_gram(..., "bf16"); both compute H += bf16(X)^T bf16(X) with fp32 accumulation
# (< 1e-5 relative to the float64 Gram of the bf16 inputs), they differ only in speed:
BF16_ONEDNN = "onednn-bf16"      # bf16-rounded inputs, float32 matmuls with oneDNN's bf16 fpmath hint
BF16_EMULATED = "fp32-emulated"  # bf16-rounded inputs, plain float32 matmuls (same numbers, no speed-up)
_BF16_TOLERANCE = 1e-5


@contextlib.contextmanager
def _bf16_matmul_hint():
    """Within: oneDNN *may* compute float32 CPU matmuls from bf16-rounded inputs (fpmath mode bf16).
    Only a hint: oneDNN 3.12 (torch 2.13) honours it with AMX; on AVX512-BF16 without AMX (AMD
    EPYC, measured) it keeps its float32 kernel, and torch sends small products to MKL anyway."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if not hasattr(matmul, "fp32_precision"):
        yield
        return
    saved, matmul.fp32_precision = matmul.fp32_precision, "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


# inputs of 2 panels and wider are accumulated in row panels of the lower triangle: ~1/2 + 1/(2k)
# of the full product's work, panels computed side by side; larger panels keep the matmuls efficient
_PANEL = 192


def _panel_bounds(d: int) -> list[int]:
    k = d // _PANEL if d >= 2 * _PANEL else 1
    return [i * d // k for i in range(k + 1)]


class LowerGram:
    """Σ XᵀX over calibration batches, kept as its lower triangle in float64 row panels (rows
    a0:a1, columns :a1): about the memory of one float32 matrix, and a float64 sum of the
    batches' float32 products, so the float32 total does not depend on how the batches were
    grouped (one process adding them in turn, or data-parallel ranks adding their shares), up to
    a float64 rounding that lands on a float32 rounding boundary. finish() gives the symmetric
    float32 matrix, freeing the panels as it fills it."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.bounds = _panel_bounds(d)
        self.panels = [torch.zeros(a1 - a0, a1, dtype=torch.float64, device=device)
                       for a0, a1 in zip(self.bounds, self.bounds[1:])]

    def add(self, X: torch.Tensor, precision: str = "fp32") -> None:
        accumulate_gram(self, X, precision)

    def add_products(self, A: torch.Tensor) -> None:
        """Panels += A^T A's, each product in A's dtype and on one thread, the panels side by side
        (distributed.map_one_thread_each): the same numbers with any number of threads."""
        from lowbit.calib.distributed import map_one_thread_each

        def add(k):
            a0, a1 = self.bounds[k], self.bounds[k + 1]
            self.panels[k].add_(A[:, a0:a1].T @ A[:, :a1])

        map_one_thread_each(add, sorted(range(len(self.panels)), reverse=True))   # the widest panels first

    def all_reduce(self) -> None:
        """Sum the panels over data-parallel ranks (nothing in one process)."""
        from lowbit.calib.distributed import all_reduce_sum

        for panel in self.panels:
            all_reduce_sum(panel)

    def finish(self) -> torch.Tensor:
        d = self.bounds[-1]
        out = torch.empty(d, d, dtype=torch.float32, device=self.panels[0].device)
        for a0, a1 in zip(self.bounds, self.bounds[1:]):
            out[a0:a1, :a1] = self.panels.pop(0)
            out[:a0, a0:a1] = out[a0:a1, :a0].T
            block = out[a0:a1, a0:a1]   # a product's diagonal block: mirror its lower triangle
            block.copy_(torch.tril(block) + torch.tril(block, -1).T)
        return out


def _hinted_lower_gram(X: torch.Tensor) -> torch.Tensor:
    G = LowerGram(X.shape[1])
    with _bf16_matmul_hint():
        G.add_products(X)
    return G.finish()


def probe_bf16_products(product: Callable[[torch.Tensor], torch.Tensor] = _hinted_lower_gram) -> str:
    """BF16_ONEDNN if `product(X)` (lower triangle of X^T X, by default float32 matmuls under the
    bf16 hint, as accumulate_gram runs them) is the Gram of bf16(X) to fp32 accumulation for raw
    float32 inputs -- so the hardware really rounds the inputs, which is where the speed-up comes
    from -- and for already-rounded ones (what accumulate_gram passes), on one product and on the
    row panels of a wide input; BF16_EMULATED otherwise (the hint ignored, outputs or partial sums
    rounded to bf16, an error). The raw inputs have full fp32 mantissas: an fp32 product of them
    is 7e-4 (one product) and 1.5e-3 (panels) off the Gram of their bf16 roundings, 70x the tolerance."""
    g = torch.Generator().manual_seed(0)
    for n, d in ((256, 96), (64, 4 * _PANEL)):
        X = torch.randn(n, d, generator=g)
        Xb = X.to(torch.bfloat16).double()
        ref = torch.tril(Xb.T @ Xb)
        for inputs in (X, Xb.float()):
            try:
                H = torch.tril(product(inputs).double())
            except Exception:  # whatever goes wrong, the fast path is not used
                return BF16_EMULATED
            if not bool((H - ref).abs().max() / ref.abs().max() < _BF16_TOLERANCE):  # NaN fails too
                return BF16_EMULATED
    return BF16_ONEDNN


@functools.lru_cache(maxsize=None)
def _bf16_gram_path(device_type: str) -> str:
    return probe_bf16_products() if device_type == "cpu" else BF16_EMULATED


def bf16_gram_path(device: torch.device | str = "cpu") -> str:
    """Which path accumulate_gram(..., "bf16") takes on `device` (probed once per process):
    BF16_ONEDNN ("onednn-bf16") or BF16_EMULATED ("fp32-emulated"); recorded in the recipe."""
    return _bf16_gram_path(torch.device(device).type)


def accumulate_gram(G: LowerGram, X: torch.Tensor, precision: str = "fp32") -> None:
    """G += X^T X: float32 products of row panels of the lower triangle (wide inputs), added
    into G's float64 panels.

    fp32: float32 products (the default).
    bf16: products of bf16(X), accumulated in fp32 inside each product, the same numbers on every
        CPU (< 1e-5 relative to the float64 Gram of the bf16 inputs): the inputs are rounded
        here, so a product of two of them is exact in fp32 whichever kernel runs. Still a Gram
        matrix, so positive semi-definite, with inputs off by up to 2^-9; damping keeps it
        definite. Faster only where bf16_gram_path() finds oneDNN's bf16 kernels (expected with
        AMX; not measured here); elsewhere the products are float32 ("fp32-emulated"), a little
        slower than fp32 for the rounding. Measured on an AMD EPYC with AVX512-BF16, no AMX
        (torch 2.13, oneDNN 3.12 ignores the hint there): fp32-emulated; SmolLM2 W4 g32 GPTQ, 2
        shared cores, XᵀX 190-194 s instead of 160-178 s of ~950-1200 s in all, KLD 0.0940
        instead of 0.0951 (bench/results/hessian_precision.md, before the float64 sum). bf16
        matmuls on bf16 tensors, also chunked over K, are no alternative on the CPU: they round
        their outputs to bf16 (5e-4 to 3e-3 off)."""
    check_hessian_precision(precision)
    if precision == "fp32":
        G.add_products(X)
    else:
        Xb = X.to(torch.bfloat16).float()
        if bf16_gram_path(X.device) == BF16_ONEDNN:
            with _bf16_matmul_hint():
                G.add_products(Xb)
        else:
            G.add_products(Xb)


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
    experts: bool = False              # routed experts calibrated from their own tokens (calib.moe; staged)
    expert_min_tokens: int = 128       # below: that expert is calibrated on every token


class _StopForward(Exception):
    pass


@dataclasses.dataclass
class LayerHooks:
    """Calls around the runner's steps: a streamed run (lowbit.streaming) reads each layer's
    weights before it runs, writes and frees it after, and resumes at `first_layer` with the
    saved inputs `hidden` of that layer (one tensor per calibration batch)."""

    before_capture: Callable[[], None] = lambda: None
    after_capture: Callable[[], None] = lambda: None
    before_layer: Callable[[int], None] = lambda i: None
    after_layer: Callable[[int, list], None] = lambda i, outputs: None
    first_layer: int = 0
    hidden: list | None = None


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


def run_to_first_layer(model: torch.nn.Module, first_layer: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(hidden_states, kwargs) that the model passes to its first decoder layer for `ids`, the
    forward stopped there (under autograd the hidden states keep their graph to the embedding)."""
    got = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return got[0]


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, windows: torch.Tensor,
                         batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) that the model passes to its first decoder layer, per batch."""
    captured = []
    for i in range(0, windows.shape[0], batch_size):
        hidden, kwargs = run_to_first_layer(model, first_layer, windows[i: i + batch_size])
        captured.append((hidden.detach(), kwargs))
    return captured


@torch.no_grad()
def capture_layer_inputs_from_loop(first_layer: torch.nn.Module, forward_loop: Callable[[], None]) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) of every call to the first decoder layer while the user's
    `forward_loop()` runs the model on their own data (modelopt's pattern). The forward is not
    interrupted (the loop is the user's code), so each batch costs one full forward."""
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        # the user's loop may run with a KV cache: replaying a layer must not append to it
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value", "cache")}
        if "use_cache" in kw:
            kw["use_cache"] = False
        captured.append((hidden.detach().clone(), kw))

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_loop()
    finally:
        handle.remove()
    if not captured:
        raise SourceError("the forward_loop never ran the model's decoder layers; it must call model(...) on calibration data")
    return captured


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layers(model: torch.nn.Module, windows: torch.Tensor, targets: list[WeightTarget],
               quantize_layer: Callable[[int, list[WeightTarget], dict[str, InputStats]], None],
               request: StatsRequest, batch_size: int = 8, sequential: bool = True,
               progress: bool = True, seconds: dict | None = None,
               forward_loop: Callable[[], None] | None = None, hooks: LayerHooks | None = None) -> list[WeightTarget]:
    """Drive `quantize_layer(index, layer_targets, stats_by_target_name)` over the decoder layers.

    With sequential=True each layer sees inputs produced by the already-quantized layers before
    it. Returns the targets outside the decoder layers (the caller quantizes them without data).
    forward_loop, if given, replaces `windows`: the user's function that runs the model on data.
    `seconds`, if given, accumulates wall time per stage (capture, observe, quantize, propagate)."""
    import time

    hooks = hooks or LayerHooks()

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
    hooks.before_capture()
    if forward_loop is not None:
        batches = capture_layer_inputs_from_loop(layers[0], forward_loop)
    else:
        batches = capture_layer_inputs(model, layers[0], windows, batch_size)
    hooks.after_capture()
    if hooks.hidden is not None:
        batches = [(h, kwargs) for h, (_, kwargs) in zip(hooks.hidden, batches, strict=True)]
    tick("capture", t0)
    for i in tqdm(range(hooks.first_layer, len(layers)), desc="layers", disable=not progress, unit="layer",
                  initial=hooks.first_layer, total=len(layers)):
        hooks.before_layer(i)
        layer = layers[i]
        layer_targets = by_layer.get(i, [])
        if request.staged and sequential:
            outputs = _staged_layer(model, i, layer, layer_targets, batches, quantize_layer, request, tick)
        else:
            outputs = _two_pass_layer(model, i, layer, layer_targets, batches, quantize_layer, request, sequential, tick)
        hooks.after_layer(i, outputs)
        del layer   # a streamed run has released this layer: nothing here may keep it alive
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


def _discover_stages(model, layer, layer_targets, hidden, kwargs, request: StatsRequest) -> list[list[WeightTarget]]:
    """Groups of target modules sharing one input, in execution order, from one probe window.
    A routed-experts module is a stage of its own (first projection, then down_proj)."""
    from lowbit.calib.moe import first_projection, is_routed_experts

    order: list[tuple[WeightTarget, torch.Tensor | None]] = []
    hooks, seen_modules = [], set()
    for t in layer_targets:
        module = model.get_submodule(t.module_name)
        if t.kind == "experts":
            if not (request.experts and is_routed_experts(module)) or t.module_name in seen_modules:
                continue
            seen_modules.add(t.module_name)
            mine = sorted((x for x in layer_targets if x.module_name == t.module_name),
                          key=lambda x: x.param_name != first_projection(module))

            def experts_hook(_m, args, mine=mine):
                if all(mine[0] is not seen for seen, _ in order):
                    order.extend((x, None) for x in mine)

            hooks.append(module.register_forward_pre_hook(experts_hook))
            continue

        def hook(_m, args, t=t):
            if all(t is not seen for seen, _ in order):
                order.append((t, args[0]))

        hooks.append(module.register_forward_pre_hook(hook))
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
        if x is None:   # routed experts: never merged with a neighbour fed the same hidden states
            if stages and stages[-1][0].module_name == t.module_name:
                stages[-1].append(t)
            else:
                stages.append([t])
        elif prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape:
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

    from lowbit.calib.moe import ExpertInputs

    t0 = time.perf_counter()
    stages = _discover_stages(model, layer, layer_targets, *batches[0], request)
    stage_of = {t.name: k for k, st in enumerate(stages) for t in st}
    experts = [t for t in layer_targets if t.kind == "experts" and t.name not in stage_of]
    if experts:  # no observable input: quantized before the layer runs
        quantize_layer(i, experts, {})
    stats: dict[str, InputStats] = {}
    done: set[int] = set()
    hooks = []
    for k, stage in enumerate(stages):
        first = stage[0]
        if first.kind == "experts":   # park at the experts module with what it was given

            def experts_hook(module, args, kwargs, k=k, stage=stage):
                batch = _StagedBatch.current()
                if batch is None or k in done:
                    return
                inputs = stats.setdefault(stage[0].name, ExpertInputs(module, request.expert_min_tokens,
                                                                      request.hessian_precision))
                for t in stage:
                    stats[t.name] = inputs
                inputs.add(args[0] if args else kwargs["hidden_states"], args[1] if len(args) > 1 else kwargs["top_k_index"])
                batch.park(k)

            hooks.append(model.get_submodule(first.module_name).register_forward_pre_hook(experts_hook, with_kwargs=True))
            continue

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
            if stages[k][0].kind == "experts":   # down_proj's inputs come from the quantized first projection
                for t in stages[k]:
                    quantize_layer(i, [t], stats)
            else:
                quantize_layer(i, stages[k], stats)
            solve += time.perf_counter() - ts
            done.add(k)
    finally:
        for r in runs:
            r.abandon()
        for h in hooks:
            h.remove()
    early = {t.name for t in experts}
    never = [t for t in layer_targets if t.name not in early and stage_of.get(t.name) not in done]
    if never:  # modules the layer did not call: quantized without data
        quantize_layer(i, never, {})
    total = time.perf_counter() - t0
    tick("solve", time.perf_counter() - solve)  # tick adds (now - start): pass starts giving durations
    tick("observe_and_propagate", time.perf_counter() - (total - solve))
    return [r.out for r in runs]
