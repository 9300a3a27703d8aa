"""One self-contained HTML page from report records: plots as data: URIs, no network, no script
beyond a check that every plot decoded (it marks the page with how many did)."""

from __future__ import annotations

import base64
import html
import json

from lowbit.report.plots import domain_names, pareto_front

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td.t,th.t{text-align:left} td.gen{text-align:left;white-space:pre-wrap;max-width:360px;font-family:monospace;font-size:12px}
img{max-width:100%;border:1px solid #eee} .note{color:#666;font-size:13px} pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px}
tr.front td:first-child{font-weight:bold}
"""

CHECK = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) { ok++; } else { i.alt = 'plot failed to load'; } });
  document.body.setAttribute('data-plots-loaded', ok + '/' + imgs.length);
});
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _img(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _summary(records: list[dict]) -> str:
    front = set(pareto_front([(r["size_bytes"], r["kld"]) for r in records]))
    rows = []
    for i, r in enumerate(records):
        rows.append(f'<tr class="{"front" if i in front else ""}"><td class="t">{_e(r["label"])}</td>'
                    f'<td class="t">{_e(r.get("method") or "–")}</td><td class="t">{_e(r.get("scheme") or "–")}</td>'
                    f'<td>{r["size_bytes"] / 1e6:.2f}</td><td>{_num(r.get("bits_per_weight"), ".3f")}</td>'
                    f'<td>{_num(r.get("ppl"), ".3f")}</td><td>{_num(r.get("ref_ppl"), ".3f")}</td>'
                    f'<td>{r["kld"]:.4f}</td><td>{_num(r.get("kld_p99"), ".4f")}</td><td>{_num(r.get("top1"), ".3f")}</td>'
                    f'<td>{"yes" if i in front else ""}</td></tr>')
    return ('<table><tr><th class="t">candidate</th><th class="t">method</th><th class="t">scheme</th><th>MB stored</th>'
            '<th>bits/weight (quantized)</th><th>PPL</th><th>ref PPL</th><th>KLD</th><th>KLD p99</th><th>top-1</th>'
            '<th>Pareto front</th></tr>' + "".join(rows) + "</table>")


def _domains_table(records: list[dict]) -> str:
    recs = [r for r in records if r.get("domains")]
    names = domain_names(recs)
    head = "".join(f"<th>{_e(n)} KLD</th><th>{_e(n)} ×prose</th>" for n in names)
    rows = []
    for r in recs:
        cells = ""
        for n in names:
            d = r["domains"].get(n)
            cells += "<td>–</td><td>–</td>" if d is None else f'<td>{d["kld"]:.4f}</td><td>{_num(d.get("sensitivity"), ".2f")}</td>'
        rows.append(f'<tr><td class="t">{_e(r["label"])}</td>{cells}</tr>')
    return f'<table><tr><th class="t">candidate</th>{head}</tr>{"".join(rows)}</table>'


def _plan(record: dict) -> str:
    recipe = record.get("recipe") or {}
    groups = recipe.get("plan") or []
    if not groups:
        return ""
    rows = "".join(
        f'<tr><td class="t">{_e(g.get("weights"))}</td><td class="t">{_e(g.get("activations") or "–")}</td>'
        f'<td class="t">{_e(g.get("reason"))}</td><td>{len(g.get("tensors", []))}</td>'
        f'<td class="t"><details><summary>tensors</summary>{"<br>".join(_e(t) for t in g.get("tensors", []))}</details></td></tr>'
        for g in groups)
    kept = recipe.get("kept_full_precision") or []
    shown = {k: v for k, v in recipe.items() if k != "plan"}
    return (f'<h3>{_e(record["label"])}</h3><table><tr><th class="t">weights</th><th class="t">activations</th>'
            f'<th class="t">why</th><th>tensors</th><th class="t"></th></tr>{rows}</table>'
            f'<p class="note">kept in full precision: {_e(", ".join(kept) or "none")}</p>'
            f'<details><summary>recipe</summary><pre>{_e(json.dumps(shown, indent=1, sort_keys=True))}</pre></details>')


def _generations(records: list[dict]) -> str:
    recs = [r for r in records if r.get("generations")]
    if not recs:
        return ""
    names = [n for n in domain_names(recs) if any(n in r["generations"] for r in recs)]
    out = []
    for n in names:
        first = next(r["generations"][n] for r in recs if n in r["generations"])
        cols = [("reference", first["reference"])] + [(r["label"], r["generations"][n]["candidate"])
                                                        for r in recs if n in r["generations"]]
        out.append(f'<h3>{_e(n)}</h3><p class="note">prompt:</p><pre>{_e(first["prompt"])}</pre><table><tr>'
                   + "".join(f'<th class="t">{_e(c)}</th>' for c, _ in cols) + "</tr><tr>"
                   + "".join(f'<td class="gen">{_e(t)}</td>' for _, t in cols) + "</tr></table>")
    return "".join(out)


def render(records: list[dict], plots: dict[str, bytes], title: str, reference: str | None) -> str:
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="note">reference: {_e(reference or "each candidate’s recorded source")}. KLD = mean '
             "KL(reference ‖ candidate) per token on the same windows; lower is better. Stored size is the whole "
             "file or folder on disk, tokenizer and full-precision tensors included.</p>",
             "<h2>Candidates</h2>", _summary(records)]
    if "quality-size" in plots:
        parts += ["<h2>Quality against stored size</h2>", _img(plots["quality-size"], "quality against size")]
    if "domains" in plots:
        parts += ["<h2>Per-domain sensitivity</h2>",
                  '<p class="note">Each domain scored on its own windows; ×prose = that domain’s KLD over the '
                  "prose KLD (above 1: the domain suffers more than prose).</p>",
                  _img(plots["domains"], "per-domain KLD"), _domains_table(records)]
    if "layers" in plots:
        parts += ["<h2>Per-layer error</h2>",
                  '<p class="note">‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖ on inputs X captured from the reference (weight error where '
                  "no input was captured, e.g. stacked experts).</p>", _img(plots["layers"], "per-layer error")]
    plan = "".join(_plan(r) for r in records)
    if plan:
        parts += ["<h2>Plan: which type each tensor got, and why</h2>", plan]
    gens = _generations(records)
    if gens:
        parts += ["<h2>Generations side by side (greedy)</h2>", gens]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            + "".join(parts) + f"<script>{CHECK}</script></body></html>")
