"""LLM.int8() (Dettmers et al. 2022; bitsandbytes' `load_in_8bit`): weights int8 per output row
(absmax / 127, round to nearest); at run time the input columns holding outlier features (any
value of the call at or above the threshold, 6.0 by default) are multiplied in full precision
with the dequantized rows' columns, the rest in int8 per token. The outlier split is the
activation spec of the LLM_INT8 preset (scheme.ActivationScheme.outlier_threshold); this method
stores the weights and refuses a scheme that is not that one, so the name means bitsandbytes'
semantics."""

from __future__ import annotations

from lowbit.errors import SchemeError
from lowbit.methods import rtn
from lowbit.scheme import WeightScheme

WEIGHTS = WeightScheme("int", 8, -1, True)


def check_scheme(weights: WeightScheme, activations) -> None:
    if weights != WEIGHTS or activations is None or activations.outlier_threshold is None:
        raise SchemeError("--method llm_int8 stores int8 rows and splits off outlier input columns: use "
                          "--scheme LLM_INT8 (or int8 per-channel sym weights with an outlier_threshold on int8 "
                          "per-token inputs in a recipe)")


def quantize_weight(w, scheme: WeightScheme, transposed: bool = False):
    if scheme != WEIGHTS:   # the recipe checked the activations
        check_scheme(scheme, None)
    return rtn.quantize_weight(w, scheme, transposed)
