"""The report's plots as PNG bytes (matplotlib, Agg): the same records give the same bytes."""

from __future__ import annotations

import io
import re

KLD_FLOOR = 1e-5   # an exact candidate (KLD 0) is drawn here on the log axis


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "lowbit"})
    return plt, plt.figure(figsize=(width, height), dpi=110)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and KLD (smaller is better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return sorted(front)


def quality_vs_size(records: list[dict]) -> bytes:
    plt, fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    pts = [(r["size_bytes"] / 1e6, max(r["kld"], KLD_FLOOR)) for r in records]
    front = set(pareto_front(pts))
    # labels alternate above and below their point, in order of size, so neighbours do not overlap
    by_size = sorted(range(len(records)), key=lambda i: pts[i])
    for rank, i in enumerate(by_size):
        r, (x, y), on = records[i], pts[i], i in front
        ax.scatter([x], [y], s=46 if on else 30, marker="o" if on else "x", color="C3" if on else "C0", zorder=3)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 5 if rank % 2 == 0 else -10), fontsize=7)
    ys = [p[1] for p in pts]
    ax.set_ylim(min(ys) / 2, max(ys) * 3)
    fx = sorted((pts[i] for i in front))
    if len(fx) > 1:
        ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", color="C3", lw=1, alpha=0.6,
                label="Pareto front (no candidate is smaller and better)")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("stored size, MB (the whole file or folder)")
    ax.set_ylabel(f"KLD to the reference, nats/token (log; 0 drawn at {KLD_FLOOR:g})")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Quality against size")
    return _png(plt, fig)


_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+?)(?:\.weight)?$")
# columns of the heat map in a block's own order where the name is a common one; others after, sorted
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "o_proj", "out_proj", "dense",
              "gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "c_fc", "fc1", "dense_h_to_4h", "down_proj", "w2",
              "c_proj", "fc2", "dense_4h_to_h")


def layer_grid(layers: list[dict]) -> tuple[list[int], list[str], dict[tuple[int, str], float]]:
    """(layer indices, tensor kinds, {(index, kind): error}) of the numbered tensors; the error is
    the output error where measured, else the weight error."""
    cells = {}
    for row in layers:
        m = _LAYER.match(row["name"])
        if m:
            err = row["output_rel_err"] if row.get("output_rel_err") is not None else row["weight_rel_err"]
            cells[(int(m.group(2)), m.group(3).rsplit(".", 1)[-1])] = err
    idx = sorted({i for i, _ in cells})
    found = {k for _, k in cells}
    kinds = [k for k in KIND_ORDER if k in found] + sorted(found - set(KIND_ORDER))
    return idx, kinds, cells


def layer_heatmap(records: list[dict]) -> bytes | None:
    with_layers = [r for r in records if r.get("layers")]
    grids = [(r, *layer_grid(r["layers"])) for r in with_layers]
    grids = [g for g in grids if g[1]]
    if not grids:
        return None
    import numpy as np
    from matplotlib.colors import LogNorm

    vals = [v for g in grids for v in g[3].values() if v > 0]
    norm = LogNorm(vmin=max(min(vals), 1e-6), vmax=max(vals)) if vals else None
    n_rows = max(len(g[1]) for g in grids)
    plt, fig = _figure(1.2 + 2.3 * len(grids), 1.2 + 0.16 * n_rows)
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    im = None
    for ax, (r, idx, kinds, cells) in zip(axes, grids):
        grid = np.full((len(idx), len(kinds)), np.nan)
        for (i, k), v in cells.items():
            grid[idx.index(i), kinds.index(k)] = max(v, 1e-6)
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, fontsize=7)
        ax.set_yticks(range(len(idx)), [str(i) for i in idx], fontsize=6)
        ax.set_title(r["label"], fontsize=8)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), label="relative output error (log)")
    return _png(plt, fig)


def domain_names(records: list[dict]) -> list[str]:
    """Every domain of the records: the built-in ones in their fixed order, then the user's, sorted
    (a record read back from sorted JSON draws the same)."""
    from lowbit.eval.domains import DOMAINS

    names = {n for r in records for n in r.get("domains") or {}}
    return [n for n in DOMAINS if n in names] + sorted(names - set(DOMAINS))


def domain_bars(records: list[dict]) -> bytes | None:
    with_domains = [r for r in records if r.get("domains")]
    if not with_domains:
        return None
    names = domain_names(with_domains)
    plt, fig = _figure(max(6, 1.3 * len(names) + 1), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(with_domains)
    for j, r in enumerate(with_domains):
        ys = [max(r["domains"][n]["kld"], KLD_FLOOR) if n in r["domains"] else 0 for n in names]
        ax.bar([i + (j - (len(with_domains) - 1) / 2) * width for i in range(len(names))], ys, width,
               label=r["label"], color=f"C{j % 10}")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("KLD per domain (log)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title("Which domains suffer")
    return _png(plt, fig)
