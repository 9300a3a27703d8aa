"""Exporters: each serialises a QuantizedModel; none quantizes on its own."""

import importlib

from lowbit.errors import SchemeError

# --to name -> (module, function(qm, output, force=...))
CHECKPOINT_EXPORTERS = {
    "compressed-tensors": ("lowbit.export.compressed_tensors", "export_compressed_tensors"),
    "gptq": ("lowbit.export.gptq", "export_gptq"),
    "awq": ("lowbit.export.awq", "export_awq"),
}


def checkpoint_exporter(name: str, function: str | None = None):
    """The export function for a checkpoint format (or another function of its module: `check`,
    every refusal of the export before anything is packed)."""
    if name not in CHECKPOINT_EXPORTERS:
        raise SchemeError(f"unknown export target {name!r}; choose one of: native, gguf, {', '.join(CHECKPOINT_EXPORTERS)}")
    module, func = CHECKPOINT_EXPORTERS[name]
    try:
        return getattr(importlib.import_module(module), function or func)
    except (ImportError, AttributeError) as e:
        raise SchemeError(f"export to {name} is not available in this installation ({e})") from None


GGUF_IS_ONE_FILE = ("a GGUF output is one file; --max-shard-size applies to folder outputs "
                    "(native, compressed-tensors, gptq, awq)")


def write(qm, to: str, output, force: bool = False, full_precision: str | None = None,
          max_shard_bytes: int | None = None):
    """Serialise qm with the exporter named by `to` (native, gguf or a checkpoint format);
    max_shard_bytes splits a folder's weights into shards with an index."""
    if to == "gguf":
        if max_shard_bytes is not None:
            raise SchemeError(GGUF_IS_ONE_FILE)
        from lowbit.export.gguf import write_gguf

        return write_gguf(qm, output, full_precision=full_precision, force=force)
    if to == "native":
        from lowbit.export.native import save

        return save(qm, output, force=force, max_shard_bytes=max_shard_bytes)
    return checkpoint_exporter(to)(qm, output, force=force, max_shard_bytes=max_shard_bytes)


def weights_bytes(path) -> int:
    """Bytes of an output's weights: the GGUF file, or a folder's safetensors files (all shards)."""
    from pathlib import Path

    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
