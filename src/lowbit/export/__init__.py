"""Exporters: each serialises a QuantizedModel; none quantizes on its own."""

import importlib

from lowbit.errors import SchemeError

# --to name -> (module, function(qm, output, force=...))
CHECKPOINT_EXPORTERS = {
    "compressed-tensors": ("lowbit.export.compressed_tensors", "export_compressed_tensors"),
    "gptq": ("lowbit.export.gptq", "export_gptq"),
    "awq": ("lowbit.export.awq", "export_awq"),
}


def checkpoint_exporter(name: str):
    """The export function for a checkpoint format."""
    if name not in CHECKPOINT_EXPORTERS:
        raise SchemeError(f"unknown export target {name!r}; choose one of: native, gguf, {', '.join(CHECKPOINT_EXPORTERS)}")
    module, func = CHECKPOINT_EXPORTERS[name]
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise SchemeError(f"export to {name} is not available in this installation ({e})") from None


def write(qm, to: str, output, force: bool = False, full_precision: str | None = None):
    """Serialise qm with the exporter named by `to` (native, gguf or a checkpoint format)."""
    if to == "gguf":
        from lowbit.export.gguf import write_gguf

        return write_gguf(qm, output, full_precision=full_precision, force=force)
    if to == "native":
        from lowbit.export.native import save

        return save(qm, output, force=force)
    return checkpoint_exporter(to)(qm, output, force=force)


def weights_file(path):
    """The file that holds an output's weights: the GGUF itself, or a folder's model.safetensors."""
    from pathlib import Path

    path = Path(path)
    return path if path.is_file() else path / "model.safetensors"
