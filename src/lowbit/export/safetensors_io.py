"""A safetensors writer that never holds more than one tensor: what a streamed quantization
needs to write a file larger than memory.

Layout (valid for every safetensors reader): the 8-byte little-endian header length, the JSON
header ("__metadata__" first, its keys sorted; padded with spaces to a multiple of 8), then each
tensor's bytes, wider elements first and then by name. A tensor comes from memory or from a byte range of
another safetensors file (a part written earlier), copied in bounded chunks. The same tensors
give the same bytes whichever way they arrive, so a streamed output equals a resident one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from lowbit.model.files import check_safetensors

_CHUNK = 16 << 20   # bytes copied per step (a multiple of every element size)


def _dtypes() -> dict[str, torch.dtype]:
    """safetensors' dtype names -> torch dtypes (the library's own table)."""
    from safetensors.torch import _TYPES

    return _TYPES


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor's bytes inside a safetensors file on disk."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int     # absolute byte offsets in the file
    end: int
    as_dtype: str | None = None   # written converted to this dtype (e.g. a bf16 source kept as F32)

    @property
    def out_dtype(self) -> str:
        return self.as_dtype or self.dtype

    @property
    def nbytes(self) -> int:
        """Bytes as written."""
        if self.as_dtype is None:
            return self.end - self.begin
        return (self.end - self.begin) // _dtypes()[self.dtype].itemsize * _dtypes()[self.as_dtype].itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> torch.Tensor:
        """The tensor, read into fresh memory."""
        return self.read_rows(0, self.numel // self.shape[-1] if self.shape and self.shape[-1] else 1).reshape(self.shape)

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of the tensor viewed as (numel / last dim, last dim), read into fresh memory."""
        dtype = _dtypes()[self.dtype]
        cols = self.shape[-1] if self.shape else 1
        out = torch.empty((r1 - r0, cols), dtype=dtype)
        want = out.numel() * dtype.itemsize
        with open(self.file, "rb") as f:
            f.seek(self.begin + r0 * cols * dtype.itemsize)
            if want and f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != want:
                raise OSError(f"{self.file} ended early")
        return out

    def converted(self, dtype: str) -> "StoredTensor":
        return dataclasses.replace(self, as_dtype=None if dtype == self.dtype else dtype)

    def write_to(self, out) -> None:
        src = _dtypes()[self.dtype]
        dst = None if self.as_dtype is None else _dtypes()[self.as_dtype]
        buf = bytearray(min(_CHUNK, self.end - self.begin))
        with open(self.file, "rb") as f:
            f.seek(self.begin)
            left = self.end - self.begin
            while left:
                view = memoryview(buf)[: min(left, len(buf))]
                got = f.readinto(view)
                if not got:
                    raise OSError(f"{self.file} ended early")
                left -= got
                if dst is None:
                    out.write(view[:got])
                else:
                    out.write(torch.frombuffer(view[:got], dtype=src).to(dst).view(torch.uint8).numpy().data)


@dataclasses.dataclass(frozen=True)
class PiecedTensor:
    """A tensor whose bytes are other stored tensors' bytes one after another (each a whole
    number of rows of the (numel / last dim, last dim) view): per-expert checkpoint tensors
    read as the stacked experts a model holds, without copying anything. Reads and writes as a
    StoredTensor does."""

    pieces: tuple[StoredTensor, ...]
    shape: tuple[int, ...]

    @property
    def file(self) -> Path:
        return self.pieces[0].file

    @property
    def dtype(self) -> str:
        return self.pieces[0].dtype

    @property
    def out_dtype(self) -> str:
        return self.pieces[0].out_dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> torch.Tensor:
        return torch.cat([p.read().reshape(-1, self.shape[-1]) for p in self.pieces]).reshape(self.shape)

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        out, start = [], 0
        for p in self.pieces:
            rows = p.numel // self.shape[-1]
            lo, hi = max(r0, start), min(r1, start + rows)
            if lo < hi:
                out.append(p.read_rows(lo - start, hi - start))
            start += rows
        return torch.cat(out) if out else torch.empty((0, self.shape[-1]), dtype=_dtypes()[self.dtype])

    def converted(self, dtype: str) -> "PiecedTensor":
        return PiecedTensor(tuple(p.converted(dtype) for p in self.pieces), self.shape)

    def write_to(self, out) -> None:
        for p in self.pieces:
            p.write_to(out)


def stored_tensors(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a safetensors file as byte ranges (nothing read), and its metadata."""
    path = Path(path)
    check_safetensors(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    return ({name: StoredTensor(path, e["dtype"], tuple(e["shape"]), base + e["data_offsets"][0], base + e["data_offsets"][1])
             for name, e in header.items()}, meta)


def _entry(t, names) -> tuple[str, tuple[int, ...], int]:
    if isinstance(t, (StoredTensor, PiecedTensor)):
        return t.out_dtype, t.shape, t.nbytes
    if t.dtype not in names:
        raise TypeError(f"safetensors cannot store {t.dtype}")
    return names[t.dtype], tuple(t.shape), t.numel() * t.element_size()


def _write_tensor(out, t) -> None:
    if isinstance(t, (StoredTensor, PiecedTensor)):
        t.write_to(out)
        return
    flat = t.detach().reshape(-1).contiguous().cpu()
    step = _CHUNK // max(1, flat.element_size())
    for i in range(0, flat.numel(), step):
        out.write(flat[i: i + step].view(torch.uint8).numpy().data)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, "torch.Tensor | StoredTensor"],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (in memory or StoredTensor ranges) as one safetensors file at path."""
    dtypes = _dtypes()
    names = {v: k for k, v in dtypes.items()}
    # wider elements first, then by name: every tensor starts at a multiple of its element size
    # (as the safetensors library lays files out), so readers can map them without copying
    order = sorted(tensors, key=lambda n: (-dtypes[_entry(tensors[n], names)[0]].itemsize, n))
    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape, nbytes = _entry(tensors[name], names)
        if nbytes != math.prod(shape) * dtypes[dtype].itemsize:
            raise ValueError(f"{name}: {nbytes} bytes do not fill {dtype} {list(shape)}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name in order:
            _write_tensor(out, tensors[name])



INDEX_FILE = "model.safetensors.index.json"


def write_sharded(folder: str | os.PathLike, tensors: Mapping[str, "torch.Tensor | StoredTensor"],
                  metadata: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> list[str]:
    """Write `tensors` into folder as model.safetensors, or, when they exceed max_shard_bytes, as
    model-0000k-of-0000n.safetensors shards (in name order, a tensor larger than the limit alone
    in its shard) plus Hugging Face's model.safetensors.index.json. Returns the file names."""
    folder = Path(folder)
    names = {v: k for k, v in _dtypes().items()}
    sizes = {n: _entry(tensors[n], names)[2] for n in tensors}
    total = sum(sizes.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(folder / "model.safetensors", tensors, metadata)
        return ["model.safetensors"]
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for n in sorted(tensors):
        if shards[-1] and used + sizes[n] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(n)
        used += sizes[n]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for f, part in zip(files, shards):
        write_safetensors(folder / f, {n: tensors[n] for n in part}, metadata)
        weight_map.update({n: f for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX_FILE]


SPILL_BYTES = 64 << 20   # in-memory tensors a SpilledTensors holds before writing them out


class SpilledTensors(Mapping):
    """name -> tensor, for an exporter building more than memory holds: once the tensors in
    memory pass SPILL_BYTES they are written to a safetensors file in `folder` and kept as
    StoredTensor ranges. write_safetensors copies either kind byte for byte, so the output is
    the same whether anything spilled. The caller owns (and removes) `folder`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._tensors: dict[str, "torch.Tensor | StoredTensor"] = {}
        self._held: dict[str, torch.Tensor] = {}
        self._held_bytes = self._files = 0

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        if name in self._tensors:
            raise KeyError(f"{name} is already stored")
        self._tensors[name] = self._held[name] = t.detach().contiguous()
        self._held_bytes += t.numel() * t.element_size()
        if self._held_bytes > SPILL_BYTES:
            self.spill()

    def spill(self) -> None:
        """Write the tensors held in memory to a new file of folder; keep their byte ranges."""
        if not self._held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"spill-{self._files:05d}.safetensors"
        self._files += 1
        write_safetensors(path, self._held)
        self._tensors.update(stored_tensors(path)[0])
        self._held, self._held_bytes = {}, 0

    def __getitem__(self, name):
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)
