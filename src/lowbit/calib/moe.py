"""Calibration statistics of routed experts (transformers 5's stacked 3-D expert weights).

An experts module receives (hidden_states, top_k_index, top_k_weights) and runs each token
through the experts its router chose. transformers describes every such module with the same
attributes (`use_experts_implementation`): `gate_up_proj` (or `up_proj` without a gate),
`down_proj`, optional `*_bias`, `is_transposed`, `has_gate`, `has_bias`, `_apply_gate` and
`act_fn`. From those, expert e's inputs are computed here without architecture code:
- the first projection's input: the hidden states of the tokens routed to e;
- down_proj's input: those tokens through e's (already quantized) first projection and gate.

An expert that calibration reaches with fewer than `min_tokens` tokens would get a Hessian from a
handful of rows (the most reported MoE failure in llm-compressor's and llama.cpp's trackers):
it gets the statistics of every calibration token instead, as llm-compressor's
all-experts calibration does, and is reported by name.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.calib import distributed

REQUIRED = ("is_transposed", "has_gate", "act_fn")


def is_routed_experts(module: torch.nn.Module) -> bool:
    """Whether a module follows transformers' stacked-experts contract (see the module doc)."""
    if not all(hasattr(module, a) for a in REQUIRED):
        return False
    first, down = getattr(module, first_projection(module), None), getattr(module, "down_proj", None)
    return all(isinstance(w, torch.Tensor) and w.ndim == 3 for w in (first, down))


def first_projection(module: torch.nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


@dataclasses.dataclass
class ExpertInputs:
    """What reached an experts module: per calibration batch, the hidden states (tokens, hidden)
    and the router's choices (tokens, k). `report` collects, per weight, tokens per expert and
    the experts that fell back to all tokens."""

    module: torch.nn.Module
    min_tokens: int = 128            # fewer routed tokens: the expert is calibrated on all tokens
    hessian_precision: str = "fp32"
    hidden: list = dataclasses.field(default_factory=list)
    index: list = dataclasses.field(default_factory=list)
    report: dict = dataclasses.field(default_factory=dict)

    def add(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        self.hidden.append(hidden.reshape(-1, hidden.shape[-1]).detach())
        self.index.append(top_k_index.reshape(hidden.numel() // hidden.shape[-1], -1).detach())

    @property
    def num_experts(self) -> int:
        return getattr(self.module, first_projection(self.module)).shape[0]

    def token_counts(self) -> list[int]:
        """Tokens routed to each expert, over every batch (and every rank)."""
        counts = torch.zeros(self.num_experts, dtype=torch.int64)
        for idx in self.index:
            counts += torch.bincount(idx.reshape(-1)[idx.reshape(-1) < self.num_experts], minlength=self.num_experts)
        return distributed.all_reduce_sum(counts).tolist()


def _project(module: torch.nn.Module, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    w = getattr(module, name)[e].float()
    out = x @ w if module.is_transposed else x @ w.T
    bias = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
    return out if bias is None else out + bias[e].float()


def expert_input(module: torch.nn.Module, param_name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert e's `param_name` weight for tokens x (hidden states)."""
    if param_name == first_projection(module):
        return x
    out = _project(module, first_projection(module), e, x)
    return module._apply_gate(out) if module.has_gate else module.act_fn(out)


def expert_hessians(inputs: ExpertInputs, param_name: str):
    """Yield (expert, H = Σ XᵀX of its inputs) for every expert of the module, one at a time (an
    expert's H can be hundreds of MB); tokens per expert and the all-token fallbacks go to
    inputs.report[param_name]."""
    from lowbit.calib.runner import LowerGram

    module = inputs.module
    counts = inputs.token_counts()
    inputs.report[param_name] = {"tokens": counts, "all_tokens": [e for e, n in enumerate(counts) if n < inputs.min_tokens]}
    for e in range(inputs.num_experts):
        fallback = counts[e] < inputs.min_tokens
        H = None
        for hidden, idx in zip(inputs.hidden, inputs.index):
            rows = hidden if fallback else hidden[(idx == e).any(dim=-1)]
            with torch.no_grad():
                X = expert_input(module, param_name, e, rows.float())
            if H is None:
                H = LowerGram(X.shape[1])
            if X.shape[0]:
                H.add(X, inputs.hessian_precision)
        H.all_reduce()
        yield e, H.finish()
