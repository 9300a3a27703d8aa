"""Data-parallel calibration on torch.distributed (gloo on CPU, NCCL where GPUs are).

Every rank runs the same quantization on its own contiguous share of the calibration windows.
Before a group of weights is solved, the ranks all-reduce what calibration collected (XᵀX and
token counts summed, channel maxima maxed, mean |X| summed, the first sample rows gathered in
window order), so every rank holds the statistics one process would have. Methods whose weights
are solved one by one from those statistics (GPTQ, SparseGPT) split the solving: each weight has
an owner rank, which solves it and broadcasts the result (codes and parameters as raw bytes,
never pickles); other methods are solved by every rank alike. Each rank then runs its windows
through the quantized layer. Only rank 0 writes outputs.

The result is the single process's, bit for bit: shares are cut at whole calibration batches (the
same float32 products), XᵀX is summed in float64 (any grouping of batches gives the same float32
total), and the products and factorizations whose rounding depends on the thread count run on
one thread each (one_thread, map_one_thread_each), so a rank with one core computes what a
process with all of them does.

`lowbit quantize ... --workers N` starts N local ranks (spawn_workers); `torchrun -m lowbit
quantize ...` works the same way through its environment (RANK, WORLD_SIZE, MASTER_ADDR).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

import torch

from lowbit.errors import SchemeError


@contextlib.contextmanager
def one_thread():
    """Run the block on one thread. torch's MKL splits a product's inner dimension over threads
    for some shapes (the Gram panels of calibration: K = a batch's tokens) and factorizes in
    thread-dependent blocks, so their rounding depends on the thread count, where other matmuls'
    does not (measured): inside this block one process with every core and data-parallel ranks
    with a share each compute the same numbers."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_POOLS: dict = {}


def map_one_thread_each(fn, items: list) -> list:
    """[fn(x) for x in items], each call on one thread (so its numbers do not depend on the
    thread count, see one_thread), as many calls at once as this process has threads."""
    n = min(torch.get_num_threads(), len(items))
    with one_thread():
        if n <= 1:
            return [fn(x) for x in items]
        if n not in _POOLS:
            from concurrent.futures import ThreadPoolExecutor

            _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="lowbit-one-thread")

        def single(x):
            torch.set_num_threads(1)   # a worker's own OpenMP/MKL setting; the caller restores the global one
            return fn(x)

        return list(_POOLS[n].map(single, items))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d is not None else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def agree_min(value: int) -> int:
    """The smallest `value` over the ranks."""
    d = _dist()
    if d is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    d.all_reduce(t, op=d.ReduceOp.MIN)
    return int(t)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, in place (t itself in one process)."""
    d = _dist()
    if d is not None:
        d.all_reduce(t)
    return t


def init_from_environment() -> bool:
    """Join the process group torchrun (or spawn_workers) describes in the environment; False
    when there is none. gloo, so CPU tensors reduce (the calibration here runs on the CPU)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("gloo")
    return True


def share(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (rank 0 first, as one process
    would see them), cut at whole batches of `batch_size`: each batch then holds the same windows
    as in one process, so its float32 products are the same. Fewer batches than ranks is refused:
    a rank with no data has no statistics."""
    rank, size = world()
    if size == 1:
        return windows
    n = windows.shape[0]
    batches = -(-n // batch_size)
    if batches < size:
        raise SchemeError(f"{n} calibration windows in batches of {batch_size} cannot be split over {size} ranks; "
                          f"use --samples {size * batch_size} or more, or fewer --workers")
    bounds = [min(n, batch_size * (batches * r // size)) for r in range(size + 1)]
    return windows[bounds[rank]: bounds[rank + 1]]


def _check_same(value: int, what: str) -> None:
    """Every rank must agree on `value` (the same layer, the same weights): else a SchemeError."""
    d = _dist()
    t = torch.tensor([value, -value], dtype=torch.int64)
    d.all_reduce(t, op=d.ReduceOp.MAX)
    if int(t[0]) != value or int(-t[1]) != value:
        raise SchemeError(f"the ranks disagree on {what}; every rank must run the same command on the same model "
                          "and calibration data")


def check_same_run(*parts) -> None:
    """Every rank must quantize the same weights under the same recipe on the same calibration
    text: a digest of `parts` (strings, tensors) is compared across ranks."""
    import hashlib

    if _dist() is None:
        return
    h = hashlib.sha256()
    for p in parts:
        h.update(p.contiguous().view(torch.uint8).numpy().tobytes() if isinstance(p, torch.Tensor) else str(p).encode())
    _check_same(int.from_bytes(h.digest()[:7], "little"), "the model, the recipe or the calibration data")


def reduce_stats(stats: dict, names: list[str], sample_rows: int) -> None:
    """All-reduce the InputStats of `names` in place (objects shared between names once)."""
    d = _dist()
    if d is None:
        return
    from lowbit.calib.runner import InputStats

    seen = []
    for name in sorted(names):
        st = stats.get(name)   # routed experts' inputs reduce their own statistics (calib.moe)
        if isinstance(st, InputStats) and all(st is not s for s in seen):
            seen.append(st)
    _check_same(len(seen), "which weights saw calibration inputs")
    if any(st.finished for st in seen):
        raise RuntimeError("calibration statistics were reduced after they were finished")
    for st in seen:
        n = torch.tensor([st.n_tokens], dtype=torch.int64)
        d.all_reduce(n)
        st.n_tokens = int(n)
        if st.hessian is not None:
            st.hessian.all_reduce()
        if st.absmax is not None:
            d.all_reduce(st.absmax, op=d.ReduceOp.MAX)
        if st.abssum is not None:
            d.all_reduce(st.abssum)
        if sample_rows and st.sample is not None:
            st.sample = _gather_rows(st.sample)[:sample_rows]


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank's x, in rank order (ranks may hold different numbers of rows)."""
    d = _dist()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(d.get_world_size())]
    d.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64))
    most = int(max(counts))
    padded = torch.zeros(most, *x.shape[1:], dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    d.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)])


def owners(sizes: dict[str, int], size: int) -> dict[str, int]:
    """Which rank solves each weight (name -> number of weights): largest first onto the least
    loaded rank (ties: the lower rank), so every rank computes the same assignment."""
    load = [0] * size
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(size), key=lambda k: (load[k], k))
        out[name] = r
        load[r] += sizes[name]
    return out


def _broadcast_bytes(data: bytes | None, src: int) -> bytes:
    d = _dist()
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    d.broadcast(n, src)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None else torch.empty(int(n), dtype=torch.uint8)
    d.broadcast(buf, src)
    return buf.numpy().tobytes()


def _broadcast_tensor(t: torch.Tensor | None, dtype: torch.dtype, shape: list[int], src: int) -> torch.Tensor:
    d = _dist()
    count = 1
    for s in shape:
        count *= s
    raw = t.contiguous().reshape(-1).view(torch.uint8) if t is not None else torch.empty(count * dtype.itemsize, dtype=torch.uint8)
    d.broadcast(raw, src)
    return raw.view(dtype).reshape(shape)


def broadcast_quantized(qt, src: int):
    """The QuantizedTensor of rank `src` on every rank (its packed codes and stored parameters)."""
    from lowbit.tensor import QuantizedTensor

    mine = world()[0] == src
    header = None
    if mine:
        packed = qt.packed_codes()
        header = json.dumps({"meta": qt.meta(), "codes": [str(packed.dtype).removeprefix("torch."), list(packed.shape)],
                             "params": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in qt.params.items()}},
                            sort_keys=True).encode()
    info = json.loads(_broadcast_bytes(header, src))
    dtype, shape = info["codes"]
    codes = _broadcast_tensor(packed if mine else None, getattr(torch, dtype), shape, src)
    params = {}
    for name in sorted(info["params"]):
        dtype, shape = info["params"][name]
        params[name] = _broadcast_tensor(qt.params[name] if mine else None, getattr(torch, dtype), shape, src)
    return qt if mine else QuantizedTensor.from_packed(info["meta"], codes, params)


def solve_split(solve, layer_targets: list, sizes: dict[str, int], splittable: bool) -> tuple[dict, list[str]]:
    """Run `solve(targets) -> (tensors by name, fallback names)` with the work split over ranks
    when the method solves each weight on its own (splittable), else on every rank alike.
    sizes: weights per target name (the split balances them)."""
    rank, size = world()
    if size == 1 or not splittable or len(layer_targets) < 2:
        return solve(layer_targets)
    _check_same(len(layer_targets), "the weights of this layer")
    owner = owners({t.name: sizes[t.name] for t in layer_targets}, size)
    out, fallbacks = solve([t for t in layer_targets if owner[t.name] == rank])
    flags = torch.tensor([int(t.name in fallbacks) for t in layer_targets], dtype=torch.int64)
    _dist().all_reduce(flags)
    result = {t.name: broadcast_quantized(out.get(t.name), owner[t.name]) for t in layer_targets}
    return result, [t.name for t, f in zip(layer_targets, flags.tolist()) if f]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(n: int, argv: list[str]) -> int:
    """Run `python -m lowbit ARGV` as n local ranks (gloo over localhost), the machine's cores
    divided between them (the same total threads as one process). Rank 0 prints; the others'
    output is kept back, and shown (its last line) only when one of them fails first. The first
    rank to fail stops the rest; its exit code is returned."""
    import tempfile
    import time

    if n < 2:
        raise SchemeError(f"--workers {n}: give 2 or more (one process needs no flag)")
    threads = max(1, (os.cpu_count() or 1) // n)
    port = _free_port()
    procs, logs = [], []
    try:
        for rank in range(n):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
            log = None if rank == 0 else tempfile.TemporaryFile("w+")
            logs.append(log)
            out = {} if rank == 0 else {"stdout": subprocess.DEVNULL, "stderr": log}
            procs.append(subprocess.Popen([sys.executable, "-m", "lowbit", *argv], env=env, **out))
        first = None
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed and first is None:
                if failed[0] > 0:   # the same bad input stops every rank: let rank 0 say it, if it does
                    try:
                        procs[0].wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                first = 0 if procs[0].poll() not in (None, 0) else failed[0]
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        if first is None:
            first = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        if first is None:
            return 0
        if first > 0:
            logs[first].seek(0)
            lines = [ln for ln in logs[first].read().splitlines() if ln.strip()]
            print(f"rank {first}: {lines[-1] if lines else 'failed'}", file=sys.stderr)
        return procs[first].returncode if procs[first].returncode > 0 else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            if log is not None:
                log.close()
