"""Quantization methods. Each decides which values to store; formats decide how.

A method is a module registered here by name. Data-free methods (rtn, hqq) provide
``quantize_weight(w, scheme, transposed, **options) -> QuantizedTensor``. Calibrated methods
(gptq, awq, smoothquant) provide ``Options`` (a dataclass), ``STATS`` (a StatsRequest: what the
layer-sequential runner must collect) and ``quantize_layer(model, layer_targets, stats, scheme,
options) -> (quantized tensors by name, names that fell back to RTN)``.
"""

import importlib

from lowbit.errors import SchemeError

REGISTRY = {
    "rtn": "lowbit.methods.rtn",
    "hqq": "lowbit.methods.hqq",
    "gptq": "lowbit.methods.gptq",
    "awq": "lowbit.methods.awq",
    "smoothquant": "lowbit.methods.smoothquant",
    "llm_int8": "lowbit.methods.llm_int8",
    "sparsegpt": "lowbit.methods.sparsegpt",
    "wanda": "lowbit.methods.wanda",
    "aqlm": "lowbit.methods.aqlm",
    "quip": "lowbit.methods.quip",
}


def get_method(name: str):
    """The module implementing a method."""
    if name not in REGISTRY:
        raise SchemeError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def is_calibrated(name: str) -> bool:
    return hasattr(get_method(name), "quantize_layer")


def method_options(name: str, options: dict):
    """The method's Options dataclass filled from a dict; unknown keys are a SchemeError."""
    import dataclasses

    cls = getattr(get_method(name), "Options", None)
    if cls is None:
        if options:
            raise SchemeError(f"method {name!r} takes no options, got {sorted(options)}")
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise SchemeError(f"method {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(**options)


def weight_and_hessian(model, target, stats, method: str, needs: str):
    """(parameter data, its float (out, in) matrix, XᵀX of its inputs) for a calibrated method
    that needs a Hessian per weight; SchemeError for a weight no calibration input reached."""
    from lowbit.tensor import to_matrix

    st = stats.get(target.name)
    if st is None or st.hessian is None:
        raise SchemeError(f"{target.name} saw no calibration inputs (a stacked expert?), so {method} has no "
                          f"{needs} for it; exclude it")
    w = target.parameter(model).data
    return w, to_matrix(w, target.transposed).float(), st.hessian
