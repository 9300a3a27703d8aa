"""Importance matrices in llama.cpp's files: collect them, write them, read them.

An importance matrix holds, per weight, the sum over calibration tokens of each input column's
squared activation (the diagonal of X^T X) and the number of tokens; llama-quantize divides one
by the other and weights each column's rounding error by it. Two file layouts, both read and
written here from llama.cpp's tools/imatrix and common/imatrix-loader:

- GGUF (``.gguf``, llama.cpp's default since 2025): ``general.type = "imatrix"``, string array
  ``imatrix.datasets``, u32 ``imatrix.chunk_count`` and ``imatrix.chunk_size``; per weight two F32
  tensors ``<gguf name>.in_sum2`` (n_in, n_mat) and ``<gguf name>.counts`` (1, n_mat);
- legacy (``.dat``): i32 entry count; per entry (names sorted) i32 name length, the name, i32
  ncall, i32 nval, nval f32 values = sum / tokens * ncall; then i32 chunk count, i32 length and
  the dataset's name. llama-quantize divides the values by ncall.

Names are the GGUF file's tensor names (``blk.0.attn_q.weight``): the architecture table of the
GGUF exporter maps them to the model's parameters. Input columns are in the model's order (the
q/k row permutation of llama.cpp's LLaMA layout moves rows, not columns).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from pathlib import Path

import torch

from lowbit.errors import DataError, SchemeError, SourceError

GGUF_SUFFIXES = (".in_sum2", ".counts")


@dataclasses.dataclass
class Imatrix:
    """Per GGUF tensor name: (sums (n_mat, n_in) float64, token counts (n_mat,) float64)."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    legacy: bool = False

    def mean_squares(self) -> dict[str, torch.Tensor]:
        """Per name, the importance llama-quantize uses: sums / counts, (n_in,) or (n_mat, n_in);
        a matrix no token reached gets ones (llama.cpp's choice)."""
        out = {}
        for name, (sums, counts) in self.entries.items():
            c = counts.reshape(-1, 1)
            mean = torch.where(c > 0, sums / c.clamp_min(1), torch.ones_like(sums)).float()
            out[name] = mean[0] if mean.shape[0] == 1 else mean
        return out


# ---- collection -----------------------------------------------------------------------------------

@torch.no_grad()
def collect(model: torch.nn.Module, targets, windows: torch.Tensor, batch_size: int = 8,
            progress: bool = True) -> dict[str, tuple[torch.Tensor, int | torch.Tensor]]:
    """Per target weight name: (sum over tokens of each input column's square, tokens), from the
    unquantized model run on `windows` (as llama-imatrix runs the model). Linear/Conv1D weights:
    (n_in,) sums and a token count. Routed stacked experts (calib.moe's contract): one row per
    expert, (n_experts, n_in) sums over the tokens its router sent it and (n_experts,) counts, as
    llama-imatrix records them; down_proj's inputs through each expert's gate/up. Other weights
    (embeddings) are refused."""
    from tqdm.auto import tqdm

    from lowbit.calib.moe import expert_input, is_routed_experts

    stats: dict[str, list] = {}
    hooks = []
    experts: dict[str, list] = {}   # module name -> its expert targets
    for t in targets:
        module = model.get_submodule(t.module_name)
        if t.kind == "experts" and is_routed_experts(module):
            experts.setdefault(t.module_name, []).append(t)
            continue
        if t.kind not in ("linear", "conv1d"):
            raise SchemeError(f"{t.name}: importance matrices are collected for Linear/Conv1D inputs and routed "
                              f"experts, not {t.kind} weights; --exclude it")
        n_in = t.parameter(model).shape[0 if t.transposed else 1]
        stats[t.name] = [torch.zeros(n_in, dtype=torch.float64), 0]

        def hook(_m, args, name=t.name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            stats[name][0] += x.square().sum(0)
            stats[name][1] += x.shape[0]
        hooks.append(module.register_forward_pre_hook(hook))
    for module_name, ts in experts.items():
        module = model.get_submodule(module_name)
        for t in ts:
            w = t.parameter(model)
            n_in = w.shape[1 if t.transposed else 2]
            stats[t.name] = [torch.zeros(w.shape[0], n_in, dtype=torch.float64), torch.zeros(w.shape[0], dtype=torch.float64)]

        def experts_hook(m, args, kwargs, ts=ts):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            for e in range(m.down_proj.shape[0]):
                rows = hidden[(index == e).any(dim=-1)].float()
                if not rows.shape[0]:
                    continue
                for t in ts:
                    x = expert_input(m, t.param_name, e, rows).double()
                    stats[t.name][0][e] += x.square().sum(0)
                    stats[t.name][1][e] += x.shape[0]
        hooks.append(module.register_forward_pre_hook(experts_hook, with_kwargs=True))
    try:
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="imatrix", disable=not progress, unit="batch"):
            model(windows[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: (s, c) for n, (s, c) in stats.items()}


def gguf_names(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name: GGUF tensor name} from the GGUF exporter's architecture table."""
    from lowbit.export.gguf import tensor_names

    return tensor_names(model)


# ---- writing ------------------------------------------------------------------------------------

def write(path: str | os.PathLike, stats: dict[str, tuple[torch.Tensor, int]], names: dict[str, str],
          chunk_count: int, chunk_size: int, dataset: str) -> Path:
    """Write `stats` (parameter name -> (sums, tokens)) as llama.cpp's GGUF imatrix, or its legacy
    layout when the path ends in .dat; atomically (a temporary file renamed)."""
    path = Path(path)
    if path.suffix == ".dat" and any(torch.as_tensor(c).numel() > 1 for _, c in stats.values()):
        raise SchemeError(f"-o {path}: the legacy .dat layout keeps one token count per weight, not one per expert; "
                          "write a .gguf importance matrix for a model with routed experts")
    from lowbit.export.gguf import split_gguf_names

    by_gguf = {}
    for name, (sums, count) in stats.items():
        if name not in names:
            raise SchemeError(f"{name} has no GGUF name for this architecture; --exclude it")
        for gname in split_gguf_names(name, names[name]):   # a fused gate_up: both halves see the same input
            by_gguf[gname] = (sums, count)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if path.suffix == ".dat":
            _write_legacy(tmp, by_gguf, chunk_count, chunk_size, dataset)
        else:
            _write_gguf(tmp, by_gguf, chunk_count, chunk_size, dataset)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_gguf(path: Path, by_gguf: dict, chunk_count: int, chunk_size: int, dataset: str) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="imatrix", use_temp_file=False)
    w.kv_data[0].pop("general.architecture", None)   # llama.cpp's imatrix files carry no architecture
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(by_gguf):   # llama.cpp sorts too: the same stats give the same bytes
        sums, count = by_gguf[name]   # one matrix, or stacked experts: sums (n_mat, n_in), counts (n_mat,)
        counts = np.asarray(count, dtype=np.float32).reshape(-1, 1)
        w.add_tensor(name + ".in_sum2", sums.float().numpy().reshape(counts.shape[0], -1))
        w.add_tensor(name + ".counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_legacy(path: Path, by_gguf: dict, chunk_count: int, chunk_size: int, dataset: str) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(by_gguf)))
        for name in sorted(by_gguf):
            sums, count = by_gguf[name]
            raw = name.encode()
            ncall = max(1, -(-int(count) // max(1, chunk_size)))   # llama.cpp: ceil(tokens / chunk size)
            values = (sums / max(1, count) * ncall).float() if count else torch.ones_like(sums, dtype=torch.float32)
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, sums.numel()))
            f.write(values.numpy().astype("<f4").tobytes())
        ds = dataset.encode()
        f.write(struct.pack("<ii", chunk_count, len(ds)) + ds)


# ---- reading ------------------------------------------------------------------------------------

def read(path: str | os.PathLike) -> Imatrix:
    """An imatrix file (GGUF or legacy), every size checked against the file before use."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"imatrix file {path} does not exist; pass llama-imatrix's output (.gguf or .dat) "
                          "or make one with `lowbit imatrix`")
    with open(p, "rb") as f:
        magic = f.read(4)
    return _read_gguf(p) if magic == b"GGUF" else _read_legacy(p)


def _read_gguf(p: Path) -> Imatrix:
    from gguf import GGUFReader

    from lowbit.model.files import check_gguf

    check_gguf(p)
    r = GGUFReader(p)

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()
    if field("general.type") != "imatrix":
        raise SourceError(f"{p} is a GGUF file but not an importance matrix (general.type is "
                          f"{field('general.type')!r}); pass llama-imatrix's output")
    tensors = {t.name: t for t in r.tensors}
    entries = {}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        base = tname[: -len(".in_sum2")]
        c = tensors.get(base + ".counts")
        if c is None:
            raise SourceError(f"{p}: {tname} has no {base}.counts; the file is corrupt")
        if t.tensor_type.name != "F32" or c.tensor_type.name != "F32":
            raise SourceError(f"{p}: {base}'s sums and counts must be F32; the file is corrupt")
        counts = torch.from_numpy(c.data.astype("float64").reshape(-1))
        sums = torch.from_numpy(t.data.astype("float64").reshape(counts.numel(), -1))
        entries[base] = (sums, counts)
    if not entries:
        raise SourceError(f"{p} holds no importance entries (*.in_sum2 tensors)")
    datasets = field("imatrix.datasets") or []
    return Imatrix(entries, [str(d) for d in datasets], int(field("imatrix.chunk_count") or 0),
                   int(field("imatrix.chunk_size") or 0))


def _read_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise SourceError(f"{p} is truncated or not an importance matrix (needs byte {pos + n}, has {len(data)}); "
                              "pass llama-imatrix's .dat or .gguf output")
        out = data[pos:pos + n]
        pos += n
        return out

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 1 or n_entries * 12 > len(data):
        raise SourceError(f"{p} is not an importance matrix (claims {n_entries} entries in {len(data)} bytes)")
    entries = {}
    for _ in range(n_entries):
        (n,) = struct.unpack("<i", take(4))
        name = take(n).decode("utf-8", "replace")
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1:
            raise SourceError(f"{p}: entry {name!r} has {nval} values; the file is corrupt")
        values = torch.frombuffer(bytearray(take(4 * nval)), dtype=torch.float32).double()
        # legacy values are mean * ncall: keep ncall as the count so sums / counts is the mean
        entries[name] = (values.reshape(1, -1), torch.tensor([float(ncall)], dtype=torch.float64))
    chunk_count, datasets = 0, []
    if pos < len(data):
        (chunk_count,) = struct.unpack("<i", take(4))
        if pos < len(data):
            (n,) = struct.unpack("<i", take(4))
            if n > 0:
                datasets.append(take(n).decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


def importance_for(model: torch.nn.Module, targets, imatrix: Imatrix) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({parameter name: per-input-column importance, (n_in,), or (n_experts, n_in) for stacked
    experts with an entry per expert}, names the file has no entry for)."""
    names = gguf_names(model)
    means = imatrix.mean_squares()
    found, missing = {}, []
    for t in targets:
        g = names.get(t.name)
        m = means.get(g) if g is not None else None
        if m is None:
            missing.append(t.name)
            continue
        p = t.parameter(model)
        n_in = p.shape[-2 if t.transposed else -1]
        per_expert = p.ndim == 3 and m.shape == (p.shape[0], n_in)   # one row per expert, as llama-imatrix writes
        if not per_expert and (m.ndim != 1 or m.numel() != n_in):
            raise DataError(f"imatrix entry {g} has {tuple(m.shape)} values, {t.name} has {n_in} input columns; "
                            "the importance matrix was made for another model")
        if not torch.isfinite(m).all() or (m < 0).any():
            raise DataError(f"imatrix entry {g} has negative or non-finite values; the file is corrupt")
        found[t.name] = m
    return found, missing


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (what a run records of the imatrix it read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

