"""QLoRA (Dettmers et al. 2023): frozen low-bit base weights (NF4 with double quantization by
default), LoRA adapters in full precision on the chosen Linears, saved in PEFT's layout.

The base weights stay packed (lowbit.runtime.packed.PackedLinear, decoded per call in bounded
row chunks); `_FrozenBaseMatmul` decodes them again in the backward for the input gradient
instead of keeping a dense copy for autograd (bitsandbytes' MatMul4Bit does the same).

    OUT/adapter_config.json, OUT/adapter_model.safetensors   PEFT loads these onto the base
    OUT/base/                                                 the quantized base, a lowbit folder
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from lowbit.errors import SchemeError
from lowbit.model.load import LoadedModel
from lowbit.model.targets import set_submodule
from lowbit.nn.quant_linear import QuantLinear
from lowbit.plan import Plan
from lowbit.runtime.packed import PackedLinear
from lowbit.train.loop import Schedule, next_token_loss, train_steps, training_windows

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FOLDER = "base"


class _FrozenBaseMatmul(torch.autograd.Function):
    """y = base(x) with no gradient to the base; dL/dx = dL/dy W, W decoded again chunk by chunk."""

    @staticmethod
    def forward(ctx, x, base: PackedLinear):
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad):
        base = ctx.base
        g = grad.reshape(-1, base.out_features).float()
        gx = g.new_zeros(g.shape[0], base.in_features)
        for r0, w in base.decoded_chunks():
            gx.addmm_(g[:, r0: r0 + w.shape[0]], w)
        return gx.reshape(*grad.shape[:-1], base.in_features).to(grad.dtype), None


class LoRALinear(torch.nn.Module):
    """A frozen base Linear plus B A x * alpha / r (A: (r, in), B: (out, r)); A is initialised
    like PEFT's (Kaiming-uniform), B with zeros, so training starts at the base. The base is a
    PackedLinear (QLoRA) or a full-precision nn.Linear (plain LoRA, the baseline)."""

    def __init__(self, base: PackedLinear | torch.nn.Linear, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(base, PackedLinear) and base.kernel != "decode":
            raise SchemeError(f"a QLoRA base must be a format decoded per call (nf4, fp4, nvfp4, mx...), not one with the "
                              f"{base.kernel} kernel; use --scheme NF4 (the default)")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / rank
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        bound = 1 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT use
        with torch.no_grad():
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenBaseMatmul.apply(x, self.base) if isinstance(self.base, PackedLinear) else self.base(x)
        return y + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(y.dtype) * self.scaling


def attach_lora(model: torch.nn.Module, module_names: list[str], rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Replace each named QuantLinear / PackedLinear with a LoRALinear over a packed base, or an
    nn.Linear with plain LoRA (in place); everything else is frozen. Returns the module names."""
    if rank <= 0:
        raise SchemeError(f"--rank must be positive, got {rank}")
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in module_names:
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            base = PackedLinear(module.qweight, module.bias, compute_dtype=torch.float32)
        elif isinstance(module, (PackedLinear, torch.nn.Linear)):
            base = module
        else:
            raise SchemeError(f"{name} is not a quantized Linear; QLoRA adapts the plan's quantized Linears")
        set_submodule(model, name, LoRALinear(base, rank, alpha, g))
    return list(module_names)


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's names: base_model.model.<module>.lora_A.weight, ..."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return dict(sorted(out.items()))


def adapter_config(module_names: list[str], rank: int, alpha: float, base: str) -> dict:
    """PEFT's LoraConfig fields for these adapters (exact module names as targets)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": sorted(module_names), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "inference_mode": True, "base_model_name_or_path": base}


@dataclasses.dataclass(frozen=True)
class QLoRAConfig:
    steps: int
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4
    warmup: int | None = None
    batch_size: int = 1
    ctx: int = 512
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        self.schedule  # validates steps and lr
        if self.rank <= 0:
            raise SchemeError(f"--rank must be positive, got {self.rank}")

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.lr, self.warmup)


@dataclasses.dataclass
class QLoRAResult:
    output: Path
    losses: list[float]
    adapted: list[str]
    seconds: dict


def run_qlora(loaded: LoadedModel, plan: Plan, text: str, text_label: str, cfg: QLoRAConfig,
              output: str | os.PathLike, force: bool = False, progress: bool = True,
              quantize_base: bool = True) -> QLoRAResult:
    """Quantize the base by the plan (RTN unless the recipe names another method), attach LoRA
    adapters to its quantized Linears, train them on `text`, write OUT (adapters + base).
    quantize_base=False trains the same adapters on the full-precision base (plain LoRA: the
    baseline QLoRA is measured against); OUT then holds the adapters only."""
    from safetensors.torch import save_file

    from lowbit.api import execute
    from lowbit.export.native import save, staged_output_dir

    torch.manual_seed(cfg.seed)
    windows = training_windows(loaded.tokenizer, text, cfg.ctx, cfg.batch_size)
    seconds = {}
    with staged_output_dir(output, force) as tmp:
        t0 = time.perf_counter()
        model = loaded.model
        if quantize_base:
            qm = execute(loaded, plan, progress=progress)
            names = [qm.targets[n].module_name for n in plan.tensors if qm.targets[n].kind == "linear"]
            save(qm, tmp / BASE_FOLDER)
            del qm
        else:
            from lowbit.model.targets import all_weights

            by_name = {w.name: w for w in all_weights(model)}
            names = [by_name[n].module_name for n in plan.tensors if by_name[n].kind == "linear"]
        if not names:
            raise SchemeError("the plan quantizes no Linear weights: QLoRA has nothing to adapt")
        attach_lora(model, names, cfg.rank, cfg.alpha, cfg.seed)
        seconds["init"] = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        t0 = time.perf_counter()
        losses = train_steps(model, optimizer, windows, cfg.schedule, cfg.batch_size, cfg.seed,
                             lambda ids: next_token_loss(model, ids), desc="qlora", progress=progress)
        seconds["train"] = time.perf_counter() - t0
        save_file(lora_state(model), str(tmp / ADAPTER_WEIGHTS))
        config = adapter_config(names, cfg.rank, cfg.alpha, loaded.source)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
        (tmp / "qlora.json").write_text(json.dumps({"qlora": dataclasses.asdict(cfg), "data": text_label,
                                                    "quantized_base": quantize_base, "recipe": plan.recipe.to_dict(),
                                                    "losses": losses}, indent=1, sort_keys=True))
    return QLoRAResult(Path(output), losses, names, seconds)


def _read_output(folder: str | os.PathLike, runtime: str):
    """(adapter config, the base as a QuantizedModel in `runtime`, adapter tensors) of a QLoRA output."""
    from safetensors.torch import load_file

    from lowbit.export.native import load as load_native

    folder = Path(folder)
    cfg_file = folder / ADAPTER_CONFIG
    if not cfg_file.is_file() or not (folder / BASE_FOLDER).is_dir():
        raise SchemeError(f"{folder} is not a lowbit QLoRA output (no {ADAPTER_CONFIG} and {BASE_FOLDER}/)")
    cfg = json.loads(cfg_file.read_text())
    qm = load_native(folder / BASE_FOLDER, runtime=runtime, compute_dtype=torch.float32)
    return cfg, qm, load_file(str(folder / ADAPTER_WEIGHTS))


def load(folder: str | os.PathLike) -> torch.nn.Module:
    """A QLoRA output as a runnable model: the packed base (fp32 compute) with its adapters."""
    cfg, qm, state = _read_output(folder, "packed")
    model = qm.model
    attach_lora(model, cfg["target_modules"], cfg["r"], cfg["lora_alpha"])
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(state[f"base_model.model.{name}.lora_A.weight"])
                m.lora_B.weight.copy_(state[f"base_model.model.{name}.lora_B.weight"])
    return model.eval()


def merge(folder: str | os.PathLike):
    """A QLoRA output merged into one full-precision model, as PEFT's merge_and_unload gives:
    every adapted weight is the decoded base plus (alpha / r) B A, every other quantized weight
    its decoded base, the rest as stored. Returns a LoadedModel ready for the plan (its source:
    the base's recorded source, so evaluation compares with the original model)."""
    from transformers import AutoModelForCausalLM

    from lowbit.model.load import LoadedModel

    cfg, qm, adapters = _read_output(folder, "decoded")
    dense = AutoModelForCausalLM.from_config(qm.model.config, dtype=torch.float32).eval()
    stored = dict(qm.model.named_parameters())
    scaling = cfg["lora_alpha"] / cfg["r"]
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name in qm.tensors:
                w = qm.tensors[name].dequantize(torch.float32)
                module = name.rsplit(".", 1)[0]
                a = adapters.get(f"base_model.model.{module}.lora_A.weight")
                if a is not None:
                    w = w + scaling * (adapters[f"base_model.model.{module}.lora_B.weight"].float() @ a.float())
                p.copy_(w)
            else:
                p.copy_(stored[name])
    return LoadedModel(dense, qm.tokenizer, qm.source, "merged")
