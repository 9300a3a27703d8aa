"""The format interface: how values are stored, apart from which values a method chooses.

A format works on weights viewed as a matrix (rows, cols), split along columns into groups.
Every per-group parameter has shape (rows, n_groups); tensor-level parameters are 0-d.

- ``tensor_params(W)``: parameters shared by the whole tensor (NVFP4's FP32 scale); default none.
- ``params_from_range(lo, hi, tensor_params)``: per-group parameters for the value range [lo, hi]
  an observer chose. Observers and MSE clipping search call this with shrunk ranges.
- ``params_from_blocks(blocks, tensor_params)``: optional; per-group parameters from the group's
  values themselves (ternary's absmean), bypassing the observer; None (default) = use the range.
- ``encode(W, p)`` / ``decode(codes, p)``: elementwise, with per-group parameters already
  expanded to W's shape, so GPTQ can call them one column at a time.
- ``store_params(p)`` / ``load_params(stored)``: the compact on-disk form (fp16 scales, E8M0
  exponents, double-quantized absmax...). Fitting always round-trips parameters through storage,
  so encode sees exactly the values decode will see.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from lowbit.errors import SchemeError

Params = dict[str, torch.Tensor]

FORMATS: dict[str, type["Format"]] = {}


@dataclasses.dataclass(frozen=True)
class Format:
    """Base class of all formats; subclasses are frozen dataclasses registered by ``name``."""

    name: ClassVar[str] = ""
    # "absmax" formats only look at max(|lo|, |hi|); "minmax" formats use both ends.
    range_kind: ClassVar[str] = "absmax"
    # Formats whose block size is fixed by a spec (MX: 32, NVFP4: 16) set this.
    fixed_group_size: ClassVar[int | None] = None

    @property
    def rows_independent(self) -> bool:
        """Whether a block of rows quantizes to the same codes and (per-row) parameters as it does
        inside the whole matrix, so a weight may be quantized a block of rows at a time. False
        where storage couples rows (NF4's double quantization, shared codebooks); tensor-level
        parameters (a per-tensor scale) are detected by the caller."""
        return True

    @property
    def decodes_row_blocks(self) -> bool:
        """Whether a block of rows decodes from its own codes and parameters (False where a
        transform mixes rows, as E8P's incoherence rotation does: decode the whole matrix)."""
        return True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            FORMATS[cls.name] = cls

    # --- to be provided by each format -------------------------------------------------
    @property
    def code_bits(self) -> int:
        """Bits of one stored code."""
        raise NotImplementedError

    def params_from_range(self, lo: torch.Tensor, hi: torch.Tensor, tensor_params: Params) -> Params:
        raise NotImplementedError

    # --- storage of codes: a bit stream of code_bits each, unless the format packs tighter -----
    def packed_nbytes(self, n_codes: int) -> int:
        from lowbit.formats.packing import packed_nbytes

        return packed_nbytes(n_codes, self.code_bits)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (rows, cols) -> 1-D uint8 as stored."""
        from lowbit.formats.packing import pack

        return pack(codes, self.code_bits)

    def unpack_codes(self, packed: torch.Tensor, n_codes: int) -> torch.Tensor:
        from lowbit.formats.packing import unpack

        return unpack(packed, self.code_bits, n_codes)

    def encode(self, W: torch.Tensor, p: Params) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, p: Params) -> torch.Tensor:
        raise NotImplementedError

    # --- defaults ---------------------------------------------------------------------
    def tensor_params(self, W: torch.Tensor) -> Params:
        """Parameters shared by the whole tensor; none by default."""
        return {}

    def params_from_blocks(self, blocks: torch.Tensor, tensor_params: Params,
                           importance: torch.Tensor | None = None) -> Params | None:
        """Per-group parameters from blocks (rows, n, size) when the format needs more than a range
        (absmean, a weighted search); None, the default, means "fit from the observer's range".
        importance: optional per-column weights (broadcast to blocks), e.g. diag(X^T X)."""
        return None

    def store_params(self, p: Params) -> Params:
        """Compact storage form of the parameters (default: as they are)."""
        return dict(p)

    def load_params(self, stored: Params) -> Params:
        """Float parameters from their stored form (default: cast to float32)."""
        return {k: v.float() for k, v in stored.items()}

    def config(self) -> dict:
        """JSON-serialisable description; ``make_format(**config)`` rebuilds the format."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def quantize_dequantize(self, W: torch.Tensor, p: Params) -> torch.Tensor:
        return self.decode(self.encode(W, p), p)


def make_format(name: str, **options) -> Format:
    """Build a registered format by name; unknown names or options are a SchemeError."""
    cls = FORMATS.get(name)
    if cls is None:
        raise SchemeError(f"unknown format {name!r}; choose one of: {', '.join(sorted(FORMATS))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise SchemeError(f"format {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(**options)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """torch.round rounds half to even, as IEEE casts do; named for clarity at call sites."""
    return torch.round(x)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value in a sorted 1-D table of levels (ties go to the lower index)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.to(x.dtype), right=False).to(torch.uint8)
