"""The plan: the one place that decides what each target weight becomes.

A Plan holds, per target weight, its weight scheme, its activation spec, why (preset, recipe
group, llama.cpp mix rule, shape fallback, budget allocation) and the estimated cost (stored
bytes in the output container; for budgets the Fisher-estimated KL divergence of rounding it).
Methods execute a plan, exporters serialise its result; neither decides. ``lowbit plan``
prints one without quantizing (like ``llama-quantize --dry-run``).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from lowbit.errors import SchemeError
from lowbit.model.targets import WeightTarget, all_weights, select_targets
from lowbit.plan.recipe import Budget, Recipe, as_recipe, load_recipe, parse_candidate, recipe_from_dict
from lowbit.plan.sizing import CONTAINERS, container_fits, tensor_nbytes
from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme
from lowbit.tensor import to_matrix

__all__ = ["Plan", "TensorPlan", "Recipe", "Budget", "build_plan", "as_recipe", "load_recipe", "recipe_from_dict"]

# SmoothQuant exists to quantize activations: without a spec it gets the W8A8 one
SMOOTHQUANT_DEFAULT_ACTIVATIONS = ActivationScheme("int", 8, "token", True)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """What one weight becomes."""

    name: str
    shape: tuple[int, ...]          # (rows, cols) matrix view
    weights: WeightScheme
    activations: ActivationScheme | None
    reason: str
    nbytes: int                     # stored bytes in the output container
    label: str | None = None        # GGUF type or budget candidate label
    cost: float | None = None       # Fisher-estimated KL of rounding (budgets)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "weights": self.weights.label(),
             "activations": None if self.activations is None else self.activations.label(),
             "reason": self.reason, "bytes": self.nbytes, "bits_per_weight": self.nbytes * 8 / self.numel}
        if self.label is not None:
            d["type"] = self.label
        if self.cost is not None:
            d["estimated_kld"] = self.cost
        return d


@dataclasses.dataclass
class Plan:
    recipe: Recipe
    container: str
    tensors: dict[str, TensorPlan]
    kept: list[str]                 # weights left in full precision
    fixed_bytes: int                # everything of the weights file that is not a planned tensor
    budget: dict | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def weight_schemes(self) -> dict[str, WeightScheme]:
        return {n: t.weights for n, t in self.tensors.items()}

    @property
    def quantized_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bytes * 8 / max(1, sum(t.numel for t in self.tensors.values()))

    @property
    def estimated_file_bytes(self) -> int:
        return self.fixed_bytes + self.quantized_bytes

    @property
    def needs_static_activations(self) -> bool:
        return any(t.activations is not None and t.activations.needs_calibration for t in self.tensors.values())

    def common_scheme(self) -> QuantScheme:
        """The most common weight scheme with the most common activation spec (a mixed plan's
        headline; each tensor's own choice is in `tensors`)."""
        import collections

        weights = collections.Counter(t.weights for t in self.tensors.values()).most_common(1)[0][0]
        acts = collections.Counter(t.activations for t in self.tensors.values()).most_common(1)[0][0]
        return QuantScheme(weights, acts)

    def summary(self) -> list[dict]:
        """Tensors grouped by (weights, activations, reason): the compact form outputs record."""
        groups: dict[tuple, dict] = {}
        for t in self.tensors.values():
            key = (t.weights.label(), None if t.activations is None else t.activations.label(), t.label, t.reason)
            g = groups.setdefault(key, {"weights": key[0], "activations": key[1], **({"type": t.label} if t.label else {}),
                                        "reason": t.reason, "tensors": []})
            g["tensors"].append(t.name)
        return list(groups.values())

    def to_dict(self, tensors: bool = True) -> dict:
        d = {"recipe": self.recipe.to_dict(), "container": self.container,
             "weights_planned": len(self.tensors), "bits_per_weight": self.bits_per_weight,
             "quantized_bytes": self.quantized_bytes, "estimated_file_bytes": self.estimated_file_bytes,
             "kept_full_precision": self.kept}
        if self.budget is not None:
            d["budget"] = self.budget
        if self.notes:
            d["notes"] = self.notes
        if tensors:
            d["tensors"] = [t.to_dict() for t in self.tensors.values()]
        return d


def _scale_bytes(model: torch.nn.Module) -> int:
    dtype = next(model.parameters()).dtype
    return 2 if dtype == torch.float16 else 4


def _check_patterns(patterns, names: list[str], what: str) -> None:
    for p in patterns or ():
        if not any(re.search(p, n) for n in names):
            raise SchemeError(f"{what} {p!r} matches no weight of this model; fix the regex "
                              f"(weights are named like {names[0]!r})")


def _activations_for(target: WeightTarget, act: ActivationScheme | None, notes: list[str]):
    if act is None:
        return None
    if target.kind in ("experts", "embedding"):
        notes.append(f"{target.name}: a {target.kind} weight has no single input to quantize; its inputs stay in "
                     "full precision")
        return None
    return act


def build_plan(loaded, recipe=None, container: str = "native", progress: bool = True) -> Plan:
    """The plan for `loaded` (a LoadedModel) under `recipe` (a Recipe, dict or YAML path),
    for an output written by `container`. Nothing is quantized; a budget runs a few calibration
    windows to measure each weight's sensitivity (diagonal Fisher)."""
    recipe = as_recipe(recipe if recipe is not None else Recipe())
    if container not in CONTAINERS:
        raise SchemeError(f"unknown output {container!r}; choose one of: {', '.join(CONTAINERS)}")
    model = loaded.model
    notes: list[str] = []
    names = [w.name for w in all_weights(model)]
    if recipe.gguf_mix is not None or (container == "gguf" and recipe.budget is not None):
        if container != "gguf":
            raise SchemeError(f"a GGUF mix ({recipe.gguf_mix}) is a llama.cpp file layout; write it with --to gguf")
        if recipe.targets is not None or recipe.ignore is not None:
            raise SchemeError("a GGUF mix or budget covers every weight llama.cpp quantizes; drop --include/--exclude "
                              "(targets/ignore in the recipe)")
        targets = _gguf_targets(model)
    else:
        _check_patterns(recipe.targets, names, "the target regex")
        targets = select_targets(model, list(recipe.targets) if recipe.targets is not None else None,
                                 list(recipe.ignore) if recipe.ignore is not None else None)
        if not targets:
            raise SchemeError("no weights matched the include/exclude patterns; loosen --include/--exclude")
    target_names = [t.name for t in targets]
    for g in recipe.groups:
        _check_patterns(g.targets, target_names, f"recipe group {g.name!r}: the regex")
    kept = sorted(set(names) - set(target_names))
    base_act = recipe.scheme.activations
    if recipe.method == "smoothquant" and base_act is None and not any(g.scheme.activations for g in recipe.groups):
        base_act = SMOOTHQUANT_DEFAULT_ACTIVATIONS
        notes.append(f"smoothquant without an activation spec: inputs {base_act.label()} (the W8A8 preset's)")
    scale_bytes = _scale_bytes(model)

    def entry(t: WeightTarget, ws: WeightScheme, act, reason: str, label=None, cost=None, nbytes=None) -> TensorPlan:
        rows, cols = to_matrix(t.parameter(model).data, t.transposed).shape
        if not container_fits(container, ws, cols) and container in ("gguf", "compressed-tensors"):
            raise SchemeError(f"{t.name}: {container} cannot store rows of {cols} columns as {ws.label()}; "
                              f"choose a group size dividing {cols}, or another output")
        act = _activations_for(t, act, notes)
        if act is not None and container in ("gguf", "gptq", "awq"):
            raise SchemeError(f"--to {container} holds weights only, not quantized inputs ({act.label()}); use a "
                              "weight-only scheme, or --to native / compressed-tensors for activation quantization")
        if act is not None and container == "compressed-tensors" and (
                act.format in ("mxfp8", "mxfp4", "fp8_e5m2") or (act.format == "nvfp4" and act.dynamic)):
            raise SchemeError(f"compressed-tensors cannot store {act.label()} inputs the way lowbit computes them; "
                              "use int8, fp8 (E4M3) or nvfp4 with a static global scale, or --to native")
        n = nbytes if nbytes is not None else tensor_nbytes(container, ws, rows, cols, scale_bytes, act is not None)
        return TensorPlan(t.name, (rows, cols), ws, act, reason, n, label, cost)

    budget = None
    if recipe.gguf_mix is not None:
        from lowbit.plan.gguf import mix_schemes

        # an importance matrix, or a calibrated method's Hessians: llama.cpp's rules for a
        # quantizer that weighs errors by importance apply
        from lowbit.methods import is_calibrated

        weighted = recipe.imatrix is not None or bool(recipe.method and is_calibrated(recipe.method))
        read = None
        if getattr(loaded, "weights", None) is not None:   # parameters on meta: measured fallbacks read the checkpoint
            def read(t):
                p = t.parameter(model)
                return loaded.weights.read(t.name) if p.is_meta else p.data
        schemes, rows = mix_schemes(model, recipe.gguf_mix, fallback_policy=recipe.gguf_fallback, imatrix=weighted,
                                    read=read)
        by_name = {t.name: t for t in targets}
        plan = {}
        for hf, _gname, type_name, reason in rows:
            if hf not in schemes:
                notes.append(f"{hf}: llama.cpp's {recipe.gguf_mix} keeps it as {type_name}")
                kept.append(hf)
                continue
            why = f"llama.cpp mix {recipe.gguf_mix} -> {type_name}" + (f"; fallback: {reason}" if reason else "")
            plan[hf] = entry(by_name[hf], schemes[hf], base_act, why, type_name)
        tensors = plan
        kept = sorted(set(kept))
    elif recipe.budget is not None:
        tensors, budget = _budget_plan(loaded, recipe, targets, container, base_act, scale_bytes, entry, progress)
    else:
        tensors = {}
        for t in targets:
            ws, act, reason = recipe.scheme.weights, base_act, (f"preset {recipe.preset}" if recipe.preset else "scheme")
            for g in recipe.groups:
                if any(re.search(p, t.name) for p in g.targets):
                    ws, act = g.scheme.weights, g.scheme.activations
                    reason = f"recipe group {g.name!r}" + (f" (preset {g.preset})" if g.preset else "")
            tensors[t.name] = entry(t, ws, act, reason)
    fixed = _fixed_bytes(loaded, container, set(tensors))
    if budget is not None and budget.get("max_bytes") is not None:
        budget["estimated_file_bytes"] = fixed + sum(t.nbytes for t in tensors.values())
    return Plan(recipe, container, tensors, kept, fixed, budget, _dedupe(notes))


def _dedupe(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(notes))


def _gguf_targets(model) -> list[WeightTarget]:
    from lowbit.export.gguf import _gguf_name
    from lowbit.plan.gguf import gguf_name_map

    name_map = gguf_name_map(model.config)
    return [t for t in all_weights(model) if _gguf_name(name_map, t.name) is not None]


def _fixed_bytes(loaded, container: str, planned: set[str]) -> int:
    """Bytes of the weights file that planned tensors do not account for: full-precision tensors
    as written, plus the container's header (GGUF: metadata and tokenizer too)."""
    model = loaded.model
    if container == "gguf":
        from lowbit.export.gguf import _arch, _gguf_name, _plan_tensors, _unpack, metadata_bytes
        from lowbit.plan.gguf import gguf_name_map

        name_map = gguf_name_map(model.config)
        every = _plan_tensors(_unpack(loaded), _arch(model.config), {}, "F32", name_map)
        planned_gguf = {_gguf_name(name_map, hf) for hf in planned}
        fixed = sum(e.numel() * 4 for e in every if e.gname not in planned_gguf)
        return fixed + metadata_bytes(loaded, {e.gname: e.shape for e in every})
    seen, fixed = set(), 0
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)   # a tied head is the embedding's Parameter (data pointers say nothing on meta)
        if name in planned or key in seen:
            seen.add(key)
            continue
        seen.add(key)
        fixed += t.numel() * t.element_size()
    # safetensors header: ~ 100 bytes of JSON per tensor (a few per quantized one)
    return fixed + 128 * (len(model.state_dict()) + 3 * len(planned)) + 8


def _budget_plan(loaded, recipe: Recipe, targets, container, base_act, scale_bytes, entry, progress):
    """Per-tensor schemes chosen under recipe.budget (Fisher-priced knapsack)."""
    from lowbit.calib.fisher import diagonal_fisher
    from lowbit.plan.budget import BUDGET_TYPES, Candidate, allocate, price_candidates, price_tensor
    from lowbit.plan.recipe import DEFAULT_INT_CANDIDATES

    b = recipe.budget
    if container in ("gptq", "awq"):
        raise SchemeError(f"a size budget mixes schemes per tensor, which the {container} layout cannot hold; "
                          "write --to native, compressed-tensors or gguf")
    if recipe.groups:
        raise SchemeError("a budget chooses every tensor's scheme; drop the recipe's groups (or the budget)")
    spellings = b.candidates or (BUDGET_TYPES if container == "gguf" else DEFAULT_INT_CANDIDATES)
    candidates = []
    for s in spellings:
        label, ws = parse_candidate(s, recipe.scheme.weights)
        if container == "gguf" and not ws.format.startswith("gguf_"):
            raise SchemeError(f"budget candidate {s!r} is not a GGUF type; a GGUF budget chooses among "
                              f"{', '.join(BUDGET_TYPES)}")
        candidates.append(Candidate(label, ws))
    model = loaded.model

    def nbytes(c, rows, cols):
        return tensor_nbytes(container, c.scheme, rows, cols, scale_bytes, base_act is not None)

    def fits(c, cols):
        return container_fits(container, c.scheme, cols)

    if loaded.tokenizer is None:
        raise SchemeError("a size budget measures sensitivity on calibration text: pass the model's tokenizer")
    windows = recipe.calibration.windows(loaded.tokenizer)[: b.fisher_windows]
    if loaded.weights is not None:   # parameters on meta: one layer at a time, each priced when its F is done
        import tempfile

        from lowbit.calib.fisher import layerwise_fisher

        options = {}

        def consume(t, W, F):
            options[t.name] = price_tensor(t, W, F, candidates, nbytes, fits)

        with tempfile.TemporaryDirectory(prefix="lowbit-fisher-") as work:
            layerwise_fisher(model, loaded.weights, windows, targets, consume, work, recipe.calibration.seed, progress)
        options = {t.name: options[t.name] for t in targets}
    else:
        fisher = diagonal_fisher(model, windows, targets, recipe.calibration.seed, progress)
        options = price_candidates(model, fisher, targets, candidates, nbytes, fits, progress)
        del fisher
    numel = sum(to_matrix(t.parameter(model).data, t.transposed).numel() for t in targets)
    if b.target_bpw is not None:
        data_budget = int(b.target_bpw * numel / 8)
        what = f"target {b.target_bpw} bits per weight"
    else:
        fixed = _fixed_bytes(loaded, container, {t.name for t in targets})
        data_budget = b.max_size - fixed
        what = f"--max-size {b.max_size / 1e6:.2f} MB"
        if data_budget <= 0:
            raise SchemeError(f"--max-size {b.max_size / 1e6:.2f} MB does not even hold the full-precision tensors and "
                              f"headers ({fixed / 1e6:.2f} MB); raise it")
    floor = sum(min(c.nbytes for c in options[n]) for n in options)
    if floor > data_budget:
        raise SchemeError(f"{what} is below the smallest candidates ({floor * 8 / numel:.3f} bits per weight, "
                          f"{floor / 1e6:.2f} MB of weights); raise the budget or add smaller candidates")
    chosen = allocate(options, data_budget)
    by_label = {c.label: c.scheme for c in candidates}
    tensors = {}
    for t in targets:
        c = chosen[t.name]
        tensors[t.name] = entry(t, by_label[c.label], base_act, f"budget: {what}", c.label, c.cost, c.nbytes)
    if container == "gguf":
        from lowbit.export.gguf import _gguf_name
        from lowbit.plan.gguf import gguf_name_map

        name_map = gguf_name_map(model.config)
        names = {t.name: _gguf_name(name_map, t.name) for t in targets}
    else:
        names = {t.name: t.name for t in targets}
    counts: dict[str, int] = {}
    for c in chosen.values():
        counts[c.label] = counts.get(c.label, 0) + 1
    data = sum(c.nbytes for c in chosen.values())
    report = {"target_bpw": b.target_bpw, "max_bytes": b.max_size, "tensor_data_bytes": data,
              "bits_per_weight": data * 8 / numel, "predicted_kld_rtn": sum(c.cost for c in chosen.values()),
              "fisher_windows": int(windows.shape[0]), "candidates": [c.label for c in candidates],
              "counts": dict(sorted(counts.items())),
              "choices": {names[n]: c.label for n, c in sorted(chosen.items())}}
    return tensors, {k: v for k, v in report.items() if v is not None}
