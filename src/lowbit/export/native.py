"""lowbit's own format: one safetensors file (packed codes, parameters, full-precision rest),
a JSON recipe (lowbit.json), config.json and the tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from lowbit.errors import SchemeError, SourceError
from lowbit.export.safetensors_io import write_sharded
from lowbit.formats import make_format
from lowbit.model.quantized import QuantizedModel, install_quantized, recorded_recipe
from lowbit.model.targets import WeightTarget, set_submodule
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

FORMAT_VERSION = 1
RECIPE_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"
CODES_SUFFIX = ":codes"


def _full_precision_state(qm: QuantizedModel) -> dict:
    """Every tensor of the model that is not quantized, each storage once (tied weights). A value
    left on the meta device (a streamed run) comes as qm.floats' StoredTensor, in float32 as a
    resident model holds it, so both write the same bytes."""
    out, seen = {}, set()
    for name, t in qm.model.state_dict(keep_vars=True).items():
        if name in qm.tensors or ".qweight" in name:
            continue
        key = id(t) if t.is_meta else (t.data_ptr(), t.shape)
        if key in seen:
            continue
        seen.add(key)
        if not t.is_meta:
            out[name] = t.detach().contiguous()
        elif getattr(qm, "floats", None) is not None and name in qm.floats:
            out[name] = qm.floats.stored(name).converted("F32")
        else:
            raise SchemeError(f"{name} has no value (left on the meta device with nothing to read it from)")
    return out


def prepare_output_dir(output: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """(final path, temporary path) for an output written then renamed into place."""
    final = Path(output)
    if final.exists() and not force:
        raise SourceError(f"output {final} already exists; choose another --output or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return final, tmp


def commit_output_dir(tmp: Path, final: Path) -> None:
    """Move a completed temporary output into place (replacing an old one under --force)."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def remove_output(path: str | os.PathLike) -> None:
    """Remove a written output (a folder or a file), e.g. one found over its size budget."""
    p = Path(path)
    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_output_dir(output: str | os.PathLike, force: bool = False):
    """Yield a temporary folder beside `output`; on success it is renamed to `output`, on any
    error it is removed, so no half-written output is ever left behind."""
    final, tmp = prepare_output_dir(output, force)
    try:
        yield tmp
        commit_output_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tensor_entries(name: str, qt: QuantizedTensor, target) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors of one quantized weight (packed codes, parameters) and its lowbit.json entry."""
    tensors = {name + CODES_SUFFIX: qt.packed_codes()}
    for pname, v in qt.params.items():
        tensors[f"{name}:{pname}"] = v.contiguous()
    return tensors, {**qt.meta(), "module": target.module_name, "param": target.param_name, "kind": target.kind}


def recipe_document(source: str, method: str, scheme, bits_per_weight: float, recipe: dict, metas: dict) -> str:
    """The text of lowbit.json."""
    return json.dumps({"format_version": FORMAT_VERSION, "source": source, "method": method,
                       "scheme": scheme.to_dict(), "bits_per_weight": bits_per_weight,
                       "recipe": recorded_recipe(recipe), "tensors": metas}, indent=1, sort_keys=True)


WEIGHTS_METADATA = {"format": f"lowbit-{FORMAT_VERSION}"}


def save(qm: QuantizedModel, output: str | os.PathLike, force: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Write qm as a lowbit folder; nothing appears at `output` unless all of it was written.
    max_shard_bytes: split the weights into shards of at most that size, with an index."""
    with staged_output_dir(output, force) as tmp:
        tensors = _full_precision_state(qm)
        meta = {}
        for name, qt in qm.tensors.items():
            stored, meta[name] = tensor_entries(name, qt, qm.targets[name])
            tensors.update(stored)
        write_sharded(tmp, tensors, WEIGHTS_METADATA, max_shard_bytes)
        (tmp / RECIPE_FILE).write_text(recipe_document(qm.source, qm.method, qm.scheme, qm.bits_per_weight, qm.recipe, meta))
        qm.model.config.save_pretrained(tmp)
        if qm.tokenizer is not None:
            qm.tokenizer.save_pretrained(tmp)
    return Path(output)


def read_recipe(path: str | os.PathLike) -> dict:
    """The lowbit.json of a lowbit folder."""
    f = Path(path) / RECIPE_FILE
    if not f.exists():
        raise SourceError(f"{path} is not a lowbit output (no {RECIPE_FILE}); pass a folder written by `lowbit quantize`")
    recipe = json.loads(f.read_text())
    if recipe.get("format_version", 0) > FORMAT_VERSION:
        raise SourceError(f"{path} was written by a newer lowbit (format {recipe['format_version']}); upgrade lowbit")
    return recipe


RUNTIMES = ("decoded", "packed")


class LazyTensors(dict):
    """name -> QuantizedTensor, read from the folder's safetensors file when asked for: a packed
    runtime keeps nothing but its packed modules in memory, yet exporters still find every
    tensor."""

    def __init__(self, weights, metas: dict[str, dict], codes_on_meta: bool = False, transform=None):
        super().__init__()
        self._weights, self._metas = weights, metas   # model.lazy.CheckpointWeights of the folder
        self._codes_on_meta = codes_on_meta   # headers only: codes of the right shape, never read
        self._transform = transform           # applied to each tensor as it is read

    def mapped(self, fn) -> "LazyTensors":
        """The same tensors, each passed through fn when read."""
        return LazyTensors(self._weights, self._metas, self._codes_on_meta, fn)

    def headers(self) -> "LazyTensors | None":
        """The same tensors with their codes left unread (on meta: shapes, formats and parameters
        only, what exporters' checks read); None under a transform, which may need the codes."""
        return None if self._transform is not None else LazyTensors(self._weights, self._metas, True)

    def _read(self, name: str) -> QuantizedTensor:
        meta = self._metas[name]
        t = self._weights.tensors
        params = {p: t[f"{name}:{p}"].read() for p in meta["params"]}
        if self._codes_on_meta:
            fmt_cfg = dict(meta["format"])
            codes = torch.empty(meta["matrix_shape"], dtype=torch.uint8, device="meta")
            return QuantizedTensor(codes, params, make_format(fmt_cfg.pop("name"), **fmt_cfg), meta["group_size"],
                                   tuple(meta["shape"]), meta["transposed"], meta.get("input_quant"))
        qt = QuantizedTensor.from_packed(meta, t[name + CODES_SUFFIX].read(), params)
        return qt if self._transform is None else self._transform(qt)

    def __getitem__(self, name):
        return self._read(name)

    def __contains__(self, name):
        return name in self._metas

    def __iter__(self):
        return iter(self._metas)

    def __len__(self):
        return len(self._metas)

    def keys(self):
        return self._metas.keys()

    def items(self):
        return ((n, self._read(n)) for n in self._metas)

    def values(self):
        return (self._read(n) for n in self._metas)

    def get(self, name, default=None):
        return self._read(name) if name in self._metas else default


def load(path: str | os.PathLike, runtime: str = "decoded", compute_dtype: torch.dtype = torch.bfloat16) -> QuantizedModel:
    """A lowbit folder back as a runnable QuantizedModel (transformers model + tokenizer).

    runtime="decoded": QuantLinear modules that decode each weight once to fp32 (the model
    exactly as `lowbit quantize` measured it). runtime="packed": PackedLinear modules that keep
    the low-bit form at rest and multiply through torch's CPU kernels (lowbit.runtime.packed);
    the model skeleton is built without allocating the replaced weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if runtime not in RUNTIMES:
        raise SourceError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    path = Path(path)
    recipe = read_recipe(path)
    config = AutoConfig.from_pretrained(path)
    metas = recipe["tensors"]
    targets = {name: WeightTarget(name, m["module"], m["param"], m["kind"], m["transposed"]) for name, m in metas.items()}
    if runtime == "packed":
        model, tensors = _load_packed(path, config, metas, targets, compute_dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval()
        stored = {k: t.read() for k, t in _weights(path).tensors.items()}
        tensors = {}
        for name, meta in metas.items():
            params = {p: stored.pop(f"{name}:{p}") for p in meta["params"]}
            tensors[name] = QuantizedTensor.from_packed(meta, stored.pop(name + CODES_SUFFIX), params)
        _load_rest(model, stored, path)
        for name, qt in tensors.items():
            install_quantized(model, targets[name], qt)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return QuantizedModel(model, tokenizer, QuantScheme.from_dict(recipe["scheme"]), tensors, targets,
                          recipe["source"], recipe["method"], recipe.get("recipe", {}))


def tensor_headers(tensors):
    """`tensors` as its exporters' type choices and checks read them: lazily read tensors without
    their codes (LazyTensors.headers), anything else (already in memory, or under a transform
    that needs the codes) as it is."""
    view = tensors.headers() if isinstance(tensors, LazyTensors) else None
    return tensors if view is None else view


def open_lazy(path: str | os.PathLike) -> QuantizedModel:
    """A lowbit folder as a QuantizedModel that holds none of its weights: the model on the meta
    device, each quantized tensor read when asked for (LazyTensors), full-precision values as
    byte ranges of the folder (`floats`). What a checkpoint exporter needs to convert a folder
    larger than memory, one tensor at a time; it does not run."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.model.lazy import meta_model

    path = Path(path)
    recipe = read_recipe(path)
    metas = recipe["tensors"]
    targets = {name: WeightTarget(name, m["module"], m["param"], m["kind"], m["transposed"]) for name, m in metas.items()}
    weights = _weights(path)
    model = meta_model(AutoConfig.from_pretrained(path))
    return QuantizedModel(model, AutoTokenizer.from_pretrained(path), QuantScheme.from_dict(recipe["scheme"]),
                          LazyTensors(weights, metas), targets, recipe["source"], recipe["method"], recipe.get("recipe", {}),
                          floats=weights)


def _load_rest(model: torch.nn.Module, stored: dict, path: Path, assign: bool = False) -> None:
    missing, unexpected = model.load_state_dict(stored, strict=False, assign=assign)
    if unexpected:
        raise SourceError(f"{path}: unexpected tensors {unexpected[:3]}; the folder does not match its config.json")
    model.tie_weights()


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _load_packed(path: Path, config, metas: dict, targets: dict, compute_dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowbit.runtime.packed import PackedEmbedding, PackedLinear

    with init_empty_weights(include_buffers=False):   # parameters on meta: nothing allocated
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    # plain file reads, no memory map: pages mapped during the load would stay resident
    weights = _weights(path)
    keys = set(weights.tensors)
    quant_keys = {k for name, m in metas.items() for k in [name + CODES_SUFFIX, *(f"{name}:{p}" for p in m["params"])]}
    stored = {k: weights.tensors[k].read() for k in sorted(keys - quant_keys)}
    _load_rest(model, stored, path, assign=True)
    for name, meta in metas.items():
        params = {p: weights.tensors[f"{name}:{p}"].read() for p in meta["params"]}
        qt = QuantizedTensor.from_packed(meta, weights.tensors[name + CODES_SUFFIX].read(), params)
        target = targets[name]
        module = model.get_submodule(target.module_name)
        if target.kind in ("linear", "conv1d") and target.param_name == "weight":
            bias = getattr(module, "bias", None)
            set_submodule(model, target.module_name, PackedLinear(qt, None if bias is None or bias.is_meta else bias,
                                                                   compute_dtype=compute_dtype))
        elif target.kind == "embedding" and isinstance(module, torch.nn.Embedding):
            head = model.get_output_embeddings()
            tied = head is not None and getattr(head, "weight", None) is module.weight
            set_submodule(model, target.module_name, PackedEmbedding(qt, module.padding_idx))
            if tied:   # the output head multiplies by the same quantized table
                set_submodule(model, _module_name(model, head),
                               PackedLinear(qt, getattr(head, "bias", None), compute_dtype=compute_dtype))
        else:   # stacked experts: their modules are architecture code, not a Linear; decoded values
            setattr(module, target.param_name, torch.nn.Parameter(qt.dequantize(), requires_grad=False))
        del qt
    decoded = [m.why for m in model.modules() if isinstance(m, PackedLinear) and m.kernel == "decode"]
    if decoded:   # said once per load: these run, but slower than a kernel would
        reasons = sorted(set(decoded))
        warnings.warn(f"lowbit: {len(decoded)} weights have no CPU kernel and are decoded per call in chunks "
                      f"({'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})", stacklevel=3)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise SourceError(f"{path}: no stored values for {left[:3]}; the folder does not match its config.json")
    return model, LazyTensors(weights, metas)


def _weights(path: Path):
    """The folder's weights (model.safetensors, or shards named by an index), nothing read yet."""
    from lowbit.model.lazy import CheckpointWeights

    return CheckpointWeights(path)
