"""A Hugging Face safetensors checkpoint opened without reading its weights: the model's
parameters live on the meta device and are read from the (memory-mapped) shards when a part
of the model is needed, then released. This is what lets a model larger than memory be
quantized layer by layer.

Checkpoints whose tensor names are the model's parameter names stream, and so do those that
transformers converts at load time by renaming keys and stacking per-expert tensors (read as
byte ranges in the stacked order); any other conversion loads the model whole instead, which
`lazy_weights` reports as None."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lowbit.errors import SourceError
from lowbit.export.safetensors_io import StoredTensor, stored_tensors
from lowbit.model.files import check_json

INDEX_FILE = "model.safetensors.index.json"
READ_BLOCK_ELEMENTS = 1 << 22   # elements converted per step when a tensor is read


class CheckpointWeights:
    """name -> tensor of a folder's safetensors files (one file, or shards named by an index)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = check_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError(f"{index} has no weight_map; re-download the model or remove the index")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise SourceError(f"{folder}: shard {missing[0]} named in {INDEX_FILE} is missing"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; re-download it")
        else:
            weight_map, files = None, sorted(p.name for p in folder.glob("*.safetensors"))
        self.tensors: dict[str, StoredTensor] = {}
        for f in files:
            stored, _meta = stored_tensors(folder / f)
            for name, t in stored.items():
                if weight_map is not None and weight_map.get(name, f) != f:
                    continue
                self.tensors[name] = t
        if weight_map is not None:
            absent = sorted(n for n in weight_map if n not in self.tensors)
            if absent:
                raise SourceError(f"{folder}: {absent[0]} is not in {weight_map[absent[0]]}, where {INDEX_FILE} says it is; "
                                  "the shards and the index disagree: re-download the model")
        self.folder = folder

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def stored(self, name: str) -> StoredTensor:
        """The tensor's bytes on disk (what an exporter copies without reading it)."""
        return self.tensors[name]

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor, converted to dtype a block of rows at a time (a bf16 embedding never
        exists whole beside its float32 copy). Read with plain file reads, not a memory map:
        mapped pages would count against the process until the map closes."""
        stored = self.tensors[name]
        cols = stored.shape[-1] if stored.shape else 1
        rows = stored.numel // cols if cols else 0
        step = max(1, READ_BLOCK_ELEMENTS // max(1, cols))
        if rows <= step:
            return stored.read().to(dtype)
        out = torch.empty((rows, cols), dtype=dtype)
        for r in range(0, rows, step):
            out[r: r + step] = stored.read_rows(r, min(rows, r + step))
        return out.reshape(stored.shape)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device and buffers (rotary tables) real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def meta_model(config) -> torch.nn.Module:
    """The architecture of `config` with every parameter on the meta device (float32 shapes)."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.tie_weights()   # empty-weight construction leaves a tied head untied
    model.eval()
    return model


def checkpoint_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameter name -> parameter, each parameter once (a tied head under the embedding's name)."""
    seen, out = set(), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def lazy_weights(model: torch.nn.Module, folder: Path) -> CheckpointWeights | None:
    """The folder's weights if they stream into this model name for name, None if transformers
    would have to convert them (then the model is loaded whole); a shape that disagrees with the
    config is a SourceError."""
    weights = CheckpointWeights(folder)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head_name = next(f"{n}.weight" for n, m in model.named_modules() if m is head)
        if head_name in weights:   # a tied config with a head of its own in the file: transformers unties it too
            head.weight = torch.nn.Parameter(torch.empty_like(emb.weight, device="meta"), requires_grad=False)
    params = checkpoint_names(model)
    if any(name not in weights for name in params):
        converted = _converted_tensors(model, weights.tensors)
        if converted is None:
            return None
        weights.tensors = converted
    if any(name not in weights for name in params):
        return None
    buffers = {n for n, _ in model.named_buffers()}
    if any(n not in params and n not in buffers for n in weights.tensors):
        return None
    for name, p in params.items():
        shape = weights.tensors[name].shape
        if tuple(shape) != tuple(p.shape):
            raise SourceError(f"{weights.tensors[name].file.name}: {name} has shape {list(shape)}, but config.json "
                              f"gives {list(p.shape)}; the weights and the config are from different models")
    return weights


def _converted_tensors(model: torch.nn.Module, tensors: dict) -> dict | None:
    """The checkpoint's tensors under the names transformers gives them while loading (its own
    conversion mapping: renamed keys; per-expert tensors stacked, gate and up concatenated), as
    byte ranges (PiecedTensor), or None where the mapping needs an operation other than those
    byte-preserving ones (the model is then loaded whole)."""
    import re

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                 rename_source_key)

    from lowbit.export.safetensors_io import PiecedTensor

    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:   # noqa: BLE001 - a mapping transformers cannot build here: load the model whole
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if len(renamings) + len(converters) != len(transforms):
        return None
    meta = dict(model.state_dict(keep_vars=True))
    out: dict = {}
    groups: dict[str, tuple] = {}   # target -> (converter, {source pattern: [(expert, tensor)]})
    for key, t in tensors.items():
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            out[target] = t
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        if found is None or not found.groups():
            return None
        groups.setdefault(target, (conv, {}))[1].setdefault(pattern, []).append((int(found.group(1)), t))
    for target, (conv, by_pattern) in groups.items():
        ops = [(type(op), getattr(op, "dim", None)) for op in conv.operations]
        if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            return None
        lists = [[t for _, t in sorted(by_pattern.get(p, []), key=lambda et: et[0])] for p in conv.source_patterns]
        experts = len(lists[0])
        if not experts or any(len(ts) != experts for ts in lists) or target not in meta:
            return None
        # stacked along a new dim 0, then (with Concatenate(dim=1)) each expert's pieces one after another
        pieces = tuple(ts[e] for e in range(experts) for ts in lists)
        if len({(p.dtype, p.shape[-1]) for p in pieces}) != 1 or sum(p.numel for p in pieces) != meta[target].numel():
            return None
        out[target] = PiecedTensor(pieces, tuple(meta[target].shape))
    return out


def materialize(model: torch.nn.Module, prefix: str, weights: CheckpointWeights) -> None:
    """Read every meta parameter under module `prefix` ("" = all) from the checkpoint, as float32."""
    root = model.get_submodule(prefix) if prefix else model
    names = {id(p): n for n, p in checkpoint_names(model).items()}
    materialize_parameters(model, [names[id(p)] for p in root.parameters() if p.is_meta], weights)


def materialize_parameters(model: torch.nn.Module, names: list[str], weights: CheckpointWeights) -> None:
    """Read the named parameters from the checkpoint, as float32."""
    for name in names:
        p = model.get_parameter(name)
        if p.is_meta:
            _replace_everywhere(model, p, torch.nn.Parameter(weights.read(name), requires_grad=False))


def _replace_everywhere(model: torch.nn.Module, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Put `new` wherever `old` is registered (a tied head shares the embedding's parameter)."""
    for module in model.modules():
        for pname, p in module._parameters.items():
            if p is old:
                module._parameters[pname] = new


def release(model: torch.nn.Module, prefix: str = "") -> None:
    """Put every parameter under module `prefix` back on the meta device, freeing its memory."""
    root = model.get_submodule(prefix) if prefix else model
    for p in list(root.parameters()):
        if not p.is_meta:
            _replace_everywhere(model, p, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
