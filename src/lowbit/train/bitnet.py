"""BitNet b1.58 (Ma et al. 2024) trained from scratch: ternary weights {-1, 0, +1} times the
per-tensor absmean scale, inputs quantized to 8 bits per token (absmax), straight-through
gradients -- lowbit's `ternary` format and int8 activation fake quantization, refitted every
forward -- against the same model trained in full precision for the same steps.

The ternary model leaves as a lowbit folder (ternary codes, one fp16 scale per tensor, the
int8 input spec), which `lowbit eval` and `lowbit.load` read.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from lowbit.errors import SchemeError
from lowbit.model.load import LoadedModel
from lowbit.scheme import ActivationScheme, QuantScheme, WeightScheme
from lowbit.train.loop import Schedule, next_token_loss, train_steps

BITNET_B158 = QuantScheme(WeightScheme("ternary", None, 0), ActivationScheme("int", 8, "token", True))


@dataclasses.dataclass(frozen=True)
class TinyLlama:
    """The LLaMA shape trained from scratch (vocabulary from the tokenizer)."""

    layers: int = 4
    hidden: int = 256
    intermediate: int = 688
    heads: int = 4
    kv_heads: int = 4
    ctx: int = 512

    def build(self, vocab_size: int, seed: int) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise SchemeError(f"--hidden {self.hidden} must divide into --heads {self.heads} (and heads into KV heads)")
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.kv_heads, max_position_embeddings=self.ctx,
                             tie_word_embeddings=True)
        return LlamaForCausalLM(config)


@dataclasses.dataclass
class BitNetResult:
    qm: object                         # the ternary QuantizedModel
    losses: dict[str, list[float]]     # "ternary" and, when compared, "fp32"
    eval_loss: dict[str, float]        # next-token loss on held-out windows
    seconds: dict[str, float]


def run_bitnet(tokenizer, windows: torch.Tensor, held_out: torch.Tensor, shape: TinyLlama, schedule: Schedule,
               batch_size: int = 1, seed: int = 0, compare_fp32: bool = True, progress: bool = True) -> BitNetResult:
    """Train the ternary model (and the FP32 one from the same initial weights) on `windows`."""
    from lowbit.api import make_recipe
    from lowbit.plan import build_plan
    from lowbit.train.qat import convert, prepare

    vocab = len(tokenizer)
    base = shape.build(vocab, seed)
    runs = {"ternary": base}
    if compare_fp32:
        runs["fp32"] = copy.deepcopy(base)
    loaded = LoadedModel(base, tokenizer, f"from scratch: {dataclasses.asdict(shape)}", "hf")
    plan = build_plan(loaded, make_recipe(BITNET_B158, "rtn"), "native", progress=False)
    hooks = prepare(base, plan, scales="dynamic", train_others=True)
    losses, seconds, eval_loss = {}, {}, {}
    for kind, model in runs.items():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.0)
        t0 = time.perf_counter()
        losses[kind] = train_steps(model, opt, windows, schedule, batch_size, seed,
                                   lambda ids, m=model: next_token_loss(m, ids), desc=kind, progress=progress)
        seconds[kind] = time.perf_counter() - t0
    qm = convert(base, plan, tokenizer, loaded.source, hooks,
                 {"bitnet": {"shape": dataclasses.asdict(shape), "steps": schedule.steps, "lr": schedule.lr,
                             "losses": losses["ternary"]}})
    qm.method = "bitnet-b1.58"
    with torch.no_grad():
        for kind, model in (("ternary", qm.model), ("fp32", runs.get("fp32"))):
            if model is not None:
                eval_loss[kind] = float(sum(next_token_loss(model, w[None]) for w in held_out) / len(held_out))
    return BitNetResult(qm, losses, eval_loss, seconds)


def without_input_quant(qm):
    """The model's tensors without their input specs: what a GGUF holds (llama.cpp quantizes
    TQ2_0's inputs itself, to Q8_K: 8 bits per 256 values, in place of BitNet's per-token int8)."""
    return dataclasses.replace(qm, tensors={n: dataclasses.replace(qt, input_quant=None) for n, qt in qm.tensors.items()})
