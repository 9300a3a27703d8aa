"""GPTQ (Frantar et al. 2022): quantize columns in order, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer inputs.

Works with every format whose encode/decode are elementwise with fixed group parameters:
the solver only calls ``fmt.encode``/``fmt.decode`` on one column at a time.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from lowbit.calib.distributed import one_thread
from lowbit.calib.runner import StatsRequest
from lowbit.errors import SchemeError
from lowbit.formats import Format, Params
from lowbit.scheme import WeightScheme
from lowbit.sparsity import Pattern, exact_zero_codes, prune_mask
from lowbit.tensor import QuantizedTensor, expand_groups, fit_groups, group_index, resolve_group_size


@dataclasses.dataclass(frozen=True)
class Options:
    damp: float = 0.01          # fraction of the mean Hessian diagonal added to the diagonal
    block_size: int = 128       # lazy batch updates (columns per block)
    # process columns by decreasing Hessian diagonal; on by default: with static groups it costs
    # nothing in layout, and on SmolLM2 W4 g32 it halves KLD (0.147 -> 0.072)
    act_order: bool = True
    # rounds of scale refitting (0: off): the group scales that minimise the layer's output error
    # tr((W - Q) H (W - Q)^T) for GPTQ's codes (a least-squares solve per row), then GPTQ again
    # on those scales; the best pair seen is kept. Formats whose value is scale x f(code) only.
    refit: int = 0
    # weight each column's error by diag(X^T X) when fitting group parameters (what llama.cpp's
    # imatrix does); affects error-minimising fits: the mse observer and GGUF k-quant searches
    importance: bool = True


GPTQOptions = Options
STATS = StatsRequest(hessian=True, staged=True, channel_stats=False, experts=True)
# each weight is solved from the shared statistics alone: ranks can split the solving
SOLVES_EACH_WEIGHT = True


def fit_span(fmt: Format, group_size: int) -> int:
    """Columns whose parameters must be fitted together (k-quant super-blocks: 256)."""
    per_super = getattr(fmt, "per_super", None)
    return group_size * per_super if isinstance(per_super, int) else group_size


def prepare_hessian_inverse(H: torch.Tensor, damp: float, perm: torch.Tensor | None = None,
                            consume: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (float32, like the reference; float64
    only when float32 is not positive definite enough), of H or of H permuted by `perm`. One
    working copy, factored and inverted in place: for a 11008-wide input each copy is 485 MB.
    consume: H (float32) is that working copy -- permuted, factored and inverted in place, so
    the caller must not read it again (and float32 failing is an error: there is no H left for
    float64). The factor comes back as a column-major view (its transpose is contiguous)."""
    in_place = consume and H.dtype == torch.float32
    for dtype in (torch.float32, torch.float64):
        if in_place:
            A = H if perm is None else _permute_symmetric_(H, perm)
        else:
            A = H.clone() if perm is None else H[perm[:, None], perm]   # a fresh copy either way
        dead = torch.diag(A) == 0
        A[dead, dead] = 1.0
        A.diagonal().add_(damp * torch.mean(torch.diag(A)))
        # the symmetric copy read column-major: LAPACK works in that memory itself (a row-major
        # `out=` makes torch factor a column-major temporary, one more 485 MB, and copy back);
        # the same routine on the same values, so the same bits
        A = A.to(dtype).mT
        info = torch.empty((), dtype=torch.int32)
        with one_thread():
            torch.linalg.cholesky_ex(A, out=(A, info))
            if info == 0:
                torch.cholesky_inverse(A, out=A)
                torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
        if info == 0:
            return A.float()
        if in_place:
            # H is spent, and a float64 copy would cost twice its memory; with the default damp
            # (1% of the mean diagonal) float32 factors any input narrower than ~80,000
            raise SchemeError("the calibration Hessian is not positive definite in float32 at this damp; raise "
                              "--damp (e.g. 0.05) or use more calibration samples")
        del A
    raise SchemeError("the calibration Hessian is not positive definite even after dampening; raise --damp (e.g. 0.05) or use more calibration samples")


def _permute_symmetric_(A: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """A[perm][:, perm] written into A itself (no second matrix): the columns of a slab of rows
    at a time, then the rows along the permutation's cycles with one spare row."""
    n = A.shape[0]
    step = max(1, (1 << 22) // n)
    for r0 in range(0, n, step):
        A[r0: r0 + step] = A[r0: r0 + step, perm]
    p, seen = perm.tolist(), [False] * n
    for start in range(n):
        if seen[start] or p[start] == start:
            continue
        spare, i = A[start].clone(), start
        while True:                              # new row i = old row p[i], around the cycle
            seen[i] = True
            if p[i] == start:
                A[i] = spare
                break
            A[i] = A[p[i]]
            i = p[i]
    return A


def _params_at(p: Params, g: int) -> Params:
    return {k: (v[:, g: g + 1] if v.ndim == 2 else v) for k, v in p.items()}


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: Format, group_size: int, observer: str = "minmax",
                  percentile: float = 99.9, options: GPTQOptions = GPTQOptions(),
                  prune: Pattern | None = None, own: bool = False,
                  given: Params | None = None, own_hessian: bool = False) -> tuple[torch.Tensor, Params]:
    """Codes (rows, cols) and float group parameters for W (rows, cols) given H = X^T X (cols, cols).
    given: group parameters to keep (as stored), instead of fitting them.

    Group parameters are fitted on the error-updated weights when the solver reaches a group
    (as in the reference implementation); with act_order they are fitted up front on W
    ("static groups") so the stored group layout stays contiguous in the original column order.

    prune (SparseGPT, Frantar & Alistarh 2023): weights are dropped as the solver reaches them,
    those with the least w² / [H⁻¹]ᵢᵢ² (the OBS saliency) of each N:M group or, unstructured, of
    each lazy block's row; a dropped weight gets the code that decodes to 0 and its whole value
    becomes the error the later columns compensate. Columns stay in their order (no act_order):
    N:M groups are consecutive input columns. own: W is a float32 copy this call may modify;
    own_hessian: so is H (it becomes the inverse's factor: for a wide input, 485 MB less)."""
    if prune is not None and options.act_order:
        raise SchemeError("pruning keeps the columns in order: N:M groups are consecutive input columns; "
                          "turn act_order off")
    if getattr(fmt, "codebooks", None):
        raise SchemeError(f"{fmt.name} encodes 8 weights at a time, not one column: use --method aqlm (or rtn)")
    unit = getattr(fmt, "encode_unit", 0)     # vector grids: columns quantized together
    if unit and prune is not None:
        raise SchemeError(f"{fmt.name} encodes {unit} consecutive columns together; pruning drops single weights: "
                          "quantize with --method gptq alone, or prune into another format")
    W = W if own and W.dtype == torch.float32 else W.float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    gidx = group_index(cols, group_size)
    span = fit_span(fmt, group_size) if group_size else cols
    tensor_params = fmt.tensor_params(W)

    importance = torch.diag(H).float() if options.importance else None
    static = (given if given is not None else
              fit_groups(fmt, W, group_size, observer, percentile, tensor_params, importance)
              if (options.act_order or group_size == 0) else None)
    # work on W^T so each column is a contiguous row: the per-column steps touch contiguous memory
    if options.act_order:
        if unit:   # vector grids: whole units in order of their summed Hessian diagonal
            order = torch.argsort(torch.diag(H).reshape(-1, unit).sum(1), descending=True, stable=True)
            perm = (order[:, None] * unit + torch.arange(unit)).reshape(-1)
        else:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        Wt, col_group = W.T[perm].contiguous(), gidx[perm]   # (cols, rows), permuted columns
    else:
        perm, col_group = None, gidx
        Wt = W.T.contiguous()
    hdiag = None if not unit else (torch.diag(H).float() if perm is None else torch.diag(H).float()[perm])
    Hinv = prepare_hessian_inverse(H, options.damp, perm, consume=own_hessian)
    del W, H
    codes_t = torch.zeros(cols, rows, dtype=torch.uint8)
    fitted: dict[str, list[torch.Tensor]] = {}
    params: Params | None = static
    per_group: dict[int, Params] = {}                       # group -> params as (rows,) vectors
    # a fitting span (k-quant super-block) must not straddle lazily-updated blocks
    block = options.block_size if static is not None else max(options.block_size, span)
    if unit and block % unit:
        raise SchemeError(f"GPTQ block size {block} is not a multiple of {fmt.name}'s {unit}-column unit")
    if prune is not None and prune.structured and block % prune.m:
        raise SchemeError(f"GPTQ block size {block} is not a multiple of the {prune.label()} group")
    zero_codes: dict[int, torch.Tensor] = {}                # group -> codes decoding to 0 (pruning)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()   # rows of the block, contiguous (Hinv is column-major)
        if prune is not None and not prune.structured:      # each row's lowest share of this block
            saliency = W1.pow(2) / torch.diagonal(Hinv1).pow(2)[:, None]
            drop, drop_from = prune_mask(saliency.T, prune).T, 0
        for i in range(i2 - i1):
            col = i1 + i
            if static is None and col % span == 0:
                # the not-yet-quantized part of W must include the updates of this block
                Wt[i1:i2] = W1
                end = min(col + span, cols)
                part = fit_groups(fmt, Wt[col:end].T, group_size, observer, percentile, tensor_params,
                                  None if importance is None else importance[col:end])
                for k, v in part.items():
                    fitted.setdefault(k, []).append(v)
                params = {k: (torch.cat(v, dim=1) if v[0].ndim else v[0]) for k, v in fitted.items()}
                per_group.clear()
                zero_codes.clear()
            g = int(col_group[col])
            p = per_group.get(g)
            if p is None:
                p = per_group[g] = {k: (v[:, g].contiguous() if v.ndim == 2 else v) for k, v in params.items()}
            if unit:
                if i % unit == 0:
                    _vector_step(fmt, W1, Hinv1, Err1, codes_t, p, hdiag[col: col + unit], i, col, unit)
                continue
            w = W1[i]
            q_codes = fmt.encode(w, p)
            if prune is not None:
                if prune.structured and i % prune.m == 0:   # the next N:M group of columns
                    saliency = W1[i: i + prune.m].pow(2) / torch.diagonal(Hinv1)[i: i + prune.m].pow(2)[:, None]
                    drop, drop_from = prune_mask(saliency.T, prune).T, i
                z = zero_codes.get(g)
                if z is None:
                    z = zero_codes[g] = exact_zero_codes(fmt, p, rows)
                q_codes = torch.where(drop[i - drop_from], z, q_codes)
            err = (w - fmt.decode(q_codes, p)) / Hinv1[i, i]
            codes_t[col] = q_codes
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Wt[i1:i2] = W1
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
    codes = codes_t.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.contiguous(), params


def _vector_step(fmt, W1, Hinv1, Err1, codes_t, p, hdiag, i, col, unit) -> None:
    """Quantize columns i..i+unit of the lazy block W1 (columns as rows) together, then feed their
    joint error to the block's later columns: e = U_bb^-T (W_b - Q_b), W_later -= U_b,laterᵀ e
    (QuIP#'s BlockLDLQ; with unit 1 it is GPTQ's step)."""
    rows = W1.shape[1]
    X = W1[i: i + unit]                                           # (unit, rows)
    scale = p["scale"][:, None]
    q = fmt.encode_weighted(X.T, scale.expand(rows, unit // fmt.vector_dim), hdiag[None, :].expand(rows, unit))
    delta = X - fmt.decode(q, {"scale": scale}).T
    e = torch.linalg.solve_triangular(Hinv1[i: i + unit, i: i + unit].T, delta, upper=False)
    codes_t[col: col + unit] = q.T
    W1[i + unit:].addmm_(Hinv1[i: i + unit, i + unit:].T, e, alpha=-1)
    Err1[i: i + unit] = e


def quantize_weights_sharing_input(weights: list[torch.Tensor], H: torch.Tensor, scheme: WeightScheme,
                                   options: GPTQOptions, prune: Pattern | None = None,
                                   own_hessian: bool = False) -> list[tuple[torch.Tensor, Params, int]]:
    """GPTQ rows are independent given H: weights fed the same input (q/k/v, gate/up) are solved
    as one stacked matrix, then split back. Returns (codes, params, group_size) per weight.
    own_hessian: H is not read after this call (it is used up in place)."""
    fmt = scheme.make_format()
    if len(weights) > 1 and fmt.tensor_params(weights[0].float()):
        # a per-tensor scale (NVFP4) must stay per weight: solve them one by one
        return [_solve(w, H, fmt, scheme, options, prune) for w in weights]
    # the stacked copy is the solver's only reference: it is freed once the solver has transposed it
    codes, params, g = _solve(torch.cat([w.float() for w in weights], dim=0), H, fmt, scheme, options, prune,
                              own=True, own_hessian=own_hessian)
    out, r0 = [], 0
    for w in weights:
        r1 = r0 + w.shape[0]
        out.append((codes[r0:r1], {k: (v[r0:r1] if v.ndim == 2 else v) for k, v in params.items()}, g))
        r0 = r1
    return out


def _solve(W, H, fmt, scheme, options, prune=None, own=False, own_hessian=False):
    g = resolve_group_size(scheme.effective_group_size(), W.shape[1])
    if options.refit:   # refitting reads W and H again: neither is handed over
        codes, params = gptq_quantize(W, H, fmt, g, scheme.observer, scheme.percentile, options, prune)
        return (*_refit_rounds(W, H, fmt, g, scheme, options, codes, params), g)
    # the solver gets the only reference to W (a call moves its arguments into the callee), so a
    # stacked copy for q/k/v or gate/up (360 MB at 7B) is freed once the solver has transposed it
    box = [W]
    del W
    return (*gptq_quantize(box.pop(), H, fmt, g, scheme.observer, scheme.percentile, options, prune, own,
                           own_hessian=own_hessian), g)


def output_error(W: torch.Tensor, H: torch.Tensor, Q: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's summed squared output error over the calibration tokens."""
    D = (W.double() - Q.double())
    return float(((D @ H.double()) * D).sum())


def _scale_times_code(fmt: Format, codes: torch.Tensor, params: Params) -> torch.Tensor | None:
    """f(code) where the format decodes to scale x f(code) with one per-group `scale`; None otherwise."""
    if set(params) != {"scale"} or params["scale"].ndim != 2:
        return None
    V = fmt.decode(codes, {"scale": torch.ones(codes.shape)})
    if not torch.equal(fmt.decode(codes[:1], {"scale": torch.full(codes[:1].shape, 0.375)}), V[:1] * 0.375):
        return None
    return V


def refit_scales(fmt: Format, W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, params: Params,
                 group_size: int) -> Params | None:
    """For fixed codes, the per-group scales s minimising tr((W - Q) H (W - Q)^T) with
    Q[r, group a] = s[r, a] f(codes[r, group a]): per row, (V^T H V) s = V^T H w with V the row's
    block-diagonal code values -- as stored (the fp16 round trip). A group whose codes all decode
    to 0, or whose fitted scale changes sign, keeps its scale. None where the format is not
    scale x f(code) or the groups are ragged."""
    rows, cols = W.shape
    V = _scale_times_code(fmt, codes, params) if group_size and cols % group_size == 0 else None
    if V is None:
        return None
    nb, g = cols // group_size, group_size
    with one_thread():   # float64 sums: the same scales in one process and in data-parallel ranks
        Hd, V = H.double(), V.double()
        c = (V * (W.double() @ Hd)).reshape(rows, nb, g).sum(-1)
        A = torch.empty(rows, nb, nb, dtype=torch.float64)
        Hb = Hd.reshape(cols, nb, g).permute(1, 2, 0)                  # (nb, g, cols)
        step = max(1, (1 << 24) // (cols * nb))
        for r0 in range(0, rows, step):
            Vb = V[r0: r0 + step].reshape(-1, nb, g).transpose(0, 1)   # (nb, R, g)
            T = torch.bmm(Vb, Hb)                                      # (nb, R, cols): H_(:, b) v_b per row
            A[r0: r0 + step] = _gram_of_blocks(T, Vb)
        dead = A.diagonal(dim1=1, dim2=2) <= 0
        A = A + torch.diag_embed(dead.double())
        s = torch.linalg.solve(A, c.unsqueeze(-1)).squeeze(-1)
    old = params["scale"].double()
    s = torch.where(dead | (torch.sign(s) != torch.sign(old)), old, s)
    return fmt.load_params(fmt.store_params({"scale": s.float()}))


def _gram_of_blocks(T: torch.Tensor, Vb: torch.Tensor) -> torch.Tensor:
    """A[r, a, b] = v_(r,a)^T H_(a,b) v_(r,b) from T[b, r, :] = H[:, block b] v_(r,b) and Vb[a, r, :] = v_(r,a)."""
    nb, R, cols = T.shape
    g = Vb.shape[2]
    Tb = T.reshape(nb, R, nb, g)                                       # [b, r, a, k]
    return torch.einsum("brak,ark->rab", Tb, Vb)


def _refit_rounds(W, H, fmt, g, scheme, options, codes, params):
    """GPTQ's codes with refitted scales, then GPTQ on those scales, options.refit times; the pair
    with the least output error (GPTQ's own result included)."""
    def error(c, p):
        return output_error(W, H, fmt.decode(c, expand_groups(p, W.shape[1], g)))

    best = (error(codes, params), codes, params)
    for k in range(options.refit):
        fitted = refit_scales(fmt, W, H, codes, params, g)
        if fitted is None:
            raise SchemeError(f"--opt refit: {fmt.name} does not decode to one scale per whole group times a value "
                              "of the code (a zero point, a minimum or ragged groups); drop --opt refit or choose a "
                              "symmetric format")
        e = error(codes, fitted)
        if e < best[0]:
            best = (e, codes, fitted)
        if k + 1 < options.refit:
            codes, params = gptq_quantize(W, H, fmt, g, scheme.observer, scheme.percentile, options, given=fitted)
    return best[1], best[2]


def quantize_experts(w: torch.Tensor, inputs, target, scheme: WeightScheme, options: GPTQOptions,
                     prune: Pattern | None = None) -> QuantizedTensor:
    """GPTQ of stacked experts (E, out, in) — or (E, in, out) transposed — one expert at a time,
    each with the Hessian of the tokens its router sent it (calib.moe.expert_hessians). The codes
    stack in to_matrix's row order (expert by expert), so the result is one QuantizedTensor."""
    from lowbit.calib.moe import expert_hessians

    fmt = scheme.make_format()
    codes, params, g = [], [], 0
    for e, H in expert_hessians(inputs, target.param_name):
        W = w[e].transpose(0, 1) if target.transposed else w[e]
        c, p, g = _solve(W, H, fmt, scheme, options, prune)
        codes.append(c)
        params.append(p)
    if any(v.ndim != 2 for v in params[0].values()):
        raise SchemeError(f"{target.name}: {fmt.name} keeps one scale for the whole tensor, which experts solved one "
                          "by one cannot share; use a per-group format for experts, or --method rtn")
    return to_quantized_tensor(torch.cat(codes), {k: torch.cat([p[k] for p in params]) for k in params[0]}, g,
                               scheme, tuple(w.shape), target.transposed)


def to_quantized_tensor(codes, params, g, scheme: WeightScheme, shape, transposed) -> QuantizedTensor:
    fmt = scheme.make_format()
    # params were fitted through storage, so storing them again is exact for every format but
    # NF4 with double quantization, whose absmax may move by one 8-bit step (as with RTN)
    return QuantizedTensor(codes, fmt.store_params(params), fmt, g, tuple(shape), transposed)


def quantize_layer(model: torch.nn.Module, layer_targets, stats, scheme,
                   options: Options, prune: Pattern | None = None) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """GPTQ for the targets of one decoder layer (`scheme`: a WeightScheme or one per name);
    weights without observed inputs (stacked experts) fall back to RTN and are returned by name
    so the caller can record it. `prune`: SparseGPT's joint pruning (see gptq_quantize)."""
    from lowbit.methods import rtn
    from lowbit.scheme import scheme_of
    from lowbit.tensor import to_matrix

    from lowbit.calib.moe import ExpertInputs

    out, fallback = {}, []
    groups: dict[tuple, list] = {}
    for t in layer_targets:
        st = stats.get(t.name)
        ws = scheme_of(scheme, t.name)
        if isinstance(st, ExpertInputs):   # routed experts: each solved from its own tokens
            out[t.name] = quantize_experts(t.parameter(model).data, st, t, ws, options, prune)
            continue
        if st is None or st.hessian is None:
            if prune is not None:
                raise SchemeError(f"{t.name} saw no calibration inputs (a stacked expert?), so it cannot be "
                                  "pruned with a Hessian; exclude it or use --method wanda")
            out[t.name] = rtn.quantize_weight(t.parameter(model).data, ws, t.transposed)
            fallback.append(t.name)
            continue
        groups.setdefault((id(st), ws), []).append(t)
    readers = collections.Counter(sid for sid, _ in groups)   # groups solved from each statistics object
    for (sid, ws), members in groups.items():
        st = stats[members[0].name]
        mats = [to_matrix(t.parameter(model).data, t.transposed) for t in members]
        # the last group reading an input's XᵀX factors it in place (it is released after the stage)
        readers[sid] -= 1
        own = readers[sid] == 0
        solved = quantize_weights_sharing_input(mats, st.hessian, ws, options, prune, own_hessian=own)
        if own:
            st.hessian = None
        for t, (codes, params, g) in zip(members, solved):
            out[t.name] = to_quantized_tensor(codes, params, g, ws, t.parameter(model).shape, t.transposed)
    return out, fallback
