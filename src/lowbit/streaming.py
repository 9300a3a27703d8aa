"""Quantize a safetensors checkpoint layer by layer into a lowbit folder, a GGUF file or a
compressed-tensors/GPTQ/AWQ folder, never holding more than one decoder layer's weights: the
model's parameters stay on the meta device (model.lazy), each layer is read from the shards
when the runner reaches it, quantized, written as a part file and freed.

The output is the same, byte for byte, as the resident run's (the same plan, method and
writer); only memory differs. Parts live in a hidden folder beside the output,
`.NAME.partial/`, written atomically, with the inputs of the next layer (calibrated methods):
a run killed at any point continues there with `resume=True` and gives the same bytes. The
output appears, by one rename, only when every part is merged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit import heap
from lowbit.calib import distributed
from lowbit.errors import LowbitError, SchemeError, SourceError
from lowbit.export.native import (RECIPE_FILE, WEIGHTS_METADATA, commit_output_dir, recipe_document,
                                  tensor_entries)
from lowbit.export.safetensors_io import stored_tensors, write_safetensors, write_sharded
from lowbit.model.lazy import materialize, materialize_parameters, release
from lowbit.model.load import LoadedModel
from lowbit.plan import Plan, Recipe
from lowbit.scheme import scheme_of
from lowbit.tensor import QuantizedTensor

ROW_BLOCK_ELEMENTS = 1 << 22   # weights read and quantized per step by data-free methods
RUN_FILE = "run.json"
ROTATION_FILE = "rotation.json"   # written last into a rotated checkpoint: what was done, and from what
HIDDEN_DIR = "hidden"     # rank{r}-layer{i}.safetensors: rank r's inputs of layer i + 1
PART_KEY = "lowbit_part"


def resident_reason(recipe: Recipe, container: str) -> str | None:
    """Why a run must hold the whole model in memory; None when it streams."""
    from lowbit.export import CHECKPOINT_EXPORTERS

    if container not in ("native", "gguf", *CHECKPOINT_EXPORTERS):
        return f"--to {container} is written from the whole model"
    return None


@dataclasses.dataclass
class StreamedResult:
    """What a streamed run reports (the output folder holds the rest)."""

    output: Path
    method: str
    weights_quantized: int
    quantized_bytes: int
    quantized_numel: int
    resumed_at_layer: int | None
    record: dict

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bytes * 8 / max(1, self.quantized_numel)


def _atomic_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, tensors, metadata)
    os.replace(tmp, path)


def _source_identity(loaded: LoadedModel) -> dict:
    """The source path and its files' sizes and times."""
    from importlib.metadata import version

    files = {t.file.name: [t.file.stat().st_size, t.file.stat().st_mtime_ns] for t in loaded.weights.tensors.values()}
    return {"source": loaded.source, "files": dict(sorted(files.items())), "lowbit": version("lowbit")}


def _identity(loaded: LoadedModel, plan: Plan) -> dict:
    """What a partial folder must match to be resumed: the source files and the plan."""
    return {**_source_identity(loaded), "recipe": plan.recipe.to_dict(), "plan": plan.summary(),
            "ranks": distributed.world()[1]}


class _Part:
    """A part file being filled: each quantized tensor is stored (codes packed) as it is added,
    so a layer's unpacked codes are never all held at once."""

    def __init__(self, run: "_StreamedRun", fallbacks: list[str]):
        self.run, self.tensors = run, {}
        self.info = {"tensors": {}, "sizes": {}, "fallbacks": fallbacks}

    def add(self, name: str, qt) -> None:
        from lowbit.nn.act_quant import input_quant_spec

        act = self.run.plan.tensors[name].activations
        if act is not None and not act.needs_calibration:   # static scales are added after every layer
            qt = dataclasses.replace(qt, input_quant=input_quant_spec(act, None))
        stored, self.info["tensors"][name] = tensor_entries(name, qt, self.run.targets[name])
        self.info["sizes"][name] = [qt.nbytes, qt.numel]
        self.tensors.update(stored)

    def write(self, key: str) -> None:
        if self.run.rank == 0:
            _atomic_safetensors(self.run.part_path(key), self.tensors, {PART_KEY: json.dumps(self.info, sort_keys=True)})
            self.run.check_export(key, self.info)
        self.run._remember(self.info)


class _StreamedRun:
    def __init__(self, loaded: LoadedModel, plan: Plan, output, force: bool, resume: bool,
                 max_shard_bytes: int | None = None, full_precision: str | None = None):
        self.loaded, self.plan, self.model, self.weights = loaded, plan, loaded.model, loaded.weights
        self.max_shard_bytes, self.full_precision = max_shard_bytes, full_precision
        self.final = Path(output)
        self.partial = self.final.parent / f".{self.final.name}.partial"
        self.parts = self.partial / "parts"
        self.rank = distributed.world()[0]
        if self.rank == 0:   # rank 0 owns the files; the other ranks read what it has checked
            self.resumed = self._open_partial(_identity(loaded, plan), resume)
        distributed.barrier()
        if self.rank != 0:
            self.resumed = resume and (self.partial / RUN_FILE).exists()
        self.metas: dict[str, dict] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def _open_partial(self, identity: dict, resume: bool) -> bool:
        """Check a partial folder to resume (True), or start a new one (False)."""
        if resume and (self.partial / RUN_FILE).exists():
            try:
                found = json.loads((self.partial / RUN_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                found = None
            if found != identity:
                differs = "nothing readable" if not isinstance(found, dict) else \
                    ", ".join(k for k in identity if found.get(k) != identity[k])
                raise SourceError(f"--resume: {self.partial} is from a different run ({differs} differ); rerun the "
                                  f"same command, or drop --resume to start over")
            return True
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.parts.mkdir(parents=True)
        (self.partial / HIDDEN_DIR).mkdir()
        (self.partial / RUN_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True))
        return False

    def _hidden_layers(self) -> list[int]:
        """Layers whose outputs this rank has saved."""
        return sorted(int(p.stem.split("-layer")[1]) for p in (self.partial / HIDDEN_DIR).glob(f"rank{self.rank}-layer*.safetensors"))

    def _hidden_path(self, layer: int) -> Path:
        return self.partial / HIDDEN_DIR / f"rank{self.rank}-layer{layer:05d}.safetensors"

    def save_hidden(self, layer: int, outputs: list) -> None:
        """This rank's inputs of the next layer; older ones go once every rank has saved these."""
        _atomic_safetensors(self._hidden_path(layer), {f"batch.{b:05d}": o.contiguous() for b, o in enumerate(outputs)}, {})
        distributed.barrier()
        for old in self._hidden_layers():
            if old < layer:
                self._hidden_path(old).unlink()

    def load_hidden(self) -> tuple[int, list | None]:
        """(first layer to run, its saved inputs) of a resumed run: the last layer every rank saved."""
        from safetensors.torch import load_file

        saved = self._hidden_layers()
        last = distributed.agree_min(saved[-1] if saved else -1)
        if last < 0:
            return 0, None
        stored = load_file(str(self._hidden_path(last)))
        return last + 1, [stored[f"batch.{b:05d}"] for b in range(len(stored))]

    # parts ----------------------------------------------------------------------------------
    def part_path(self, key: str) -> Path:
        return self.parts / f"{key}.safetensors"

    def done_part(self, key: str) -> dict | None:
        """The metadata of a finished part (a resumed run skips its work), else None."""
        path = self.part_path(key)
        if not path.exists():
            return None
        _, meta = stored_tensors(path)
        info = json.loads(meta[PART_KEY])
        self._remember(info)
        return info

    def check_export(self, key: str, info: dict) -> None:
        """A checkpoint format's refusals (export.checkpoint_exporter(..., "check")), run on each
        part with quantized weights as it is written (headers only, no codes read): a plan its
        exporter cannot hold stops at the first layer it reaches that the format refuses, not
        after the last, and its partial folder goes with it."""
        from types import SimpleNamespace

        from lowbit.export import checkpoint_exporter
        from lowbit.export.native import LazyTensors
        from lowbit.model.quantized import QuantizedModel

        if not info["tensors"] or self.plan.container in ("native", "gguf"):
            return
        stored, _ = stored_tensors(self.part_path(key))
        tensors = LazyTensors(SimpleNamespace(tensors=stored), info["tensors"], codes_on_meta=True)   # checks read no codes
        qm = QuantizedModel(self.model, None, self.plan.common_scheme(), tensors,
                            {n: self.targets[n] for n in info["tensors"]}, self.loaded.source, self.plan.recipe.method,
                            {}, self.plan)
        try:
            checkpoint_exporter(self.plan.container, "check")(qm)
        except SchemeError:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise

    def _remember(self, info: dict) -> None:
        self.metas.update(info["tensors"])
        self.sizes.update({n: tuple(v) for n, v in info["sizes"].items()})

    def new_part(self, fallbacks: list[str] = ()) -> "_Part":
        return _Part(self, list(fallbacks))

    def write_part(self, key: str, quantized: dict, full_precision: dict, fallbacks: list[str] = ()) -> None:
        """One part: quantized tensors (with their activation specs) and full-precision ones."""
        part = self.new_part(fallbacks)
        for name, qt in quantized.items():
            part.add(name, qt)
        part.tensors.update(full_precision)
        part.write(key)

    # the model's pieces ---------------------------------------------------------------------
    def full_precision_names(self, prefix: str) -> list[str]:
        """Checkpoint names under module `prefix` that stay in full precision."""
        from lowbit.model.lazy import checkpoint_names

        names = checkpoint_names(self.model)
        start = f"{prefix}." if prefix else ""
        return [n for n in names if n.startswith(start) and n not in self.plan.tensors]

    def value(self, name: str) -> torch.Tensor:
        module, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module), attr).detach().contiguous()

    def read_before_layers(self) -> list[str]:
        """Read every parameter outside the decoder layers except an untied head (what runs
        before the first layer: the embedding); returns the names of all those outside."""
        from lowbit.model.lazy import checkpoint_names

        outside = [n for n in checkpoint_names(self.model) if not n.startswith(self.prefix + ".")]
        head = getattr(self.model.get_output_embeddings(), "weight", None)
        embedding = self.model.get_input_embeddings().weight
        materialize_parameters(self.model, [n for n in outside if self.model.get_parameter(n) is not head
                                            or head is embedding], self.weights)
        return outside

    # the run --------------------------------------------------------------------------------
    def run(self, progress: bool) -> StreamedResult:
        from lowbit.api import finish_record, new_record
        from lowbit.calib.runner import find_decoder_layers
        from lowbit.methods import get_method, is_calibrated, method_options
        from lowbit.model.targets import all_weights

        recipe = self.plan.recipe
        impl = get_method(recipe.method)
        opts = method_options(recipe.method, dict(recipe.options))
        by_name = {w.name: w for w in all_weights(self.model)}
        targets = [by_name[n] for n in self.plan.tensors]
        self.targets = {t.name: t for t in targets}
        ws = self.plan.weight_schemes()
        self.prefix, layers = find_decoder_layers(self.model, targets)
        inner = [t for t in targets if t.module_name.startswith(self.prefix + ".")]
        outer = [t for t in targets if t not in inner]
        record = new_record(self.plan, opts)
        if getattr(self.model, "_lowbit_rotation", None) is not None:
            record["rotation"] = self.model._lowbit_rotation
        t0 = time.perf_counter()
        importance = {}
        if recipe.imatrix is not None:   # names and shapes only: the model may stay on meta
            from lowbit.api import imatrix_importance

            importance = imatrix_importance(self.model, targets, recipe.imatrix, record)
        if is_calibrated(recipe.method):
            resumed_at = self._calibrated(layers, inner, ws, impl, opts, record, progress)
            extra, outer_method = {}, None
        else:
            resumed_at = self._layerwise(layers, inner, ws, impl, opts, progress, importance)
            extra, outer_method = (dataclasses.asdict(opts) if opts is not None else {}), impl
        # every rank has dropped its older hidden states before rank 0 removes the folder
        distributed.barrier()
        if self.rank == 0:   # the other ranks only helped calibrate
            self._outside(outer, ws, outer_method, extra, record, importance)
            record["seconds"]["quantize"] = time.perf_counter() - t0
            if self.plan.needs_static_activations:
                self._static_activations(layers, inner, outer, record, progress)
            finish_record(record, self.plan)
            t0 = time.perf_counter()
            if self.plan.container == "gguf":
                self._finish_gguf(record, progress)
            elif self.plan.container == "native":
                self._finish(record)
            else:
                self._finish_checkpoint(record)
            record["seconds"]["write"] = time.perf_counter() - t0
        numel = sum(v[1] for v in self.sizes.values())
        return StreamedResult(self.final, recipe.method, len(self.metas), sum(v[0] for v in self.sizes.values()),
                              numel, resumed_at, record)

    def _layerwise(self, layers, inner, ws, impl, opts, progress, importance: dict) -> int | None:
        """Methods without calibration: one weight read and quantized at a time, a part per layer
        (the layer's full-precision tensors are copied from the source at the end); importance:
        an imatrix's per-column weights, by weight name."""
        extra = dataclasses.asdict(opts) if opts is not None else {}
        first_missing = None
        with torch.no_grad():
            for i in tqdm(range(len(layers)), desc=self.plan.recipe.method, disable=not progress, unit="layer"):
                key = f"layer-{i:05d}"
                if self.done_part(key) is not None:
                    continue
                first_missing = i if first_missing is None else first_missing
                part = self.new_part()
                for t in inner:
                    if t.module_name.startswith(f"{self.prefix}.{i}."):
                        weighted = {"importance": importance[t.name]} if t.name in importance else {}
                        quantize = lambda w, tr, t=t, weighted=weighted: impl.quantize_weight(w, ws[t.name], tr, **extra, **weighted)  # noqa: E731
                        # one importance per expert: the rows of a block must not cross experts
                        whole = bool(weighted) and weighted["importance"].ndim > 1
                        part.add(t.name, self.quantize_read(t, quantize, ws[t.name].make_format(), whole))
                part.write(key)
                del part
                heap.trim()
        return first_missing if self.resumed else None

    def quantize_read(self, t, quantize, fmt, whole: bool = False):
        """quantize(w, transposed) of a weight read from the checkpoint; a block of rows at a time
        where that gives the same result (a data-free method, rows the format keeps apart, no
        tensor-level parameters, not `whole`), so a large matrix is never whole in float32."""
        stored = self.weights.tensors[t.name]
        cols = stored.shape[-1]
        rows = stored.numel // cols if cols else 0
        step = max(1, ROW_BLOCK_ELEMENTS // max(1, cols))
        if whole or t.transposed or rows <= step or not fmt.rows_independent:
            return quantize(self.weights.read(t.name), t.transposed)
        first = quantize(stored.read_rows(0, step).float(), False)
        if first.group_size == 0 or any(v.ndim != 2 or v.shape[0] != step for v in first.params.values()):
            return quantize(self.weights.read(t.name), t.transposed)   # a per-tensor scale: the whole matrix
        blocks = [first] + [quantize(stored.read_rows(r, min(rows, r + step)).float(), False) for r in range(step, rows, step)]
        return QuantizedTensor(torch.cat([b.codes for b in blocks]),
                               {k: torch.cat([b.params[k] for b in blocks]) for k in first.params},
                               first.format, first.group_size, tuple(stored.shape), False)

    def _calibrated(self, layers, inner, ws, impl, opts, record, progress) -> int | None:
        """Calibrated methods: the layer-sequential runner, reading and writing around each layer."""
        from lowbit.api import _quantize_calibrated
        from lowbit.calib.runner import LayerHooks

        (first, hidden), fallbacks = self.load_hidden() if self.resumed else (0, None), []
        for i in range(first):
            info = self.done_part(f"layer-{i:05d}")
            if info is None:
                raise SourceError(f"--resume: {self.partial} lacks layer {i}; drop --resume to start over")
            fallbacks.extend(info["fallbacks"])
        tensors: dict = {}
        state = {"meta_layer": None, "fallbacks_before": len(fallbacks)}

        def before_capture():
            # a quantized embedding still feeds calibration in full precision (as in the resident
            # run, which quantizes it after the layers)
            self.read_before_layers()

        def before_layer(i):
            state["meta_layer"] = copy.deepcopy(layers[i])
            materialize(self.model, f"{self.prefix}.{i}", self.weights)

        def after_layer(i, outputs):
            prefix = f"{self.prefix}.{i}."
            mine = [t.name for t in inner if t.name.startswith(prefix)]
            new_fallbacks = fallbacks[state["fallbacks_before"]:]
            state["fallbacks_before"] = len(fallbacks)
            self.write_part(f"layer-{i:05d}", {n: tensors.pop(n) for n in mine},
                            {n: self.value(n) for n in self.full_precision_names(prefix[:-1])}, new_fallbacks)
            self.save_hidden(i, outputs)
            layers[i] = state["meta_layer"]
            heap.trim()

        hooks = LayerHooks(before_capture=before_capture, after_capture=lambda: release(self.model),
                           before_layer=before_layer, after_layer=after_layer, first_layer=first, hidden=hidden)
        _quantize_calibrated(self.model, self.loaded.tokenizer, inner, ws, impl, opts, self.plan.recipe.calibration,
                             record, progress, activations={n: t.activations for n, t in self.plan.tensors.items()},
                             hooks=hooks, tensors=tensors, fallbacks=fallbacks, cache_decoded=False)
        return first if self.resumed else None

    def _outside(self, outer, ws, impl, extra, record, importance: dict) -> None:
        """Targets outside the decoder layers (an included embedding or head): the method itself,
        or RTN after a calibrated method (as the resident run does), one part each."""
        from lowbit.methods import rtn

        for t in outer:
            key = "outside-" + t.name.replace("/", "_")
            if self.done_part(key) is None:
                w = self.weights.read(t.name)
                if impl is not None:
                    weighted = {"importance": importance[t.name]} if t.name in importance else {}
                    qt = impl.quantize_weight(w, ws[t.name], t.transposed, **extra, **weighted)
                else:
                    qt = rtn.quantize_weight(w, scheme_of(ws, t.name), t.transposed)
                del w
                self.write_part(key, {t.name: qt}, {})
            if impl is None:
                record.setdefault("rtn_fallback", []).append(t.name)

    @torch.no_grad()
    def _static_activations(self, layers, inner, outer, record: dict, progress: bool) -> None:
        """Static input scales, as the resident run calibrates them on the weight-quantized
        model, one layer in memory: the calibration windows' inputs of layer 0, then each layer
        read, its weights replaced by their quantized values from the parts, run on every batch
        with observers on the Linears that take a static scale."""
        from types import SimpleNamespace

        from lowbit.calib.activations import InputRange, clip_absmax
        from lowbit.calib.runner import _layer_output, capture_layer_inputs
        from lowbit.export.native import LazyTensors
        from lowbit.model.quantized import install_quantized
        from lowbit.nn.act_quant import input_quant_spec

        static = {n: t.activations for n, t in self.plan.tensors.items()
                  if t.activations is not None and t.activations.needs_calibration}
        ranges = {n: InputRange() for n in static}
        quantized = LazyTensors(SimpleNamespace(tensors=self._stored_parts()), self.metas)

        def install(ts):   # the weight-quantized model the resident run observes: no input quantization yet
            for t in ts:
                install_quantized(self.model, t, dataclasses.replace(quantized[t.name], input_quant=None))

        def observe(ts):   # pre-hooks recording the inputs of the targets that take a static scale
            return [self.model.get_submodule(t.module_name).register_forward_pre_hook(
                lambda _m, args, r=ranges[t.name], keep=static[t.name].observer != "minmax": r.add(args[0], keep))
                for t in ts if t.name in static]

        cal = self.plan.recipe.calibration
        windows = cal.windows(self.loaded.tokenizer)
        outside = self.read_before_layers()
        install([t for t in outer if t.kind != "linear"])   # a quantized embedding, in place; a head runs last
        batches = capture_layer_inputs(self.model, layers[0], windows, cal.batch_size)
        release(self.model)
        for i in tqdm(range(len(layers)), desc="activation ranges", disable=not progress, unit="layer"):
            meta_layer = copy.deepcopy(layers[i])
            materialize(self.model, f"{self.prefix}.{i}", self.weights)
            mine = [t for t in inner if t.module_name.startswith(f"{self.prefix}.{i}.")]
            install(mine)
            handles = observe(mine)
            batches = [(_layer_output(layers[i](h, **kw)), kw) for h, kw in batches]
            for h in handles:
                h.remove()
            layers[i] = meta_layer
            heap.trim()
        heads = [t for t in outer if t.name in static]
        if heads:   # a static head: it reads the final norm of the last layer's outputs
            from lowbit.model.arch import FINAL_NORMS

            final = next((self.model.get_submodule(n) for n in FINAL_NORMS if _has_module(self.model, n)), None)
            if final is None:
                raise SchemeError(f"a static input scale for {heads[0].name} needs the model's final norm, which lowbit "
                                  f"does not find ({', '.join(FINAL_NORMS)}); give it a dynamic one, or exclude it")
            kept = {t.module_name: copy.deepcopy(self.model.get_submodule(t.module_name)) for t in heads}   # on meta
            materialize_parameters(self.model, outside, self.weights)
            install(heads)
            handles = observe(heads)
            for h, _ in batches:
                self.model.get_submodule(heads[0].module_name)(final(h))
            for h in handles:
                h.remove()
            for name, module in kept.items():
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, module)
            release(self.model)
        for n, act in static.items():
            self.metas[n]["input_quant"] = input_quant_spec(act, clip_absmax(ranges[n], act))
        record["activation_calibration"] = "calibration windows"

    def _stored_parts(self) -> dict:
        """Every tensor of the part files, as byte ranges (nothing read)."""
        every = {}
        for part in sorted(self.parts.glob("*.safetensors")):
            stored, _ = stored_tensors(part)
            every.update(stored)
        return every

    def _finish_gguf(self, record: dict, progress: bool) -> None:
        """Write the GGUF file tensor by tensor: quantized weights from the parts, full-precision
        ones from the parts or the source, each read when it is written; then drop the parts."""
        from types import SimpleNamespace

        from lowbit.export.gguf import _Model, write_gguf
        from lowbit.export.native import LazyTensors
        from lowbit.model.quantized import recorded_recipe

        every = self._stored_parts()
        recipe = recorded_recipe({"method": self.plan.recipe.method, "scheme": self.plan.common_scheme().to_dict(), **record})
        m = _Model(self.model, self.loaded.tokenizer, LazyTensors(SimpleNamespace(tensors=every), self.metas),
                   self.loaded.source, recipe, _FloatValues(every, self.weights))
        write_gguf(m, self.final, full_precision=self.full_precision, force=True, progress=progress)
        shutil.rmtree(self.partial)

    def _finish_checkpoint(self, record: dict) -> None:
        """A compressed-tensors, GPTQ or AWQ folder, written by its exporter from the parts: each
        quantized weight read when packed (the packed tensors spill to disk past a bound), the
        full-precision ones copied from the parts or the source."""
        from types import SimpleNamespace

        from lowbit.export import checkpoint_exporter
        from lowbit.export.native import LazyTensors
        from lowbit.model.quantized import QuantizedModel

        every = self._stored_parts()
        qm = QuantizedModel(self.model, self.loaded.tokenizer, self.plan.common_scheme(),
                            LazyTensors(SimpleNamespace(tensors=every), self.metas), self.targets, self.loaded.source,
                            self.plan.recipe.method, record, self.plan, floats=_FloatValues(every, self.weights))
        checkpoint_exporter(self.plan.container)(qm, self.final, force=True, max_shard_bytes=self.max_shard_bytes)
        shutil.rmtree(self.partial)

    def _finish(self, record: dict) -> None:
        """Merge the parts (and the untouched full-precision tensors, read from the source) into the
        output folder, then rename it into place."""
        every = self._stored_parts()
        for name in self.full_precision_names(""):
            if name not in every:
                every[name] = self.weights.tensors[name].converted("F32")
        write_sharded(self.partial, every, WEIGHTS_METADATA, self.max_shard_bytes)
        shutil.rmtree(self.parts)
        shutil.rmtree(self.partial / HIDDEN_DIR)
        (self.partial / RUN_FILE).unlink()
        bpw = sum(v[0] for v in self.sizes.values()) * 8 / max(1, sum(v[1] for v in self.sizes.values()))
        (self.partial / RECIPE_FILE).write_text(recipe_document(self.loaded.source, self.plan.recipe.method,
                                                                self.plan.common_scheme(), bpw, record, self.metas))
        self.model.config.save_pretrained(self.partial)
        if self.loaded.tokenizer is not None:
            self.loaded.tokenizer.save_pretrained(self.partial)
        commit_output_dir(self.partial, self.final)


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


class _FloatValues:
    """name -> float32 value of a tensor lowbit did not quantize: from the part files (what the
    run computed with) or else the source checkpoint, read when asked for."""

    def __init__(self, parts: dict, weights):
        self.parts, self.weights = parts, weights

    def __contains__(self, name) -> bool:
        return name in self.parts or name in self.weights.tensors

    def __getitem__(self, name) -> torch.Tensor:
        return self.parts[name].read() if name in self.parts else self.weights.read(name)

    def stored(self, name):
        """The value's bytes on disk (a StoredTensor), in the dtype it was stored in."""
        return self.parts[name] if name in self.parts else self.weights.tensors[name]

    def read_rows(self, name, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of a matrix, in float32 (the GGUF writer's embedding and head, a block at a time)."""
        return self.stored(name).read_rows(r0, r1).float()


@torch.no_grad()
def rotate_streamed(loaded: LoadedModel, kind: str, seed: int, folder, resume: bool = False,
                    progress: bool = True) -> LoadedModel:
    """Rotate a lazily loaded checkpoint (methods.rotation) one decoder layer at a time into a
    float32 safetensors checkpoint in `folder` (with an index), and return the model opened
    lazily on it. The values are the resident rotation's, bit for bit (the same functions on the
    same float32 weights). The logit check runs the probe through each layer before and after
    it is rotated, so it needs no second copy of anything. resume=True reuses a finished
    rotation of the same source; a RotationError leaves nothing behind."""
    from lowbit.methods.rotation import prepare_rotation
    from lowbit.model.lazy import CheckpointWeights

    folder = Path(folder)
    model, weights = loaded.model, loaded.weights
    rot = prepare_rotation(model, kind, seed)
    identity = {**_source_identity(loaded), "kind": kind, "seed": seed}
    rank = distributed.world()[0]
    done = folder / ROTATION_FILE
    if rank == 0 and not (resume and done.exists() and json.loads(done.read_text()).get("identity") == identity):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        try:
            info = _rotate_into(model, weights, rot, folder, progress)
        except LowbitError:   # a model it cannot rotate leaves nothing; a crash keeps nothing reusable either
            shutil.rmtree(folder, ignore_errors=True)
            raise
        _atomic_json(done, {"identity": identity, "info": info})
    distributed.barrier()
    model._lowbit_rotation = json.loads(done.read_text())["info"]
    return dataclasses.replace(loaded, weights=CheckpointWeights(folder))


def _atomic_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _rotate_into(model, weights, rot, folder: Path, progress: bool) -> dict:
    from lowbit.calib.runner import _layer_output, capture_layer_inputs
    from lowbit.methods.rotation import check_norms, logit_change, probe_ids, rotate_embedding, rotate_head, rotate_layer
    from lowbit.model.lazy import INDEX_FILE, checkpoint_names

    params = checkpoint_names(model)
    name_of = {id(p): n for n, p in params.items()}
    emb_name, head_name = name_of[id(rot.emb.weight)], name_of[id(rot.head.weight)]
    # a head untied for the rotation has no tensor of its own in the source: it starts as the embedding
    head_source = emb_name if rot.info["untied_head"] else head_name
    index: dict[str, str] = {}

    def write(file: str, names: list[str]) -> None:
        tensors = {n: model.get_parameter(n).detach().contiguous() for n in names}
        _atomic_safetensors(folder / file, tensors, {"format": "pt"})
        index.update({n: file for n in names})

    def read(names: list[str], source: dict | None = None) -> None:
        for n in names:
            module, _, attr = n.rpartition(".")
            setattr(model.get_submodule(module), attr,
                    torch.nn.Parameter(weights.read((source or {}).get(n, n)), requires_grad=False))

    def drop(names: list[str]) -> None:
        for n in names:
            module, _, attr = n.rpartition(".")
            setattr(model.get_submodule(module), attr, torch.nn.Parameter(params[n].data, requires_grad=False))

    norm_params = [name_of[id(norm.weight)] for norm in rot.norms()]
    read(norm_params)
    check_norms(rot)   # every norm before anything is written
    ids = probe_ids(model)
    read([emb_name])
    (hidden, kwargs), = capture_layer_inputs(model, rot.layers[0], ids, 1)
    rotate_embedding(rot)
    (rotated, kwargs_r), = capture_layer_inputs(model, rot.layers[0], ids, 1)
    write("model-embedding.safetensors", [emb_name])
    drop([emb_name])
    for i in tqdm(range(len(rot.layers)), desc="rotate", disable=not progress, unit="layer"):
        mine = [n for n in params if n.startswith(f"{rot.layers_name}.{i}.")]
        read([n for n in mine if n not in norm_params])
        hidden = _layer_output(rot.layers[i](hidden, **kwargs))
        rotate_layer(rot, i)
        rotated = _layer_output(rot.layers[i](rotated, **kwargs_r))
        write(f"model-layer-{i:05d}.safetensors", mine)
        drop(mine)
        heap.trim()
    outside = [n for n in params if n not in index and n != head_name]   # the final norm
    read([head_name], {head_name: head_source})
    before = _head_logits(model, rot, hidden)
    rotate_head(rot)
    after = _head_logits(model, rot, rotated)
    rot.info["max_relative_logit_change"] = logit_change(before, after, model)
    write("model-head.safetensors", sorted({*outside, head_name}))
    drop([head_name, *outside])
    _atomic_json(folder / INDEX_FILE, {"metadata": {}, "weight_map": dict(sorted(index.items()))})
    return rot.info


def _head_logits(model, rot, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's forward makes of the last layer's output: the final norm, the head and,
    where the config has one, the logit soft-cap."""
    logits = rot.head(rot.final(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.double()


def quantize_streamed(loaded: LoadedModel, plan: Plan, output, force: bool = False, resume: bool = False,
                      progress: bool = True, max_shard_bytes: int | None = None,
                      full_precision: str | None = None) -> StreamedResult:
    """Quantize a lazily loaded checkpoint (model.load.load_lazy) under `plan` into `output`, one
    decoder layer in memory at a time: a lowbit folder, or (a plan for the gguf container) one
    GGUF file written tensor by tensor (full_precision: its F32/F16/BF16 decoded variant).
    resume=True continues a killed run. A recipe's rotation is applied first, layer by layer,
    into a hidden float32 checkpoint beside the output (`.NAME.rotated/`), read by the run and
    removed with it."""
    if loaded.weights is None:
        raise SchemeError("quantize_streamed needs a lazily loaded source (lowbit.model.load.load_lazy)")
    why = resident_reason(plan.recipe, plan.container)
    if why is not None:
        raise SchemeError(f"this run cannot stream: {why}")
    output = Path(output)
    if output.exists() and not force:
        raise SourceError(f"output {output} already exists; choose another --output or pass --force")
    heap.serve_large_from_mmap()
    rotated = None
    if plan.recipe.rotate is not None and getattr(loaded.model, "_lowbit_rotation", None) is None:
        rotated = output.parent / f".{output.name}.rotated"
        loaded = rotate_streamed(loaded, plan.recipe.rotate, plan.recipe.rotate_seed, rotated, resume, progress)
    run = _StreamedRun(loaded, plan, output, force, resume, max_shard_bytes, full_precision)
    try:
        result = run.run(progress)
    except LowbitError:
        # bad input found on the way leaves nothing behind; a crash or a kill keeps the parts for --resume
        if not run.resumed and run.rank == 0:
            shutil.rmtree(run.partial, ignore_errors=True)
            if rotated is not None:
                shutil.rmtree(rotated, ignore_errors=True)
        raise
    distributed.barrier()   # every rank has read the rotated weights it needs
    if rotated is not None and run.rank == 0:
        shutil.rmtree(rotated)
    return result
