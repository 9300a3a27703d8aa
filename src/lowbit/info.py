"""What a lowbit folder, HF folder or GGUF file holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.errors import SourceError


def _describe_gguf(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            meta[key] = f"[{len(field.data)} values]"
            continue
        try:
            value = field.contents()
        except Exception:  # unusual field types: show their type instead of failing
            value = f"<{field.types}>"
        if isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} values]"
        meta[key] = value
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": list(int(x) for x in t.shape),
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return {"path": str(path), "kind": "gguf", "size_bytes": path.stat().st_size, "tensor_types": counts,
            "metadata": meta, "tensors": tensors}


def describe(path: str | os.PathLike) -> dict:
    """A summary dict: kind, size, scheme or types, and per-tensor rows."""
    from lowbit.model.files import check_gguf, check_json, check_safetensors

    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path} does not exist; pass a lowbit folder, HF folder or .gguf file")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise SourceError(f"{path} is not a .gguf file; pass a .gguf file or a folder")
        check_gguf(p)
        return _describe_gguf(p)
    for name in ("lowbit.json", "config.json"):   # what it reads, checked whole first
        if (p / name).exists():
            check_json(p / name)
    for f in sorted(p.glob("*.safetensors")):
        check_safetensors(f)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if (p / "lowbit.json").exists():
        recipe = json.loads((p / "lowbit.json").read_text())
        rows = [{"name": n, "format": m["format"]["name"], "group": m["group_size"], "shape": m["shape"]}
                for n, m in recipe["tensors"].items()]
        return {"path": str(p), "kind": "lowbit", "size_bytes": size, "source": recipe["source"],
                "method": recipe["method"], "scheme": recipe["scheme"]["weights"],
                "bits_per_weight": recipe["bits_per_weight"], "tensors": rows}
    if (p / "config.json").exists():
        config = json.loads((p / "config.json").read_text())
        keep = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "quantization_config")
        return {"path": str(p), "kind": "hf", "size_bytes": size, "config": {k: config[k] for k in keep if k in config}}
    raise SourceError(f"{path} is neither a lowbit output nor a Hugging Face model folder")
