"""`lowbit report`: one HTML page (and PNGs and the data beside it) from evaluation records, the
JSON `lowbit eval --json` writes; a report's own JSON redraws it without recomputing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.errors import DataError

REPORT_VERSION = 1
REQUIRED = ("kld", "size_bytes")


def _as_record(obj, where: str) -> dict:
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), (int, float)) for k in REQUIRED):
        raise DataError(f"{where} is not an evaluation record (it needs numeric {' and '.join(REQUIRED)}); "
                        "give the JSON of `lowbit eval CANDIDATE --json`, a report's .json, or a model")
    rec = dict(obj)
    rec.setdefault("label", Path(str(rec.get("candidate") or where)).name)
    return rec


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of an eval JSON (one) or of a report's JSON (all of them)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); give the output of `lowbit eval --json` or a report's .json")
    if isinstance(data, dict) and "lowbit_report" in data:
        records = [_as_record(r, f"{path} record {i}") for i, r in enumerate(data.get("records", []))]
        for r in records:
            r.setdefault("reference_source", data.get("reference"))
        return records
    return [_as_record(data, str(path))]


def parse_candidate(arg: str) -> tuple[str | None, str]:
    """(label or None, path): LABEL=PATH names a candidate (unless the whole argument is a path)."""
    label, sep, path = arg.partition("=")
    return (label, path) if sep and label and not os.path.exists(arg) else (None, arg)


def collect_records(candidates: list[tuple[str | None, str]], reference: str | None, data: str | None, ctx: int,
                    windows: int, domains: bool = True, seed: int = 0, progress: bool = True) -> list[dict]:
    """One record per candidate: an eval JSON's records as they are, a model evaluated against
    its reference (`reference`, or the source it records) on `windows` x `ctx` tokens of `data`,
    with its domains unless `domains` is False. Every model path is checked before any work."""
    from lowbit.eval.report import candidate_record, check_context, eval_windows, load_candidate, resolve_reference
    from lowbit.model.load import load_source, resolve_source

    is_json = {p: p.endswith(".json") and os.path.isfile(p) for _, p in candidates}
    for _, p in candidates:
        if not is_json[p]:
            resolve_source(p)   # refuse what is not a model before evaluating anything
    records, loaded = [], {}
    for label, p in candidates:
        if is_json[p]:
            got = read_records(p)
        else:
            cand = load_candidate(p)
            src = resolve_reference(cand, reference)
            if src not in loaded:
                loaded.clear()   # one reference resident at a time
                loaded[src] = load_source(src)
            ref = loaded[src]
            check_context(ref.model, ctx, ref.source)
            w = eval_windows(ref.tokenizer, data, ctx, windows)
            got = [{**candidate_record(cand, ref.model, ref.tokenizer, w, domains=domains, domain_windows=windows,
                                       seed=seed, progress=progress), "reference_source": ref.source}]
            del cand
        records += [{**r, "label": label} for r in got] if label else got
    return records


def unique_labels(records: list[dict]) -> list[dict]:
    """Records whose labels are distinct (a repeated label gets its position appended)."""
    seen: dict[str, int] = {}
    out = []
    for r in records:
        n = seen.get(r["label"], 0)
        seen[r["label"]] = n + 1
        out.append(r if n == 0 else {**r, "label": f"{r['label']} ({n + 1})"})
    return out


def report_paths(output: str | os.PathLike) -> dict[str, Path]:
    """Every file a report writes: the page, its data and one PNG per plot, side by side."""
    out = Path(output)
    stem = out.with_suffix("")
    return {"html": out, "json": stem.with_name(stem.name + ".json"),
            **{k: stem.with_name(f"{stem.name}-{k}.png") for k in ("quality-size", "domains", "layers")}}


def check_output(output: str | os.PathLike, force: bool) -> dict[str, Path]:
    paths = report_paths(output)
    parent = paths["html"].parent
    if not parent.is_dir():
        raise DataError(f"the folder {parent} for the report does not exist; create it or choose another -o path")
    if paths["html"].suffix.lower() not in (".html", ".htm"):
        raise DataError(f"-o {output}: the report is an HTML page; name it something.html")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise DataError(f"{existing[0]} exists; pass --force to replace it")
    return paths


def write_report(records: list[dict], output: str | os.PathLike, title: str = "lowbit report",
                 reference: str | None = None, force: bool = False) -> dict[str, Path]:
    """Draw and write the report; every file goes to a temporary name first, so a failure leaves
    nothing half-written. Returns the paths written."""
    from lowbit.report import plots
    from lowbit.report.page import render

    if not records:
        raise DataError("no candidates to report; name at least one model or evaluation JSON")
    paths = check_output(output, force)
    records = unique_labels(records)
    if reference is None:   # the one source every candidate was compared with, if there is one
        refs = {r.get("reference_source") for r in records}
        reference = refs.pop() if len(refs) == 1 else None
    drawn = {"quality-size": plots.quality_vs_size(records), "domains": plots.domain_bars(records),
             "layers": plots.layer_heatmap(records)}
    drawn = {k: v for k, v in drawn.items() if v is not None}
    data = {"lowbit_report": REPORT_VERSION, "title": title, "reference": reference, "records": records}
    contents = {"html": render(records, drawn, title, reference).encode(),
                "json": json.dumps(data, indent=1, sort_keys=True).encode(), **drawn}
    temps = []
    try:
        for key, blob in contents.items():
            tmp = paths[key].with_name(f".{paths[key].name}.tmp")
            tmp.write_bytes(blob)
            temps.append((tmp, paths[key]))
        for tmp, final in temps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    for key in set(paths) - set(contents):   # a plot this report has not: drop a stale one of an earlier report
        if force:
            paths[key].unlink(missing_ok=True)
    return {k: paths[k] for k in contents}
