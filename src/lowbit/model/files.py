"""Checks of files that come from strangers, before any library parses them: a truncated or corrupt
file is one SourceError naming it and the fix, never a traceback from deep inside a reader.

safetensors: an 8-byte little-endian header length, a JSON header, then the tensors; every
tensor's data_offsets must lie inside the file and its dtype × shape must fill them exactly.
GGUF: the header, every key/value and the tensor table are walked with bounded reads (a claimed
length past the end of the file stops there, nothing is allocated from it), and every tensor's
bytes must lie inside the file."""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from pathlib import Path

from lowbit.errors import SourceError

_HEADER_LIMIT = 100 << 20     # safetensors caps its own header at 100 MB
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75, "E8M0": 1}


def check_json(path: Path) -> dict:
    """The parsed JSON object at path, or a SourceError saying where it breaks."""
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise SourceError(f"{path} is not text (corrupt?); restore or re-download it") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                          "fix it or re-download the model") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} must hold a JSON object, not {type(data).__name__}; re-download the model")
    return data


def check_safetensors(path: Path) -> None:
    """SourceError unless path is a complete safetensors file (header and every tensor's bytes)."""
    path = Path(path)
    size = path.stat().st_size
    fix = "re-download or re-save it"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path} is {size} bytes, too short for a safetensors file; {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > _HEADER_LIMIT or 8 + n > size:
            raise SourceError(f"{path} is truncated or not safetensors: its header claims {n} bytes, the file has "
                              f"{size}; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceError(f"{path} has a corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} has a corrupt safetensors header; {fix}")
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            if not all(type(x) is int and x >= 0 for x in (begin, end, *t["shape"])):
                raise ValueError   # sizes must be whole numbers (json reads 1e9, -1 and Infinity too)
            want = math.prod(t["shape"]) * _DTYPE_BYTES.get(t["dtype"], 0)
        except (KeyError, TypeError, ValueError, OverflowError):   # OverflowError: an offset of Infinity
            raise SourceError(f"{path}: tensor {name!r} has a malformed entry in the header; {fix}") from None
        if not 0 <= begin <= end <= data:
            raise SourceError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, the file holds "
                              f"{data}; {fix}")
        if t["dtype"] in _DTYPE_BYTES and want != end - begin:
            raise SourceError(f"{path}: tensor {name!r} ({t['dtype']} {t['shape']}) claims {end - begin} bytes for "
                              f"{want:g}; the file is corrupt; {fix}")


# GGUF value types: fixed sizes (8 = string, 9 = array)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Cursor:
    """Bounded reads over a byte buffer: a length that runs past the end is a SourceError."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        if n < 0 or self.pos + n > len(self.buf):
            raise SourceError(f"{self.path} is truncated or corrupt: a field at byte {self.pos} claims {n} bytes, "
                              f"the file has {len(self.buf)}; re-download it")
        self.pos += n
        return self.pos - n

    def u(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.u("<Q")
        i = self.take(n)
        return bytes(self.buf[i: i + n])

    def value(self, vtype: int, key: str = "") -> object:
        if vtype in _GGUF_SIZES:
            return self.take(_GGUF_SIZES[vtype]) if key != "general.alignment" else self.u("<I")
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.u("<I"), self.u("<Q")
            if etype in _GGUF_SIZES:
                self.take(n * _GGUF_SIZES[etype])
            elif etype == 8:
                for _ in range(n):
                    self.take(self.u("<Q"))
            else:
                raise SourceError(f"{self.path}: array of value type {etype} (nested arrays are not GGUF); re-download it")
            return None
        raise SourceError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}; the file is corrupt")


@functools.lru_cache(maxsize=16)
def _gguf_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """None when the header, the key/values and the tensor table parse and every tensor's bytes lie
    inside the file; else what is wrong. Reads the header only (the data is memory-mapped)."""
    import mmap

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        c.take(4)
        version = c.u("<I")
        if version not in (2, 3):
            return f"GGUF version {version}"
        n_tensors, n_kv = c.u("<Q"), c.u("<Q")
        alignment = 32
        for _ in range(n_kv):
            key = c.string().decode("utf-8", "replace")
            v = c.value(c.u("<I"), key)
            if key == "general.alignment":
                alignment = int(v) or 32
        tensors = []
        for _ in range(n_tensors):
            name = c.string().decode("utf-8", "replace")
            n_dims = c.u("<I")
            if n_dims > 8:
                return f"tensor {name!r} has {n_dims} dimensions"
            dims = [c.u("<Q") for _ in range(n_dims)]
            ttype, offset = c.u("<I"), c.u("<Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                return f"tensor {name!r} has unknown type {ttype}"
            tensors.append((name, math.prod(dims) // block * type_size, offset))
        data = -(-c.pos // alignment) * alignment
        for name, nbytes, offset in tensors:
            if data + offset + nbytes > size:
                return f"tensor {name!r} ends at byte {data + offset + nbytes}, the file has {size}"
    return None


def check_gguf(path: Path) -> None:
    """SourceError unless the file's header, key/values and tensor table parse within the file and
    every tensor's bytes lie inside it."""
    st = os.stat(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SourceError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
    why = _gguf_problem(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if why is not None:
        raise SourceError(f"{path} is truncated or corrupt ({why}); re-download it")
