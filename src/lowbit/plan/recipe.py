"""Recipes: a quantization a user can write down, review and rerun (YAML).

    version: 1
    method: gptq                       # rtn | gptq | awq | smoothquant | hqq
    options: {damp: 0.01}              # the method's options
    calibration: {samples: 128, seqlen: 512, seed: 0, text: null, hessian_precision: fp32}
    scheme: W4A16                      # a preset, or {weights: {...}, activations: {...}}
    targets: ['self_attn', 'mlp']      # regexes of weight names to quantize (default: every weight)
    ignore: ['lm_head', 'embed']       # regexes kept in full precision (default: head, embeddings, norms, routers)
    groups:                            # later groups win
      - {name: down, targets: ['down_proj'], scheme: W8A16}
    budget: {target_bpw: 4.25, candidates: [int3_g64, int4_g64, int8_ch], fisher_windows: 16}
    gguf: {mix: Q4_K_M, fallback: measured}
    rotate: {kind: hadamard, seed: 0}  # an equivalence rotation of the model before any method

The CLI's flags build the same Recipe, so `lowbit quantize --recipe FILE` and the equivalent
flags run identically; the recipe that ran is written into every output. Unknown keys are an
error naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lowbit.calib import CalibrationConfig
from lowbit.errors import SchemeError
from lowbit.scheme import PRESET_NAMES, QuantScheme, WeightScheme, preset

RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SchemeGroup:
    """Targets (regexes searched in weight names) that get their own scheme."""

    name: str
    targets: tuple[str, ...]
    scheme: QuantScheme
    preset: str | None = None   # the preset name, when the scheme is one


@dataclasses.dataclass(frozen=True)
class Budget:
    """Choose each tensor's scheme among candidates to fit a size (exactly one of the two)."""

    target_bpw: float | None = None     # bits per weight over the quantized targets
    max_size: int | None = None         # bytes of the output's weights file
    candidates: tuple[str, ...] | None = None   # candidate spellings (parse_candidate); None: the container's default
    fisher_windows: int = 16

    def __post_init__(self):
        if (self.target_bpw is None) == (self.max_size is None):
            raise SchemeError("a budget takes exactly one of target_bpw and max_size")
        if self.target_bpw is not None and not 1.0 <= self.target_bpw <= 32.0:
            raise SchemeError(f"target bits per weight {self.target_bpw} is outside 1..32; pass e.g. --target-bpw 4.25")
        if self.fisher_windows < 1:
            raise SchemeError("fisher_windows must be at least 1")


@dataclasses.dataclass(frozen=True)
class Recipe:
    scheme: QuantScheme = dataclasses.field(default_factory=lambda: preset("W4A16"))
    preset: str | None = "W4A16"
    method: str = "rtn"
    options: dict = dataclasses.field(default_factory=dict)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    groups: tuple[SchemeGroup, ...] = ()
    budget: Budget | None = None
    gguf_mix: str | None = None
    gguf_fallback: str = "measured"
    rotate: str | None = None           # "hadamard": rotate the model (methods.rotation) first
    rotate_seed: int = 0
    imatrix: str | None = None          # llama.cpp importance matrix file weighting RTN's fits
    version: int = RECIPE_VERSION

    def __post_init__(self):
        from lowbit.methods import method_options

        method_options(self.method, dict(self.options))  # unknown method / option: an error now
        if self.method == "llm_int8":
            from lowbit.methods.llm_int8 import check_scheme

            for sch in (self.scheme, *(g.scheme for g in self.groups)):
                check_scheme(sch.weights, sch.activations)
            if self.budget is not None or self.gguf_mix is not None:
                raise SchemeError("--method llm_int8 fixes every weight to int8 rows; drop the budget / GGUF mix")
        codebook = [s.weights.format for s in (self.scheme, *(g.scheme for g in self.groups))
                    if s.weights.format.startswith("aqlm_")]
        if codebook and self.method not in ("rtn", "aqlm"):
            raise SchemeError(f"{codebook[0]} encodes 8 weights at a time: use --method aqlm (or rtn), not {self.method}")
        if self.method == "aqlm":
            want = method_options("aqlm", dict(self.options)).format_name()
            other = [s.weights.format for s in (self.scheme, *(g.scheme for g in self.groups)) if s.weights.format != want]
            if other:
                raise SchemeError(f"--method aqlm stores {want} (its --opt codebooks/codebook_bits); the scheme says "
                                  f"{other[0]}: pass --format {want} or drop --format")
        lattice = [s.weights.format for s in (self.scheme, *(g.scheme for g in self.groups)) if s.weights.format == "e8p"]
        if lattice and self.method not in ("quip", "rtn"):
            raise SchemeError(f"e8p encodes 8 weights at a time: use --method quip (or rtn), not {self.method}")
        if self.method == "quip":
            other = [s.weights.format for s in (self.scheme, *(g.scheme for g in self.groups)) if s.weights.format != "e8p"]
            if other:
                raise SchemeError(f"--method quip stores e8p (2 bits per weight); the scheme says {other[0]}: "
                                  "pass --format e8p or drop --format")
        if self.rotate is not None:
            from lowbit.methods.rotation import check_kind

            check_kind(self.rotate)
        if self.imatrix is not None and self.method != "rtn":
            raise SchemeError(f"--imatrix weights round-to-nearest's fits, as llama-quantize does; --method {self.method} "
                              "measures its own statistics from --calib: drop --imatrix or use --method rtn")
        if self.gguf_fallback not in ("measured", "llama.cpp"):
            raise SchemeError(f"unknown GGUF fallback policy {self.gguf_fallback!r}; use 'measured' or 'llama.cpp'")
        if self.gguf_mix is not None:
            from lowbit.plan.gguf_mixes import MIXES

            if self.gguf_mix not in MIXES:
                raise SchemeError(f"unknown GGUF mix {self.gguf_mix!r}; choose one of: {', '.join(MIXES)}")
            if self.budget is not None:
                raise SchemeError("a GGUF mix fixes every tensor's type; a budget chooses them: use one of the two")
            if self.groups:
                raise SchemeError("a GGUF mix fixes every tensor's type; drop the recipe's groups")
        for pattern in (self.targets or ()) + (self.ignore or ()) + tuple(p for g in self.groups for p in g.targets):
            _compile(pattern)

    def to_dict(self) -> dict:
        """The recipe as YAML/JSON data (what outputs record and `recipe_from_dict` reads back)."""
        out: dict[str, Any] = {"version": self.version, "method": self.method}
        if self.options:
            out["options"] = dict(sorted(self.options.items()))
        out["calibration"] = dataclasses.asdict(self.calibration)
        out["scheme"] = self.preset if self.preset else _scheme_dict(self.scheme)
        if self.targets is not None:
            out["targets"] = list(self.targets)
        if self.ignore is not None:
            out["ignore"] = list(self.ignore)
        if self.groups:
            out["groups"] = [{"name": g.name, "targets": list(g.targets),
                              "scheme": g.preset if g.preset else _scheme_dict(g.scheme)} for g in self.groups]
        if self.budget is not None:
            b = {k: v for k, v in dataclasses.asdict(self.budget).items() if v is not None}
            if "candidates" in b:
                b["candidates"] = list(b["candidates"])
            out["budget"] = b
        if self.gguf_mix is not None:
            out["gguf"] = {"mix": self.gguf_mix, "fallback": self.gguf_fallback}
        if self.rotate is not None:
            out["rotate"] = {"kind": self.rotate, "seed": self.rotate_seed}
        if self.imatrix is not None:
            out["imatrix"] = self.imatrix
        return out


def _scheme_dict(s: QuantScheme) -> dict:
    d = s.to_dict()
    d.pop("version", None)
    return d


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SchemeError(f"the regex {pattern!r} does not compile ({e}); fix it in the recipe or flag") from None


def _keys(data: dict, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise SchemeError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SchemeError(f"{where} has unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")


def scheme_from_value(value, where: str) -> tuple[QuantScheme, str | None]:
    """(scheme, preset name or None) from a preset name or a {weights, activations} mapping."""
    if isinstance(value, str):
        return preset(value), value.upper()
    if isinstance(value, dict):
        _keys(value, {"weights", "activations"}, where)
        try:
            return QuantScheme.from_dict(value), None
        except TypeError as e:
            raise SchemeError(f"{where}: {e}") from None
    raise SchemeError(f"{where} must be a preset name ({', '.join(PRESET_NAMES)}) or a mapping with 'weights' "
                      f"(and 'activations'), got {value!r}")


def _patterns(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SchemeError(f"{where} must be a list of regex strings")
    return tuple(value)


def recipe_from_dict(data: dict) -> Recipe:
    """A Recipe from parsed YAML/JSON; unknown keys and bad values are a SchemeError."""
    from lowbit.plan.budget import parse_size

    _keys(data, {"version", "method", "options", "calibration", "scheme", "targets", "ignore", "groups", "budget",
                 "gguf", "rotate", "imatrix"}, "the recipe")
    version = data.get("version", RECIPE_VERSION)
    if not isinstance(version, int) or version > RECIPE_VERSION:
        raise SchemeError(f"recipe version {version!r} is not one this lowbit reads (up to {RECIPE_VERSION}); upgrade lowbit")
    kw: dict[str, Any] = {"version": version}
    if "method" in data:
        kw["method"] = str(data["method"])
    if "options" in data:
        if not isinstance(data["options"] or {}, dict):
            raise SchemeError("options must be a mapping of the method's options, e.g. {damp: 0.01}")
        kw["options"] = dict(data["options"] or {})   # the method checks the names
    if "calibration" in data:
        cal = data["calibration"] or {}
        _keys(cal, {f.name for f in dataclasses.fields(CalibrationConfig)}, "calibration")
        kw["calibration"] = CalibrationConfig(**cal)
    if "scheme" in data:
        kw["scheme"], kw["preset"] = scheme_from_value(data["scheme"], "scheme")
    if "targets" in data:
        kw["targets"] = _patterns(data["targets"], "targets")
    if "ignore" in data:
        kw["ignore"] = _patterns(data["ignore"], "ignore")
    groups = []
    for i, g in enumerate(data.get("groups") or []):
        _keys(g, {"name", "targets", "scheme"}, f"groups[{i}]")
        if "targets" not in g or "scheme" not in g:
            raise SchemeError(f"groups[{i}] needs 'targets' and 'scheme'")
        s, p = scheme_from_value(g["scheme"], f"groups[{i}].scheme")
        groups.append(SchemeGroup(str(g.get("name", f"group_{i}")), _patterns(g["targets"], f"groups[{i}].targets"), s, p))
    kw["groups"] = tuple(groups)
    if data.get("budget") is not None:
        b = dict(data["budget"])
        _keys(b, {f.name for f in dataclasses.fields(Budget)}, "budget")
        if isinstance(b.get("max_size"), str):
            b["max_size"] = parse_size(b["max_size"])
        if b.get("candidates") is not None:
            b["candidates"] = _patterns(b["candidates"], "budget.candidates")
        kw["budget"] = Budget(**b)
    if data.get("gguf") is not None:
        _keys(data["gguf"], {"mix", "fallback"}, "gguf")
        kw["gguf_mix"] = str(data["gguf"].get("mix")).upper() if data["gguf"].get("mix") else None
        kw["gguf_fallback"] = data["gguf"].get("fallback", "measured")
    if data.get("rotate") is not None:
        r = data["rotate"] if isinstance(data["rotate"], dict) else {"kind": data["rotate"]}
        _keys(r, {"kind", "seed"}, "rotate")
        kw["rotate"] = str(r.get("kind", "hadamard"))
        if not isinstance(r.get("seed", 0), int):
            raise SchemeError(f"rotate.seed must be an integer, got {r['seed']!r}")
        kw["rotate_seed"] = r.get("seed", 0)
    if data.get("imatrix") is not None:
        if not isinstance(data["imatrix"], str):
            raise SchemeError(f"imatrix must be a file path, got {data['imatrix']!r}")
        kw["imatrix"] = data["imatrix"]
    try:
        return Recipe(**kw)
    except TypeError as e:
        raise SchemeError(f"the recipe: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """A Recipe from a YAML (or JSON) file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SchemeError(f"recipe {p} does not exist; pass a YAML file to --recipe")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise SchemeError(f"recipe {p} is not text (UTF-8); pass a YAML file to --recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SchemeError(f"recipe {p} does not parse as YAML{where}; fix its syntax") from None
    if not isinstance(data, dict):
        raise SchemeError(f"recipe {p} must be a YAML mapping of keys (method, scheme, ...), got {type(data).__name__}")
    return recipe_from_dict(data)


def as_recipe(value) -> Recipe:
    """A Recipe from a Recipe, a dict or a path to a YAML file."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, dict):
        return recipe_from_dict(value)
    if isinstance(value, (str, Path)):
        return load_recipe(value)
    raise SchemeError(f"a recipe is a Recipe, a dict or a YAML path, got {type(value).__name__}")


# --- budget candidates -----------------------------------------------------------------------
_INT = re.compile(r"^int([2-8])(?:_(g\d+|ch|tensor))?(_asym)?$")
_FLOAT = re.compile(r"^(nf4|fp4|fp8_e4m3|fp8_e5m2|fp8|ternary)(?:_(g\d+|ch|tensor))?(_dq)?$")


def _group(text: str | None, default: int) -> int:
    if text is None:
        return default
    return {"ch": -1, "tensor": 0}.get(text) if text in ("ch", "tensor") else int(text[1:])


def parse_candidate(text: str, base: WeightScheme | None = None) -> tuple[str, WeightScheme]:
    """(label, weight scheme) of a candidate spelling: a GGUF type (Q4_K), a preset (W4A16), or
    int4_g64[_asym], int8_ch, nf4_g64[_dq], fp8[_ch|_tensor], mxfp4, mxfp8, nvfp4. Integer
    candidates take the base scheme's observer."""
    from lowbit.plan.gguf_mixes import MIXES, lowbit_format

    t = text.strip()
    obs = {} if base is None else {"observer": base.observer, "percentile": base.percentile}
    if t.upper() in {v[0] for v in MIXES.values()} | {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}:
        return t.upper(), WeightScheme(lowbit_format(t.upper()), None, -1)
    if t.upper() in PRESET_NAMES:
        return t.upper(), preset(t).weights
    low = t.lower()
    if m := _INT.match(low):
        return low, WeightScheme("int", int(m.group(1)), _group(m.group(2), 128), m.group(3) is None, **obs)
    if m := _FLOAT.match(low):
        fmt = "fp8_e4m3" if m.group(1) == "fp8" else m.group(1)
        default = {"nf4": 64, "fp4": 32}.get(fmt, -1)
        return low, WeightScheme(fmt, None, _group(m.group(2), default), double_quant=m.group(3) is not None)
    if low in ("mxfp4", "mxfp8", "nvfp4"):
        return low, WeightScheme(low, None, 16 if low == "nvfp4" else 32)
    raise SchemeError(f"cannot read the budget candidate {text!r}; write a GGUF type (Q4_K), a preset (W4A16) or "
                      "e.g. int4_g64, int4_g64_asym, int8_ch, nf4_g64_dq, fp8_ch, nvfp4, mxfp4")


# default candidates per container: integer grids every runtime has kernels for
DEFAULT_INT_CANDIDATES = tuple(f"int{b}_g{g}" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))
