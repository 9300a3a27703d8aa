"""Fake quantization for training: the forward is the format's decode(encode(w)) bit for bit,
the backward a straight-through estimator (STE).

A target weight gets a `WeightFakeQuant` parametrization (torch.nn.utils.parametrize), so
nn.Linear, GPT-2's Conv1D and stacked 3-D expert weights are handled alike: the module keeps
its forward and reads a fake-quantized weight. Its group parameters are

- "lsq":   learned (LSQ, Esser et al. 2020; LSQ+, Bhalgat et al. 2020) -- integer formats. The
           scale, and a float minimum where the format has one, are trainable; gradients are the
           published ones: d w_hat / d s = round(w/s) - w/s inside the grid, the clamp level
           outside, scaled by 1 / sqrt(weights per scale * Q_p); d w_hat / d min = 1 outside
           the grid, 0 inside. An integer zero-point stays fixed.
- "fixed": the initial parameters (from the PTQ result it starts at) -- every format;
- "dynamic": refitted from the current weights at every forward with the scheme's observer
           (torchao-style fake quant) -- every format.

Parameters always go through the format's storage (fp16 scales, E4M3 block scales, ...)
before use, so `quantized()` returns codes and stored parameters whose decode equals the
training forward exactly: trained scales ship bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import parametrize

from lowbit.errors import SchemeError
from lowbit.formats import Params
from lowbit.formats.integer import IntFormat
from lowbit.scheme import WeightScheme
from lowbit.tensor import (QuantizedTensor, encode_matrix, expand_groups, fit_groups, from_matrix,
                           resolve_group_size, to_matrix)

SCALE_MODES = ("auto", "lsq", "fixed", "dynamic")


class _Straight(torch.autograd.Function):
    """Forward: `value` (computed without autograd); backward: the gradient to `x`, times
    `mask` where given (a clipped STE)."""

    @staticmethod
    def forward(ctx, x, value, mask):
        ctx.save_for_backward(mask)
        return value

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return (grad if mask.numel() == 0 else grad * mask), None, None


def straight_through(x: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`value` in the forward, identity (or `mask`) to `x` in the backward."""
    empty = torch.empty(0, dtype=x.dtype, device=x.device)
    return _Straight.apply(x, value.detach(), empty if mask is None else mask.to(x.dtype))


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward (exactly), gradient times `factor` in the backward (LSQ's g)."""
    return _GradScale.apply(x, factor)


def representable_range(fmt, p: Params, cols: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (rows, cols) smallest and largest value the grid of each group can decode to
    (every code decoded with the group's parameters; NaN codes ignored)."""
    levels = 1 << fmt.code_bits
    gs = cols if group_size == 0 else group_size
    n_groups = -(-cols // gs)
    rows = next((v.shape[0] for v in p.values() if v.ndim), 1)
    codes = torch.arange(levels, dtype=torch.uint8).repeat(n_groups).expand(rows, -1)
    values = fmt.decode(codes, expand_groups(p, n_groups * levels, levels)).reshape(rows, n_groups, levels)
    finite = torch.isfinite(values)
    lo = torch.where(finite, values, torch.inf).amin(-1)
    hi = torch.where(finite, values, -torch.inf).amax(-1)
    expand = lambda v: v.repeat_interleave(gs, dim=1)[:, :cols]  # noqa: E731
    return expand(lo), expand(hi)


def resolve_mode(mode: str, scheme: WeightScheme, clip_ste: bool = False) -> str:
    """The scale mode `mode` means for this scheme ("auto": LSQ for integers, else fixed);
    a mode, or --clip-ste, the scheme cannot take is refused."""
    fmt = scheme.make_format()
    if mode not in SCALE_MODES:
        raise SchemeError(f"unknown scale mode {mode!r}; use one of {', '.join(SCALE_MODES)}")
    if mode == "auto":
        mode = "lsq" if isinstance(fmt, IntFormat) else "fixed"
    if mode == "lsq" and not isinstance(fmt, IntFormat):
        raise SchemeError(f"learned (LSQ) scales need an integer format, not {fmt.name}; use --scales fixed or dynamic")
    if clip_ste and mode == "lsq":
        raise SchemeError("--clip-ste applies to fixed or dynamic scales; LSQ already passes no weight gradient "
                          "outside the grid (drop --clip-ste or pass --scales fixed)")
    return mode


class WeightFakeQuant(torch.nn.Module):
    """Parametrization: latent weight (its module's layout) -> fake-quantized weight.

    shape/transposed: the weight's layout (see lowbit.tensor.to_matrix); params: stored group
    parameters to start from (rows, n_groups), e.g. a PTQ result's QuantizedTensor.params; None
    fits them by the scheme's observer on the first weight seen (`init_params`)."""

    def __init__(self, scheme: WeightScheme, shape: tuple[int, ...], transposed: bool, mode: str = "auto",
                 params: Params | None = None, clip_ste: bool = False):
        super().__init__()
        self.scheme, self.fmt = scheme, scheme.make_format()
        self.shape, self.transposed = tuple(shape), transposed
        self.mode, self.clip_ste = resolve_mode(mode, scheme, clip_ste), clip_ste
        rows = math.prod(shape[:-2]) * (shape[-1] if transposed else shape[-2])
        cols = shape[-2] if transposed else shape[-1]
        self.rows, self.cols = rows, cols
        self.group_size = resolve_group_size(scheme.effective_group_size(), cols)
        self._names: list[str] = []
        if params is not None:
            self.init_params(params)

    def init_params(self, stored: Params) -> None:
        """Install starting parameters, as the format stores them (a QuantizedTensor's params)."""
        if self.mode == "dynamic":
            return
        for k in self._names:
            delattr(self, k)
        self._names = sorted(stored)
        floats = self.fmt.load_params(stored)
        for k in self._names:
            if self.mode == "lsq":
                v = floats[k].detach().clone()
                if k in ("scale", "min"):
                    self.register_parameter(k, torch.nn.Parameter(v))
                else:
                    self.register_buffer(k, v)
            else:
                self.register_buffer(k, stored[k].detach().clone())

    def fit(self, W: torch.Tensor) -> Params:
        """Stored parameters fitted to W by the scheme's observer."""
        p = fit_groups(self.fmt, W.detach(), self.group_size, self.scheme.observer, self.scheme.percentile)
        return self.fmt.store_params(p)

    def params(self, W: torch.Tensor) -> tuple[Params, Params]:
        """(float parameters the forward decodes with, the stored parameters they load from);
        the float ones carry autograd to learned parameters through the storage rounding."""
        if self.mode == "dynamic":
            stored = self.fit(W)
            return self.fmt.load_params(stored), stored
        if not self._names:
            self.init_params(self.fit(W))
        raw = {k: getattr(self, k) for k in self._names}
        if self.mode != "lsq":
            return self.fmt.load_params(raw), raw
        # LSQ's gradient scale g = 1 / sqrt(N * Q_p), N weights per scale
        n = self.cols * self.rows if self.group_size == 0 else self.group_size
        q_p = self.fmt.signed_offset - 1 if self.fmt.symmetric else self.fmt.qmax
        g = 1.0 / math.sqrt(n * q_p)
        learned = {k: grad_scale(v, g) if k in ("scale", "min") else v for k, v in raw.items()}
        stored = self.fmt.store_params({k: v.detach() for k, v in learned.items()})
        floats = self.fmt.load_params(stored)
        return {k: straight_through(learned[k], floats[k]) if k in ("scale", "min") else floats[k]
                for k in learned}, stored

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        W = to_matrix(w, self.transposed)
        if W.shape != (self.rows, self.cols):
            raise SchemeError(f"fake quantization was set up for a {self.rows}x{self.cols} weight, got {tuple(W.shape)}")
        p, _ = self.params(W)
        P = expand_groups(p, self.cols, self.group_size)
        with torch.no_grad():
            codes = self.fmt.encode(W.detach().float(), {k: v.detach() for k, v in P.items()})
        if self.mode == "lsq":
            What = self._lsq(W.float(), codes, P)
        else:
            value = self.fmt.decode(codes, P)
            mask = None
            if self.clip_ste:
                with torch.no_grad():
                    lo, hi = representable_range(self.fmt, p, self.cols, self.group_size)
                    mask = (W >= lo) & (W <= hi)
            What = straight_through(W, value.to(W.dtype), mask)
        return from_matrix(What.to(w.dtype), self.shape, self.transposed)

    def _lsq(self, W, codes, P):
        """decode(codes) with autograd to the parameters, plus LSQ's straight-through term
        s * (u - u.detach()) inside the grid: exactly 0 in value, d/dW = 1 there."""
        fmt = self.fmt
        S = P["scale"]
        if fmt.symmetric:
            u = W / S + fmt.signed_offset
        elif fmt.zero_point == "float":
            u = (W - P["min"]) / S
        else:
            u = W / S + P["zero"]
        inside = ((u.detach() >= 0) & (u.detach() <= fmt.qmax)).to(W.dtype)
        return fmt.decode(codes, P) + S * (u - u.detach()) * inside

    @torch.no_grad()
    def quantized(self, w: torch.Tensor) -> QuantizedTensor:
        """Codes and stored parameters of latent weight `w`: their decode is this module's forward."""
        W = to_matrix(w, self.transposed).float()
        p, stored = self.params(W)
        codes = encode_matrix(self.fmt, W, {k: v.detach() for k, v in p.items()}, self.group_size)
        return QuantizedTensor(codes, {k: v.detach().clone() for k, v in stored.items()}, self.fmt, self.group_size,
                               self.shape, self.transposed)


class InputFakeQuant(torch.nn.Module):
    """Forward pre-hook state: a module's input through lowbit.nn.act_quant (the quantized
    model's own run-time function), straight-through in the backward."""

    def __init__(self, spec: dict):
        super().__init__()
        from lowbit.nn.act_quant import validate_spec

        validate_spec(spec)
        self.spec = dict(spec)

    def __call__(self, _module, args):
        from lowbit.nn.act_quant import fake_quantize_input

        x = args[0]
        with torch.no_grad():
            xq = fake_quantize_input(x.detach(), self.spec)
        return (straight_through(x, xq),) + tuple(args[1:])


def add_weight_fake_quant(module: torch.nn.Module, param_name: str, fq: WeightFakeQuant) -> None:
    parametrize.register_parametrization(module, param_name, fq, unsafe=True)


def weight_fake_quant(module: torch.nn.Module, param_name: str) -> WeightFakeQuant | None:
    plist = getattr(getattr(module, "parametrizations", None), param_name, None)
    return None if plist is None else next((p for p in plist if isinstance(p, WeightFakeQuant)), None)


def latent_weight(module: torch.nn.Module, param_name: str) -> torch.nn.Parameter:
    return getattr(module.parametrizations, param_name).original


def remove_weight_fake_quant(module: torch.nn.Module, param_name: str) -> None:
    """Back to a plain parameter holding the latent weight."""
    parametrize.remove_parametrizations(module, param_name, leave_parametrized=False)
