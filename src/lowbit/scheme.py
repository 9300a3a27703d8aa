"""Quantization schemes: typed, validated, serialisable values with named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from lowbit.errors import SchemeError
from lowbit.formats import Format, FORMATS, make_format
from lowbit.observers import OBSERVERS

SCHEME_VERSION = 1


def _from_dict(cls, data: dict[str, Any], what: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise SchemeError(f"{what} has unknown key(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    """How weights are stored. group_size > 0: groups along the input dimension (a last partial
    group where it does not divide the row); -1: one group per output channel; 0: per tensor."""

    format: str = "int"
    bits: int | None = 4
    group_size: int = 128
    symmetric: bool = True
    zero_point: str = "int"
    observer: str = "minmax"
    percentile: float = 99.9
    double_quant: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise SchemeError(f"unknown format {self.format!r}; choose one of: {', '.join(sorted(FORMATS))}")
        if self.observer not in OBSERVERS:
            raise SchemeError(f"unknown observer {self.observer!r}; choose one of: {', '.join(OBSERVERS)}")
        if self.group_size < -1:
            raise SchemeError(f"group size {self.group_size} is invalid; use a positive size, -1 (per channel) or 0 (per tensor)")
        self.make_format()  # validates bits and options now, not at first use

    def make_format(self) -> Format:
        """The format object this scheme describes."""
        cls = FORMATS[self.format]
        names = {f.name for f in dataclasses.fields(cls)}
        options = {k: getattr(self, k) for k in ("bits", "symmetric", "zero_point", "double_quant") if k in names}
        if options.get("bits") is None:
            options.pop("bits", None)
        fmt = make_format(self.format, **options)
        if self.bits is not None and "bits" not in names and self.bits != fmt.code_bits:
            raise SchemeError(f"format {self.format!r} stores {fmt.code_bits}-bit codes, not {self.bits}; drop --bits or choose --format int")
        return fmt

    def effective_group_size(self) -> int:
        """Group size after the format's own block size (MX 32, NVFP4 16) takes precedence."""
        fixed = FORMATS[self.format].fixed_group_size
        return fixed if fixed is not None else self.group_size

    def label(self) -> str:
        fmt = self.make_format()
        g = self.effective_group_size()
        gtxt = {-1: "per-channel", 0: "per-tensor"}.get(g, f"g{g}")
        if self.format == "int":
            kind = "sym" if self.symmetric else ("asym" if self.zero_point == "int" else "asym-fmin")
            return f"int{fmt.code_bits} {gtxt} {kind}"
        return f"{self.format} {gtxt}" + (" dq" if self.double_quant else "")


# activation formats: block formats fix their block along the last dim (NVFP4 16, MX 32)
ACTIVATION_FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp8", "mxfp4")
ACTIVATION_BLOCK = {"nvfp4": 16, "mxfp8": 32, "mxfp4": 32}


@dataclasses.dataclass(frozen=True)
class ActivationScheme:
    """How a Linear's input is quantized at run time.

    int / fp8: one scale per token (dynamic) or per tensor (dynamic, or static: calibrated on
    calibration activations with `observer`). nvfp4: E4M3 scales per block of 16 computed from
    each block, and a per-tensor global scale that is static (calibrated, compressed-tensors'
    "local" dynamic) or dynamic. mxfp8 / mxfp4: E8M0 scales per block of 32, always dynamic."""

    format: str = "int"
    bits: int = 8
    granularity: str = "token"     # token | tensor | block (nvfp4, mx)
    dynamic: bool = True
    symmetric: bool = True
    observer: str = "minmax"       # static ranges: minmax | percentile | mse | kl
    percentile: float = 99.9
    outlier_threshold: float | None = None

    def __post_init__(self):
        if self.outlier_threshold is not None:
            if (self.format, self.bits, self.granularity, self.dynamic) != ("int", 8, "token", True):
                raise SchemeError("outlier columns (LLM.int8) go with int8 per-token dynamic activations, not "
                                  f"{self.format} {self.bits}-bit per-{self.granularity}")
            if not self.outlier_threshold > 0:
                raise SchemeError(f"the outlier threshold must be positive, got {self.outlier_threshold}")
        if self.format not in ACTIVATION_FORMATS:
            raise SchemeError(f"activation format must be one of {', '.join(ACTIVATION_FORMATS)}, got {self.format!r}")
        if not self.symmetric:
            raise SchemeError("asymmetric activation quantization is not supported; use symmetric activations")
        if self.observer not in OBSERVERS:
            raise SchemeError(f"unknown activation observer {self.observer!r}; choose one of: {', '.join(OBSERVERS)}")
        if self.format == "int":
            if not 2 <= self.bits <= 8:
                raise SchemeError(f"integer activations take 2..8 bits, got {self.bits}")
        elif self.format.startswith("fp8") or self.format == "mxfp8":
            if self.bits != 8:
                raise SchemeError(f"{self.format} activations are 8-bit, got bits={self.bits}")
        elif self.bits != 4:
            raise SchemeError(f"{self.format} activations are 4-bit, got bits={self.bits}")
        if self.format in ACTIVATION_BLOCK:
            if self.granularity != "block":
                raise SchemeError(f"{self.format} activations are scaled per block; use granularity 'block', not {self.granularity!r}")
            if self.format.startswith("mx") and not self.dynamic:
                raise SchemeError(f"{self.format} activation scales come from each block: it is always dynamic")
        else:
            if self.granularity not in ("token", "tensor"):
                raise SchemeError(f"{self.format} activation granularity must be 'token' or 'tensor', got {self.granularity!r}")
            if self.granularity == "token" and not self.dynamic:
                raise SchemeError("per-token activation scales are dynamic; a static scale is per tensor (granularity 'tensor')")

    @property
    def needs_calibration(self) -> bool:
        """True when a scale is fixed before run time from calibration activations."""
        return not self.dynamic

    def label(self) -> str:
        name = f"int{self.bits}" if self.format == "int" else self.format
        if self.format in ACTIVATION_BLOCK:
            scale = "dynamic" if self.dynamic else f"static global ({self.observer})"
            return f"{name} block{ACTIVATION_BLOCK[self.format]} {scale}"
        outliers = "" if self.outlier_threshold is None else f", columns reaching {self.outlier_threshold:g} in full precision"
        return f"{name} per-{self.granularity} " + ("dynamic" if self.dynamic else f"static ({self.observer})") + outliers


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """Weights, optional activations, optional KV cache; versioned for serialisation."""

    weights: WeightScheme = dataclasses.field(default_factory=WeightScheme)
    activations: ActivationScheme | None = None
    version: int = SCHEME_VERSION

    def label(self) -> str:
        w = self.weights.label()
        return w if self.activations is None else f"{w}, inputs {self.activations.label()}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantScheme":
        data = dict(data)
        if data.get("version", SCHEME_VERSION) > SCHEME_VERSION:
            raise SchemeError(f"scheme version {data['version']} is newer than this lowbit; upgrade lowbit")
        weights = _from_dict(WeightScheme, data.pop("weights", {}), "weights scheme")
        acts = data.pop("activations", None)
        acts = _from_dict(ActivationScheme, acts, "activations scheme") if acts else None
        rest = _from_dict(cls, {**data, "weights": weights, "activations": acts}, "scheme")
        return rest


def scheme_of(schemes, name: str) -> WeightScheme:
    """The weight scheme of one parameter: `schemes` is one WeightScheme for all, or a mapping
    from parameter name to WeightScheme (per-tensor choices such as GGUF mixes)."""
    if isinstance(schemes, WeightScheme):
        return schemes
    return schemes[name]


def _presets() -> dict[str, QuantScheme]:
    # names and meanings follow compressed-tensors' presets (what llm-compressor users type)
    int8_token = ActivationScheme("int", 8, "token", True)
    fp8_token = ActivationScheme("fp8_e4m3", 8, "token", True)
    return {
    "W4A16": QuantScheme(WeightScheme("int", 4, 128, True)),
    "W4A16_G32_ASYM": QuantScheme(WeightScheme("int", 4, 32, False)),
    "W3A16_G32": QuantScheme(WeightScheme("int", 3, 32, False)),
    "W8A16": QuantScheme(WeightScheme("int", 8, -1, True)),
    "W8A8": QuantScheme(WeightScheme("int", 8, -1, True), int8_token),
    "W8A8_STATIC": QuantScheme(WeightScheme("int", 8, -1, True), ActivationScheme("int", 8, "tensor", False)),
    "W4A8": QuantScheme(WeightScheme("int", 4, 128, True), int8_token),
    "FP8": QuantScheme(WeightScheme("fp8_e4m3", None, 0), ActivationScheme("fp8_e4m3", 8, "tensor", False)),
    "FP8_DYNAMIC": QuantScheme(WeightScheme("fp8_e4m3", None, -1), fp8_token),
    "FP8_WEIGHT": QuantScheme(WeightScheme("fp8_e4m3", None, -1)),
    "NF4": QuantScheme(WeightScheme("nf4", None, 64, double_quant=True)),
    "MXFP4": QuantScheme(WeightScheme("mxfp4", None, 32), ActivationScheme("mxfp4", 4, "block", True)),
    "MXFP4A16": QuantScheme(WeightScheme("mxfp4", None, 32)),
    "MXFP8": QuantScheme(WeightScheme("mxfp8", None, 32), ActivationScheme("mxfp8", 8, "block", True)),
    "MXFP8A16": QuantScheme(WeightScheme("mxfp8", None, 32)),
    "NVFP4": QuantScheme(WeightScheme("nvfp4", None, 16), ActivationScheme("nvfp4", 4, "block", False)),
    "NVFP4A16": QuantScheme(WeightScheme("nvfp4", None, 16)),
    "TERNARY": QuantScheme(WeightScheme("ternary", None, -1)),
    # bitsandbytes' load_in_8bit: int8 rows (absmax / 127), inputs int8 per token with the
    # columns reaching 6.0 kept in full precision
    "LLM_INT8": QuantScheme(WeightScheme("int", 8, -1, True), ActivationScheme("int", 8, "token", True,
                                                                                outlier_threshold=6.0)),
    }


PRESET_NAMES = ("W4A16", "W4A16_G32_ASYM", "W3A16_G32", "W8A16", "W8A8", "W8A8_STATIC", "W4A8", "FP8", "FP8_DYNAMIC",
                "FP8_WEIGHT", "NF4", "MXFP4", "MXFP4A16", "MXFP8", "MXFP8A16", "NVFP4", "NVFP4A16", "TERNARY", "LLM_INT8")


def preset(name: str) -> QuantScheme:
    """A named preset (case-insensitive)."""
    key = name.upper()
    if key not in PRESET_NAMES:
        raise SchemeError(f"unknown scheme preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    return _presets()[key]
