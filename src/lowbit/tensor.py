"""QuantizedTensor (codes + parameters + format) and the generic grouping that every format shares.

Weights are viewed as a matrix W (rows, cols) with cols the input dimension:
- nn.Linear weight (out, in): as is;
- transposed storage (GPT-2 Conv1D (in, out), experts marked ``is_transposed``): transposed;
- stacked experts (E, out, in): flattened to (E*out, in).
Groups run along cols. A group size that does not divide cols leaves a last, shorter group;
its parameters are fitted on its own values only, and the stored shape is unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import SchemeError
from lowbit.formats import Format, Params, make_format
from lowbit.observers import mse_search, observe


def to_matrix(w: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """(rows, cols=in_features) view of a weight of any supported layout."""
    if w.ndim < 2:
        raise SchemeError(f"cannot quantize a {w.ndim}-D tensor as a weight matrix; exclude it from the targets")
    if transposed:
        w = w.transpose(-1, -2)
    return w.reshape(-1, w.shape[-1])


def from_matrix(W: torch.Tensor, shape: tuple[int, ...], transposed: bool = False) -> torch.Tensor:
    """Inverse of to_matrix."""
    if transposed:
        inner = (*shape[:-2], shape[-1], shape[-2])
        return W.reshape(inner).transpose(-1, -2).contiguous()
    return W.reshape(shape)


def resolve_group_size(group_size: int, cols: int) -> int:
    """Concrete group size: -1 means the whole row (per channel); 0 (per tensor) stays 0."""
    if group_size == -1:
        return cols
    if group_size > cols:
        raise SchemeError(f"group size {group_size} is larger than the row length {cols}; use a smaller --group-size or -1 (per channel)")
    return group_size


def group_index(cols: int, group_size: int) -> torch.Tensor:
    """Group of each column: (cols,) long tensor."""
    if group_size == 0:
        return torch.zeros(cols, dtype=torch.long)
    return torch.arange(cols) // group_size


def expand_params(p: Params, gidx: torch.Tensor) -> Params:
    """Per-group parameters (rows, n_groups) -> per-column (rows, len(gidx)); tensor-level ones
    (0-d scales, codebooks: anything not 2-D) stay as they are."""
    return {k: (v[:, gidx] if v.ndim == 2 else v) for k, v in p.items()}


def expand_groups(p: Params, cols: int, group_size: int) -> Params:
    """expand_params for contiguous groups of group_size columns (the last one possibly
    shorter): the same values, by repetition instead of a gather (~15x faster)."""
    if group_size == 0:
        return {k: (v.expand(v.shape[0], cols) if v.ndim == 2 else v) for k, v in p.items()}
    return {k: (v.repeat_interleave(group_size, dim=1)[:, :cols] if v.ndim == 2 else v) for k, v in p.items()}


def _fit_blocks(fmt: Format, blocks: torch.Tensor, tensor_params: Params, observer: str, percentile: float,
                importance: torch.Tensor | None = None) -> Params:
    """Float parameters for blocks (rows, n, size), rounded through the format's storage;
    importance (1, n, size), if given, weights each column's error in searches."""

    def fit_once(lo, hi):
        p = fmt.params_from_range(lo, hi, tensor_params)
        return fmt.load_params(fmt.store_params({**p, **tensor_params}))

    p = fmt.params_from_blocks(blocks, tensor_params, importance)
    if p is not None:  # the format fits from the values themselves; observers do not apply
        return fmt.load_params(fmt.store_params({**p, **tensor_params}))
    lo, hi = observe(blocks, observer, percentile)
    if observer == "mse":
        return mse_search(blocks, fmt, tensor_params, fit_once, lo, hi, importance=importance)
    return fit_once(lo, hi)


def fit_groups(fmt: Format, W: torch.Tensor, group_size: int, observer: str = "minmax",
               percentile: float = 99.9, tensor_params: Params | None = None,
               importance: torch.Tensor | None = None) -> Params:
    """Float parameters (rows, n_groups) for matrix W, already exact in their stored precision.
    importance: optional (cols,) weights of each input column's error (diag of X^T X), used by
    error-minimising fits (the mse observer, llama.cpp-style k-quant searches)."""
    W = W.float()
    rows, cols = W.shape
    tp = fmt.tensor_params(W) if tensor_params is None else tensor_params
    imp = None if importance is None else importance.float().reshape(1, -1)
    if group_size == 0:
        return _fit_blocks(fmt, W.reshape(1, 1, -1), tp, observer, percentile,
                           None if imp is None else imp.expand(rows, -1).reshape(1, 1, -1))
    n_full, tail = divmod(cols, group_size)
    head = n_full * group_size
    parts = []
    if n_full:
        parts.append(_fit_blocks(fmt, W[:, :head].reshape(rows, n_full, group_size), tp, observer, percentile,
                                 None if imp is None else imp[:, :head].reshape(1, n_full, group_size)))
    if tail:
        parts.append(_fit_blocks(fmt, W[:, head:].reshape(rows, 1, tail), tp, observer, percentile,
                                 None if imp is None else imp[:, head:].reshape(1, 1, tail)))
    out = {}
    for k in parts[0]:
        vs = [pp[k] for pp in parts]
        out[k] = torch.cat(vs, dim=1) if vs[0].ndim else vs[0]
    return out


@dataclasses.dataclass
class QuantizedTensor:
    """A low-bit weight.

    codes:  (rows, cols) uint8, one unpacked code per weight (packed only when written);
    params: stored parameters, per group (rows, n_groups) or per tensor (0-d), in storage dtypes;
    format: the Format that encodes/decodes;
    group_size: resolved group size along cols (0 = one group for the whole tensor);
    shape:  the original parameter shape; transposed: original stores (..., in, out);
    input_quant: optional run-time quantization of the consuming Linear's input (W8A8,
            SmoothQuant), JSON-serialisable settings, see ``lowbit.nn.act_quant``.
    """

    codes: torch.Tensor
    params: Params
    format: Format
    group_size: int
    shape: tuple[int, ...]
    transposed: bool = False
    input_quant: dict | None = None

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def float_params(self) -> Params:
        return self.format.load_params(self.params)

    def dequantize_matrix(self) -> torch.Tensor:
        """The decoded (rows, cols) float32 matrix, a block of rows at a time (per-column copies of
        a large matrix's parameters would be several times the matrix)."""
        p, (rows, cols) = self.float_params(), self.codes.shape
        step = max(1, _ENCODE_ELEMENTS // max(1, cols))
        if rows <= step or not self.format.decodes_row_blocks:
            return self.format.decode(self.codes, expand_groups(p, cols, self.group_size))
        out = torch.empty(rows, cols, dtype=torch.float32)
        for r in range(0, rows, step):
            block = {k: (v[r: r + step] if v.ndim == 2 else v) for k, v in p.items()}
            out[r: r + step] = self.format.decode(self.codes[r: r + step], expand_groups(block, cols, self.group_size))
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded weight in its original shape and layout."""
        return from_matrix(self.dequantize_matrix(), self.shape, self.transposed).to(dtype)

    def packed_codes(self) -> torch.Tensor:
        return self.format.pack_codes(self.codes)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: packed codes plus stored parameters."""
        codes = self.format.packed_nbytes(self.numel)
        return codes + sum(v.numel() * v.element_size() for v in self.params.values())

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.numel

    def meta(self) -> dict:
        """JSON-serialisable description (everything but the tensors)."""
        meta = {"format": self.format.config(), "group_size": self.group_size, "shape": list(self.shape),
                "matrix_shape": list(self.codes.shape), "transposed": self.transposed,
                "params": sorted(self.params)}
        if self.input_quant is not None:
            meta["input_quant"] = dict(self.input_quant)
        return meta

    @classmethod
    def from_packed(cls, meta: dict, packed: torch.Tensor, params: Params) -> "QuantizedTensor":
        fmt_cfg = dict(meta["format"])
        fmt = make_format(fmt_cfg.pop("name"), **fmt_cfg)
        rows, cols = meta["matrix_shape"]
        codes = fmt.unpack_codes(packed, rows * cols).view(rows, cols)
        return cls(codes, params, fmt, meta["group_size"], tuple(meta["shape"]), meta["transposed"],
                   meta.get("input_quant"))


_ENCODE_ELEMENTS = 1 << 22   # weights encoded per step: per-column parameters of a whole 7B
                              # matrix would be several times the weight itself


def encode_matrix(fmt: Format, W: torch.Tensor, p: Params, group_size: int,
                  importance: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (rows, cols) for W with fitted float parameters p, a block of rows at a time
    (rows are independent given their parameters; tensor-level ones apply to every block).
    importance (cols,) reaches formats whose encoding weighs errors (vector grids); for the
    others nearest is nearest whatever the weights."""
    gidx = group_index(W.shape[1], group_size)
    step = max(1, _ENCODE_ELEMENTS // max(1, W.shape[1]))
    kw = {"importance": importance} if importance is not None and getattr(fmt, "vector_dim", 0) else {}

    def enc(rows: slice) -> torch.Tensor:
        pp = p if rows is None else {k: (v[rows] if v.ndim == 2 else v) for k, v in p.items()}
        return fmt.encode((W if rows is None else W[rows]).float(), expand_params(pp, gidx), **kw)

    if W.shape[0] <= step or not fmt.decodes_row_blocks:   # (a rotation across rows: encode whole)
        return enc(None)
    return torch.cat([enc(slice(r, r + step)) for r in range(0, W.shape[0], step)])


def quantize_tensor(w: torch.Tensor, scheme, transposed: bool = False,
                    importance: torch.Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest quantization of one weight under a WeightScheme (or QuantScheme);
    `importance` (columns,) weights each input column's error in the fits that search."""
    ws = getattr(scheme, "weights", scheme)
    fmt = ws.make_format()
    W = to_matrix(w.detach(), transposed).float()
    g = resolve_group_size(ws.effective_group_size(), W.shape[1])
    if importance is not None and importance.shape != (W.shape[1],):
        raise SchemeError(f"importance has shape {tuple(importance.shape)}, the weight has {W.shape[1]} input columns")
    p = fit_groups(fmt, W, g, ws.observer, ws.percentile, importance=importance)
    codes = encode_matrix(fmt, W, p, g, importance=importance)
    return QuantizedTensor(codes, fmt.store_params(p), fmt, g, tuple(w.shape), transposed)
