"""FP8 training with delayed scaling (Transformer Engine's recipe, "HYBRID" format).

Forward tensors (a Linear's input and weight) are cast to E4M3, the output gradient to E5M2,
each with one per-tensor scale. Delayed scaling: the scale a step uses comes from the amax
history of the *previous* steps,

    scale = FP8_MAX / amax / 2^margin,   amax = max(history)  ("max")  or  history[-1]  ("most_recent"),

and every cast records its tensor's current amax into that history (the newest entry); the
history (length `history_len`) rolls once per step, in `FP8Recipe`-driven `update_scales()`
after the optimizer step. A scale starts at 1 and is kept while the reduced amax is 0 or not
finite. Values beyond the format's range saturate to ±FP8_MAX.

The GEMMs run on the FP8 values: torch._scaled_mm (CPU and GPU builds of torch 2.13 have it)
where the shapes allow, else the same products on the dequantized values in fp32. The master
weights stay fp32 and are what the optimizer updates.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: float(torch.finfo(E4M3).max), E5M2: float(torch.finfo(E5M2).max)}
REDUCTIONS = ("max", "most_recent")


@dataclasses.dataclass(frozen=True)
class FP8Recipe:
    """history_len: steps of amax kept per tensor (TE's default is 1024; 16 suits short
    fine-tunes); reduction: how a scale reads them; margin: extra headroom in powers of two
    (TE's DelayedScaling(margin, amax_history_len, amax_compute_algo), format HYBRID). A
    tensor that saw no cast in a step (an unused expert) keeps its history unrolled."""

    history_len: int = 16
    reduction: str = "max"
    margin: int = 0

    def __post_init__(self):
        if self.history_len < 1:
            raise SchemeError(f"the amax history needs at least 1 entry, got {self.history_len}")
        if self.reduction not in REDUCTIONS:
            raise SchemeError(f"unknown amax reduction {self.reduction!r}; use one of {', '.join(REDUCTIONS)}")


class ScaleState(torch.nn.Module):
    """One tensor's delayed scale: the scale in use and its amax history (newest last)."""

    def __init__(self, dtype: torch.dtype, recipe: FP8Recipe):
        super().__init__()
        self.dtype, self.recipe = dtype, recipe
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("amax_history", torch.zeros(recipe.history_len))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def record(self, x: torch.Tensor) -> None:
        """This step's amax (the largest over all casts of this tensor in the step)."""
        amax = x.detach().abs().amax().float()
        self.amax_history[-1] = torch.maximum(self.amax_history[-1], amax) if self.seen else amax
        self.seen.fill_(True)

    @torch.no_grad()
    def update(self) -> None:
        """New scale from the history, then roll it (the next step records into a fresh slot)."""
        if not self.seen:
            return
        h = self.amax_history
        amax = h.amax() if self.recipe.reduction == "max" else h[-1]
        new = FP8_MAX[self.dtype] / amax / (2.0 ** self.recipe.margin)
        ok = (amax > 0) & torch.isfinite(amax) & torch.isfinite(new)
        self.scale.copy_(torch.where(ok, new, self.scale))
        self.amax_history.copy_(torch.roll(h, -1))
        self.amax_history[-1] = 0.0
        self.seen.fill_(False)


def cast_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale to FP8, saturating at ±max (a plain cast would give NaN for E4M3)."""
    m = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-m, m).to(dtype)


def fp8_matmul(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(a / sa) @ (b / sb)^T for FP8 a (m, k), b (n, k), in fp32: torch._scaled_mm where the
    shapes are multiples of 16, else the dequantized product."""
    m, k = a.shape
    n = b.shape[0]
    if m % 16 == 0 and k % 16 == 0 and n % 16 == 0 and hasattr(torch, "_scaled_mm"):
        try:
            return torch._scaled_mm(a, b.t(), (1 / sa).float(), (1 / sb).float(), out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):
            pass
    return (a.float() / sa) @ (b.float() / sb).t()


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sx: ScaleState, sw: ScaleState, sg: ScaleState):
        lead = x.shape[:-1]
        X = x.reshape(-1, x.shape[-1])
        sx.record(X)
        sw.record(weight)
        Xq, Wq = cast_fp8(X, sx.scale, E4M3), cast_fp8(weight, sw.scale, E4M3)
        y = fp8_matmul(Xq, sx.scale, Wq, sw.scale)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(Xq, Wq, sx.scale.clone(), sw.scale.clone())
        ctx.sg, ctx.has_bias, ctx.lead = sg, bias is not None, lead
        return y.reshape(*lead, weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        Xq, Wq, scale_x, scale_w = ctx.saved_tensors
        sg = ctx.sg
        G = grad.reshape(-1, grad.shape[-1])
        sg.record(G)
        Gq = cast_fp8(G, sg.scale, E5M2)
        # dX = G W: (m, n) @ (n, k); dW = G^T X: (n, m) @ (m, k) -- both on FP8 operands
        gx = fp8_matmul(Gq, sg.scale, Wq.t().contiguous(), scale_w)
        gw = fp8_matmul(Gq.t().contiguous(), sg.scale, Xq.t().contiguous(), scale_x)
        gb = G.float().sum(0) if ctx.has_bias else None
        return gx.reshape(*ctx.lead, Xq.shape[1]).to(grad.dtype), gw, gb, None, None, None


class FP8Linear(torch.nn.Module):
    """nn.Linear trained in FP8 with delayed scaling; the weight is the fp32 master copy."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: FP8Recipe = FP8Recipe()):
        super().__init__()
        self.in_features, self.out_features, self.recipe = in_features, out_features, recipe
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.input_scale = ScaleState(E4M3, recipe)
        self.weight_scale = ScaleState(E4M3, recipe)
        self.grad_scale = ScaleState(E5M2, recipe)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, recipe: FP8Recipe = FP8Recipe()) -> "FP8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe)
        with torch.no_grad():
            m.weight.copy_(linear.weight.float())
            if linear.bias is not None:
                m.bias.copy_(linear.bias.float())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: the same casts, no backward state
            X = x.reshape(-1, x.shape[-1])
            y = fp8_matmul(cast_fp8(X, self.input_scale.scale, E4M3), self.input_scale.scale,
                           cast_fp8(self.weight, self.weight_scale.scale, E4M3), self.weight_scale.scale)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return _FP8LinearFunction.apply(x, self.weight, self.bias, self.input_scale, self.weight_scale, self.grad_scale)

    def update_scales(self) -> None:
        for s in (self.input_scale, self.weight_scale, self.grad_scale):
            s.update()

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"in={self.in_features}, out={self.out_features}, E4M3 forward / E5M2 grads, delayed scaling "
                f"(history {r.history_len}, {r.reduction}, margin {r.margin})")


def convert_to_fp8(model: torch.nn.Module, recipe: FP8Recipe = FP8Recipe(), include=None, exclude=None) -> list[str]:
    """Swap the model's target Linears (lowbit.model.targets rules: not lm_head, embeddings,
    routers) for FP8Linear, in place; returns their module names."""
    from lowbit.model.targets import select_targets, set_submodule

    names = [t.module_name for t in select_targets(model, include, exclude) if t.kind == "linear"]
    if not names:
        raise SchemeError("no Linear layers to train in FP8; loosen --include/--exclude")
    for name in names:
        set_submodule(model, name, FP8Linear.from_linear(model.get_submodule(name), recipe))
    return names


def update_scales(model: torch.nn.Module) -> None:
    """Delayed scaling's per-step update (call after each optimizer step)."""
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.update_scales()


def revert_fp8(model: torch.nn.Module) -> None:
    """FP8Linear back to nn.Linear holding the trained master weights (for saving)."""
    from lowbit.model.targets import set_submodule

    for name, m in list(model.named_modules()):
        if isinstance(m, FP8Linear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_submodule(model, name, lin)


@dataclasses.dataclass
class FP8TrainingResult:
    losses: dict[str, list[float]]   # "fp8" and, when compared, "fp32"
    layers: list[str]
    seconds: dict[str, float]
    model: torch.nn.Module           # the FP8-trained model (FP8Linear reverted to nn.Linear)


def run_fp8_training(model: torch.nn.Module, windows: torch.Tensor, schedule, recipe: FP8Recipe = FP8Recipe(),
                     batch_size: int = 1, seed: int = 0, compare_fp32: bool = True,
                     progress: bool = True) -> FP8TrainingResult:
    """Fine-tune every parameter with the target Linears in FP8 (delayed scaling) and, with
    compare_fp32, a copy of the same model in FP32 on the same batches and schedule."""
    import copy
    import time

    from lowbit.train.loop import next_token_loss, train_steps

    runs = {"fp8": model}
    if compare_fp32:
        runs["fp32"] = copy.deepcopy(model)
    layers = convert_to_fp8(model, recipe)
    losses, seconds = {}, {}
    for kind, m in runs.items():
        torch.manual_seed(seed)
        for p in m.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(m.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.0)
        t0 = time.perf_counter()
        losses[kind] = train_steps(m, opt, windows, schedule, batch_size, seed, lambda ids, m=m: next_token_loss(m, ids),
                                   after_step=(lambda _s, _l: update_scales(model)) if kind == "fp8" else None,
                                   desc=kind, progress=progress)
        seconds[kind] = time.perf_counter() - t0
    revert_fp8(model)
    return FP8TrainingResult(losses, layers, seconds, model)
