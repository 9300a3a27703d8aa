"""lowbit's own format: one safetensors file (packed codes, parameters, full-precision rest),
a JSON recipe (lowbit.json), config.json and the tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import SourceError
from lowbit.model.quantized import QuantizedModel, install_quantized, recorded_recipe
from lowbit.model.targets import WeightTarget
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

FORMAT_VERSION = 1
RECIPE_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"
CODES_SUFFIX = ":codes"


def _full_precision_state(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not quantized, each storage once (tied weights)."""
    out, seen = {}, set()
    for name, t in qm.model.state_dict().items():
        if name in qm.tensors or ".qweight" in name:
            continue
        key = (t.data_ptr(), t.shape)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
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


def save(qm: QuantizedModel, output: str | os.PathLike, force: bool = False) -> Path:
    """Write qm as a lowbit folder; nothing appears at `output` unless all of it was written."""
    with staged_output_dir(output, force) as tmp:
        tensors = _full_precision_state(qm)
        meta = {}
        for name, qt in qm.tensors.items():
            tensors[name + CODES_SUFFIX] = qt.packed_codes()
            for pname, v in qt.params.items():
                tensors[f"{name}:{pname}"] = v.contiguous()
            t = qm.targets[name]
            meta[name] = {**qt.meta(), "module": t.module_name, "param": t.param_name, "kind": t.kind}
        tensors = dict(sorted(tensors.items()))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": f"lowbit-{FORMAT_VERSION}"})  # one key: safetensors orders metadata keys arbitrarily
        recipe = {"format_version": FORMAT_VERSION, "source": qm.source, "method": qm.method,
                  "scheme": qm.scheme.to_dict(), "bits_per_weight": qm.bits_per_weight,
                  "recipe": recorded_recipe(qm.recipe), "tensors": meta}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, sort_keys=True))
        config = qm.model.config
        config.save_pretrained(tmp)
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


def load(path: str | os.PathLike) -> QuantizedModel:
    """A lowbit folder back as a runnable QuantizedModel (transformers model + tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    recipe = read_recipe(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    stored = load_file(str(path / WEIGHTS_FILE))
    tensors, targets = {}, {}
    for name, meta in recipe["tensors"].items():
        params = {p: stored.pop(f"{name}:{p}") for p in meta["params"]}
        tensors[name] = QuantizedTensor.from_packed(meta, stored.pop(name + CODES_SUFFIX), params)
        targets[name] = WeightTarget(name, meta["module"], meta["param"], meta["kind"], meta["transposed"])
    missing, unexpected = model.load_state_dict(stored, strict=False)
    if unexpected:
        raise SourceError(f"{path}: unexpected tensors {unexpected[:3]}; the folder does not match its config.json")
    model.tie_weights()
    for name, qt in tensors.items():
        install_quantized(model, targets[name], qt)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return QuantizedModel(model, tokenizer, QuantScheme.from_dict(recipe["scheme"]), tensors, targets,
                          recipe["source"], recipe["method"], recipe.get("recipe", {}))
