"""Packed Linear modules: a quantized weight held in its low-bit form at rest, multiplied through
torch's CPU kernels where one exists, else decoded per call into a bounded scratch buffer.

Kernels (chosen per weight by `choose_kernel`, the reason kept for `describe`):
- int4pack:  4-bit integer codes (sym, int zero or float min) in groups that are a multiple of
             32 -> `torch._weight_int4pack_mm_for_cpu`. Its dequant is (q - 8) * s + z per
             32..256-wide block, so every 4-bit affine form maps exactly: z = (8 - zero) * s, or
             min + 8 * s. Rows are padded to a multiple of 16, columns to the block.
- int8pack:  8-bit per-channel codes -> `torch._weight_int8pack_mm` (symmetric per-row scales);
             a zero-point or float minimum adds one rank-1 term, sum(x) * offset.
- int_mm:    W8A8 / W4A8 with per-channel int weights and int8 symmetric inputs (per token
             dynamic or static per tensor) -> `torch._int_mm` in int32, then both scales.
- scaled_mm: FP8 E4M3 per-channel weights with FP8 E4M3 inputs -> `torch._scaled_mm`
             (row-wise scales).
- decode:    any other format (NF4, MX, NVFP4, k-quants, grouped int8, 2/3-bit, ...): packed
             codes at rest; each call decodes row chunks of at most SCRATCH_ELEMENTS weights.
Inputs whose spec the kernel does not take natively are fake-quantized first, exactly as
`QuantLinear` does, so every kernel computes the model lowbit measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats.packing import pack, unpack
from lowbit.nn.act_quant import fake_quantize_input, outlier_columns, outlier_split_scale, validate_spec
from lowbit.tensor import QuantizedTensor, expand_groups

SCRATCH_ELEMENTS = 1 << 22     # decode path: at most 4M decoded weights (16 MB fp32) per chunk
INT4PACK_BLOCKS = (256, 128, 64, 32)
# torch's int4/int8 weight-only CPU kernels are fast only for bf16 inputs (fp32 runs a reference
# loop ~25x slower than a dense matmul): bf16 is the default, fp32 the exact reference path
COMPUTE_DTYPES = (torch.bfloat16, torch.float32)
INT_MM_GEMV_ROWS = 16


def _is_affine(fmt) -> bool:
    """Formats whose decode is w = code * scale + bias per group: lowbit's integers and
    llama.cpp's legacy and k-quant types."""
    from lowbit.formats.gguf_blocks import _KQuantFormat, _LegacyFormat

    return fmt.name == "int" or isinstance(fmt, (_LegacyFormat, _KQuantFormat))


def affine_form(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) per (row, group), fp32, with w = code * scale + bias exactly."""
    fmt, p = qt.format, qt.float_params()
    s = p["scale"]
    if fmt.name == "int":
        if fmt.symmetric:
            return s, -fmt.signed_offset * s
        return (s, p["min"]) if "min" in p else (s, -p["zero"] * s)
    return (s, p["min"]) if fmt.has_min else (s, -fmt.offset * s)


def _per_channel(qt: QuantizedTensor) -> bool:
    return qt.group_size == qt.codes.shape[1]


def _symmetric_int(qt: QuantizedTensor) -> bool:
    return qt.format.name == "int" and qt.format.symmetric


def _int8_input(spec: dict | None) -> bool:
    """Inputs the int_mm kernel takes: int8 symmetric, per token dynamic or static per tensor."""
    if spec is None or spec["format"] != "int" or spec["bits"] != 8 or not spec.get("symmetric", True):
        return False
    return (spec["dynamic"] and spec["granularity"] == "token") or (not spec["dynamic"] and spec["granularity"] == "tensor")


def _fp8_token_input(spec: dict | None) -> bool:
    return (spec is not None and spec["format"] == "fp8_e4m3" and spec["dynamic"]
            and spec["granularity"] == "token")


def choose_kernel(qt: QuantizedTensor) -> tuple[str, str]:
    """(kernel, why) for a quantized weight and its input spec."""
    fmt, spec = qt.format, qt.input_quant
    bits = fmt.code_bits
    affine = _is_affine(fmt)
    name = fmt.name + (str(bits) if fmt.name == "int" else "")
    if _symmetric_int(qt) and _per_channel(qt) and _int8_input(spec):
        return "int_mm", f"{name} per-channel sym weights, int8 inputs: torch._int_mm"
    if fmt.name == "fp8_e4m3" and _per_channel(qt) and _fp8_token_input(spec):
        return "scaled_mm", "fp8 e4m3 per-channel weights, fp8 per-token inputs: torch._scaled_mm"
    if affine and bits == 4 and qt.group_size > 0 and qt.group_size % 32 == 0:
        return "int4pack", f"{name} g{qt.group_size}: torch._weight_int4pack_mm_for_cpu"
    if affine and bits == 8 and _per_channel(qt):
        return "int8pack", f"{name} per-channel: torch._weight_int8pack_mm"
    if affine and bits == 4:
        why = "per tensor" if qt.group_size == 0 else f"group {qt.group_size} is not a multiple of 32"
    elif affine and bits == 8:
        why = f"8-bit in groups of {qt.group_size} (the int8 kernel takes one scale per row)"
    else:
        why = f"no CPU kernel for {name}"
    return "decode", why + ": decoded per call in chunks"


def _centered(qt: QuantizedTensor, center: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per (row, group) with w = (code - center) * scale + offset."""
    scale, bias = affine_form(qt)
    return scale, bias + center * scale


def _round_int8(x: torch.Tensor, sx: torch.Tensor, qmax: float, as_bf16: bool) -> torch.Tensor:
    """round(x / sx) clamped to +-qmax (half to even, as fake_quantize_input), as int8 codes, or
    as bf16 for the int8-weight GEMV (integers up to 127 are exact in bf16)."""
    q = torch.div(x, sx).round_().clamp_(-qmax, qmax)
    return q.to(torch.bfloat16 if as_bf16 else torch.int8)


# Linears that read one input (q/k/v, gate/up) get the same tensor object: its per-token int8
# codes are made once. The entry holds the tensor itself, so its memory cannot be reused by
# another tensor while cached, and `_version` catches in-place changes. Tensors made under
# torch.inference_mode have no version counter: there the model is trusted not to change a
# Linear's input in place before a sibling Linear reads it (no transformers model does).
_SHARED_INPUT: list = [None]


def _shared_dynamic_int8(x: torch.Tensor, qmax: float, as_bf16: bool,
                         key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-token scales) of x (2-D), reused when the previous call quantized the same
    `key` (the caller's input tensor, of which x is the fp32 (tokens, features) view)."""
    hit = _SHARED_INPUT[0]
    tag = None if key is None else (-1 if key.is_inference() else key._version, tuple(key.shape), qmax, as_bf16)
    if tag is not None and hit is not None and hit[0] is key and hit[1] == tag:
        return hit[2], hit[3]
    sx = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min_(1e-12)
    xq = _round_int8(x, sx, qmax, as_bf16)
    _SHARED_INPUT[0] = None if key is None else (key, tag, xq, sx)
    return xq, sx


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W held packed; see the module docstring for the kernels. The packed
    buffers are not part of the state dict: the lowbit folder (QuantizedTensor) is the saved form."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {compute_dtype} is not one of {COMPUTE_DTYPES}")
        self.compute_dtype = compute_dtype
        self.out_features, self.in_features = qt.codes.shape
        self.kernel, self.why = choose_kernel(qt)
        self.input_quant = dict(qt.input_quant) if qt.input_quant is not None else None
        if self.input_quant is not None:
            validate_spec(self.input_quant)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        getattr(self, "_init_" + self.kernel)(qt)

    # --- int4pack -----------------------------------------------------------------------------
    def _init_int4pack(self, qt: QuantizedTensor) -> None:
        rows, cols = qt.codes.shape
        block = next(b for b in INT4PACK_BLOCKS if qt.group_size % b == 0)
        k_pad = -(-cols // block) * block
        n_pad = -(-rows // 16) * 16
        scale, offset = _centered(qt, 8)
        # each kernel block lies inside one lowbit group (block | group size; a last partial
        # group starts at a multiple of the group size)
        gsel = torch.arange(0, k_pad, block).clamp(max=cols - 1) // qt.group_size
        sz = torch.stack([scale[:, gsel], offset[:, gsel]], dim=-1)          # (rows, blocks, 2)
        sz = F.pad(sz, (0, 0, 0, 0, 0, n_pad - rows), value=0.0)
        codes = F.pad(qt.codes.to(torch.int32), (0, k_pad - cols, 0, n_pad - rows), value=8)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False)
        # (blocks, n_pad, 2) in the compute dtype: the kernel takes no other
        self.register_buffer("scales_zeros", sz.transpose(0, 1).contiguous().to(self.compute_dtype), persistent=False)
        self.block, self.k_pad = block, k_pad

    def _mm_int4pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.k_pad != self.in_features:
            x = F.pad(x, (0, self.k_pad - self.in_features))
        y = torch._weight_int4pack_mm_for_cpu(x.to(self.compute_dtype).contiguous(), self.packed, self.block,
                                              self.scales_zeros)
        return y[:, : self.out_features].float()

    # --- int8pack -----------------------------------------------------------------------------
    def _init_int8pack(self, qt: QuantizedTensor) -> None:
        scale, offset = _centered(qt, 128)
        self.register_buffer("w_int8", (qt.codes.to(torch.int16) - 128).to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("w_scale", scale[:, 0].contiguous().to(self.compute_dtype), persistent=False)
        off = offset[:, 0]
        self.register_buffer("w_offset", off.contiguous() if bool(off.any()) else None, persistent=False)

    def _mm_int8pack(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.to(self.compute_dtype).contiguous(), self.w_int8, self.w_scale).float()
        if self.w_offset is not None:
            y = y + x.sum(dim=-1, keepdim=True) * self.w_offset
        return y

    # --- int_mm (W8A8, W4A8 per channel) ------------------------------------------------------
    def _init_int_mm(self, qt: QuantizedTensor) -> None:
        self.register_buffer("w_int8", (qt.codes.to(torch.int16) - qt.format.signed_offset).to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("w_scale", qt.float_params()["scale"][:, 0].contiguous(), persistent=False)
        self.register_buffer("_w_scale_bf16", self.w_scale.to(torch.bfloat16), persistent=False)
        self.input_qmax = 127.0

    def _mm_int_mm(self, x: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.input_quant
        if spec.get("outlier_threshold") is not None:   # LLM.int8: outlier columns in float
            t = spec["outlier_threshold"]
            outl = outlier_columns(x, t)
            sx = outlier_split_scale(x, t, self.input_qmax)
            if not outl.any():
                return self._int8_matmul(x, spec, sx)
            cols = outl.nonzero()[:, 0]
            w_out = self.w_int8[:, cols].float() * self.w_scale[:, None]
            return self._int8_matmul(x.index_fill(1, cols, 0.0), spec, sx) + x[:, cols] @ w_out.t()
        return self._int8_matmul(x, spec, shared=shared)

    def _int8_matmul(self, x: torch.Tensor, spec: dict, sx: torch.Tensor | None = None,
                     shared: torch.Tensor | None = None) -> torch.Tensor:
        gemv = x.shape[0] <= INT_MM_GEMV_ROWS and self.compute_dtype == torch.bfloat16
        if sx is None and spec["dynamic"]:
            xq, sx = _shared_dynamic_int8(x, self.input_qmax, gemv, shared)
        else:
            if sx is None:   # LLM.int8 passes the scales of its non-outlier values
                sx = torch.tensor(spec["scale"], dtype=torch.float32)
            xq = _round_int8(x, sx, self.input_qmax, gemv)
        if gemv:
            # a few rows (decoding): int8 codes are exact in bf16, and the bf16 int8-weight GEMV
            # is several times faster than _int_mm here; its output is rounded to bf16
            y = torch._weight_int8pack_mm(xq, self.w_int8, self._w_scale_bf16)
            return y.float() * sx
        acc = torch._int_mm(xq, self.w_int8.t())
        return acc.float() * sx * self.w_scale

    # --- scaled_mm (FP8 W8A8) -----------------------------------------------------------------
    def _init_scaled_mm(self, qt: QuantizedTensor) -> None:
        self.register_buffer("w_fp8", qt.codes.contiguous().view(torch.float8_e4m3fn), persistent=False)
        self.register_buffer("w_scale", qt.float_params()["scale"][:, 0].reshape(1, -1).contiguous(), persistent=False)

    def _mm_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        sx = (x.abs().amax(dim=-1, keepdim=True) / 448.0).clamp_min(1e-12)
        x8 = (x / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x8, self.w_fp8.t(), scale_a=sx, scale_b=self.w_scale, out_dtype=torch.float32)

    # --- decode per call ----------------------------------------------------------------------
    def _init_decode(self, qt: QuantizedTensor) -> None:
        rows, cols = qt.codes.shape
        self.format, self.group_size = qt.format, qt.group_size
        # a format whose decode mixes rows (E8P's rotation) decodes whole: its scratch is the matrix
        self.chunk_rows = (max(1, min(rows, SCRATCH_ELEMENTS // max(1, cols))) if qt.format.decodes_row_blocks
                           else rows)
        self.code_bits = qt.format.code_bits
        n_chunks = -(-rows // self.chunk_rows)
        self.chunks = []    # (packed codes, params) per row chunk: nothing dense at rest
        for i in range(n_chunks):
            r0, r1 = i * self.chunk_rows, min(rows, (i + 1) * self.chunk_rows)
            params = {k: (v[r0:r1].clone() if v.ndim == 2 else v.clone()) for k, v in qt.params.items()}
            self.chunks.append((qt.format.pack_codes(qt.codes[r0:r1]), params, r1 - r0))

    def decoded_chunks(self):
        """(row offset, decoded fp32 rows) per chunk, decoded now."""
        r0 = 0
        for packed, params, n in self.chunks:
            codes = self.format.unpack_codes(packed, n * self.in_features).view(n, self.in_features)
            yield r0, self.format.decode(codes, expand_groups(self.format.load_params(params), self.in_features,
                                                              self.group_size))
            r0 += n

    def _mm_decode(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.chunks) == 1:
            return F.linear(x, next(self.decoded_chunks())[1])
        out = x.new_empty(x.shape[0], self.out_features)
        for r0, w in self.decoded_chunks():
            out[:, r0: r0 + w.shape[0]] = F.linear(x, w)
        return out

    # --- common -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.input_quant is not None and self.kernel not in ("int_mm", "scaled_mm"):
            x2 = fake_quantize_input(x2, self.input_quant)
        # int_mm: x itself (not its reshaped copy) identifies an input other Linears share
        y = self._mm_int_mm(x2, x) if self.kernel == "int_mm" else getattr(self, "_mm_" + self.kernel)(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(dtype)

    @property
    def resident_bytes(self) -> int:
        """Bytes this module holds (buffers, chunks, bias)."""
        n = sum(b.numel() * b.element_size() for b in self.buffers())
        for packed, params, _ in getattr(self, "chunks", ()):
            n += packed.numel() + sum(v.numel() * v.element_size() for v in params.values())
        return n

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class PackedEmbedding(torch.nn.Module):
    """An embedding table held packed, row by row; a lookup decodes only the rows it gathers.
    (A tied output head gets its own PackedLinear over the same QuantizedTensor.)"""

    def __init__(self, qt: QuantizedTensor, padding_idx: int | None = None):
        super().__init__()
        if qt.transposed or len(qt.shape) != 2:
            raise ValueError("a packed embedding needs a (vocab, dim) table")
        self.num_embeddings, self.embedding_dim = qt.codes.shape
        self.padding_idx = padding_idx
        self.format, self.group_size, self.code_bits = qt.format, qt.group_size, qt.format.code_bits
        row_bits = self.embedding_dim * self.code_bits
        # rows start on a byte when dim * bits is a multiple of 8 (576 * any bits is); else one
        # byte per code keeps the gather simple
        self.row_packed = row_bits % 8 == 0
        codes = pack(qt.codes, self.code_bits).view(self.num_embeddings, -1) if self.row_packed else qt.codes.clone()
        self.register_buffer("codes", codes, persistent=False)
        for k, v in qt.params.items():
            self.register_buffer("param_" + k, v.clone(), persistent=False)
        self.param_names = tuple(qt.params)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.codes[flat]
        if self.row_packed:
            rows = unpack(rows, self.code_bits, flat.numel() * self.embedding_dim).view(flat.numel(), self.embedding_dim)
        params = {}
        for k in self.param_names:
            v = getattr(self, "param_" + k)
            params[k] = v[flat] if v.ndim else v
        out = self.format.decode(rows, expand_groups(self.format.load_params(params), self.embedding_dim,
                                                     self.group_size))
        return out.reshape(*ids.shape, self.embedding_dim)

    @property
    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format.name}, packed rows"

