"""Quantization-aware training: prepare a plan's targets for fake quantization, fine-tune
(optionally distilling from the full-precision model), convert back to the QuantizedModel that
every exporter reads.

    student = prepare(model, plan, init=ptq.tensors)      # parametrizations, in place
    ... train ...
    qm = convert(student, plan, tokenizer, source)         # codes + stored trained parameters

`run_qat` is the whole job behind `lowbit qat`: PTQ init (rtn / gptq / awq ...), AdamW with
linear warm-up and a cosine schedule, next-token loss or KL to the teacher's logits,
checkpoints every K steps beside the output and a resume that continues bit-identically
(the batch of each step, the learning rate and the optimizer state are functions of the step
and the checkpoint alone).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from lowbit.errors import SchemeError
from lowbit.model.load import LoadedModel
from lowbit.model.quantized import QuantizedModel, install_quantized
from lowbit.model.targets import all_weights
from lowbit.plan import Plan
from lowbit.tensor import QuantizedTensor, to_matrix
from lowbit.train.loop import NonFiniteLoss, Schedule, next_token_loss, train_steps, training_windows
from lowbit.train.fake_quant import (InputFakeQuant, WeightFakeQuant, add_weight_fake_quant, latent_weight,
                                     remove_weight_fake_quant)


def prepare(model: torch.nn.Module, plan: Plan, init: dict[str, QuantizedTensor] | None = None,
            scales: str = "auto", clip_ste: bool = False, train_others: bool = False,
            input_specs: dict[str, dict] | None = None) -> dict:
    """Put every planned weight of `model` under fake quantization (in place) and freeze the
    rest. init: QuantizedTensors to start from (a PTQ result): the latent weight becomes their
    decoded values and the group parameters theirs, so training starts at that model exactly;
    their input quantization (W8A8, ...) is fake-quantized too. Without init, parameters are
    fitted by the scheme's observer and inputs follow the plan's dynamic activation specs.
    input_specs: input quantization by weight name where init gives none (a resumed run's).
    train_others: leave every other parameter trainable too (training from scratch, BitNet).
    Returns the removable input hooks by weight name."""
    from lowbit.nn.act_quant import input_quant_spec

    by_name = {w.name: w for w in all_weights(model)}
    missing = [n for n in plan.tensors if n not in by_name]
    if missing:
        raise SchemeError(f"the plan names weights this model does not have ({missing[0]}, ...); plan this model")
    for p in model.parameters():
        p.requires_grad_(train_others)
    hooks = {}
    for name, tp in plan.tensors.items():
        t = by_name[name]
        module = model.get_submodule(t.module_name)
        param = getattr(module, t.param_name)
        qt = None if init is None else init.get(name)
        if qt is not None:
            with torch.no_grad():
                param.copy_(qt.dequantize(param.dtype))
        fq = WeightFakeQuant(tp.weights, tuple(param.shape), t.transposed, scales, None, clip_ste)
        if fq.mode != "dynamic":  # parameters exist from the start: the optimizer and checkpoints see them
            fq.init_params(qt.params if qt is not None else fq.fit(to_matrix(param.detach(), t.transposed)))
        fq.target = t  # convert() finds each weight's layout here (a parametrized model renames its parameters)
        add_weight_fake_quant(module, t.param_name, fq)
        latent_weight(module, t.param_name).requires_grad_(True)
        spec = qt.input_quant if qt is not None else (input_specs or {}).get(name) or (
            input_quant_spec(tp.activations) if tp.activations is not None and tp.activations.dynamic else None)
        if tp.activations is not None and spec is None:
            raise SchemeError(f"{name}: static activation scales need calibration; start from a PTQ result (init=) "
                              "or use a dynamic activation scheme")
        if spec is not None:
            hooks[name] = module.register_forward_pre_hook(InputFakeQuant(spec))
            fq.input_quant = spec
    return hooks


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything a resumed run needs of the model: latent weights, learned and fixed group
    parameters, and every other tensor (a PTQ start such as AWQ folds scales into norms);
    tensors sharing storage (a tied head) once, under their first name."""
    out, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach()
    return out


def convert(model: torch.nn.Module, plan: Plan, tokenizer, source: str, hooks: dict | None = None,
            record: dict | None = None) -> QuantizedModel:
    """The trained model as a QuantizedModel: each fake-quantized weight becomes the codes and
    stored parameters its training forward decoded (bit for bit), installed as QuantLinear
    or written in place, exactly as a PTQ method leaves it."""
    prepared = _prepared(model)
    tensors, targets = {}, {}
    for name in plan.tensors:
        fq = prepared.get(name)
        if fq is None:
            raise SchemeError(f"{name} is not prepared for fake quantization; call prepare(model, plan) first")
        t = fq.target
        module = model.get_submodule(t.module_name)
        qt = fq.quantized(latent_weight(module, t.param_name))
        spec = getattr(fq, "input_quant", None)
        if spec is not None:
            qt = dataclasses.replace(qt, input_quant=dict(spec))
        remove_weight_fake_quant(module, t.param_name)
        if hooks and name in hooks:
            hooks[name].remove()
        install_quantized(model, t, qt)
        tensors[name], targets[name] = qt, t
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    rec = {"targets": len(tensors), "kept_full_precision": plan.kept, "recipe": plan.recipe.to_dict(),
           "plan": plan.summary(), **(record or {})}
    return QuantizedModel(model, tokenizer, plan.common_scheme(), tensors, targets, source, "qat", rec, plan)


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """A QAT run. lr: peak learning rate of the latent weights and learned scales (AdamW,
    betas 0.9/0.95, no weight decay), reached after `warmup` steps (default 5% of steps), then
    cosine to 0. distill: loss = KL(teacher || student) on the logits (temperature 1) instead
    of the next-token loss."""

    steps: int
    lr: float = 1e-5
    warmup: int | None = None
    batch_size: int = 1
    ctx: int = 512
    distill: bool = False
    scales: str = "auto"
    clip_ste: bool = False
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        self.schedule  # validates steps and lr
        if self.checkpoint_every < 0:
            raise SchemeError("--checkpoint-every must be >= 0 (0: no checkpoints)")

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.lr, self.warmup)


def qat_loss(student: torch.nn.Module, teacher: torch.nn.Module | None, ids: torch.Tensor) -> torch.Tensor:
    if teacher is None:
        return next_token_loss(student, ids)
    logits = student(ids, use_cache=False).logits.float()
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(ids, use_cache=False).logits.float(), dim=-1)
    s_logp = F.log_softmax(logits, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


CHECKPOINT_FILE = "checkpoint.json"


def checkpoint_dir(output: str | os.PathLike) -> Path:
    out = Path(output)
    return out.parent / f"{out.name}.qat-checkpoint"


def _fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_checkpoint(folder: Path, step: int, model, optimizer, params: list, identity: dict, losses: list,
                     ptq: dict, input_specs: dict) -> None:
    from safetensors.torch import save_file

    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in checkpoint_state(model).items()}, str(tmp / "state.safetensors"))
    opt = {}
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            opt[f"{i}.{k}"] = v.detach().contiguous()
    save_file(opt, str(tmp / "optimizer.safetensors"))
    (tmp / CHECKPOINT_FILE).write_text(json.dumps({"step": step, "fingerprint": _fingerprint(identity),
                                                   "identity": identity, "losses": losses, "ptq": ptq,
                                                   "input_specs": input_specs}, indent=1, default=str))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():  # the previous checkpoint stays until the new one is in place
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(folder: Path, identity: dict) -> dict:
    """The checkpoint's metadata, if it belongs to this run (one line otherwise)."""
    meta_file = folder / CHECKPOINT_FILE
    if not meta_file.is_file():
        raise SchemeError(f"--resume: {folder} holds no QAT checkpoint; run without --resume to start")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise SchemeError(f"--resume: {meta_file} is not readable ({e}); remove {folder} and start again") from None
    if meta.get("fingerprint") != _fingerprint(identity):
        theirs = meta.get("identity", {})
        diff = sorted(k for k in set(identity) | set(theirs) if json.dumps(identity.get(k), default=str)
                      != json.dumps(theirs.get(k), default=str))
        raise SchemeError(f"--resume: the checkpoint in {folder} comes from another run (it differs in "
                          f"{', '.join(diff) or 'its settings'}); pass the same flags, or remove it to start again")
    return meta


def _load_checkpoint(folder: Path, model, optimizer, params: list) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "state.safetensors"))
    current = checkpoint_state(model)
    if set(state) != set(current):
        raise SchemeError(f"--resume: the checkpoint in {folder} does not match this model; remove it to start again")
    with torch.no_grad():
        for k, v in state.items():
            current[k].copy_(v)
    opt = load_file(str(folder / "optimizer.safetensors"))
    for i, p in enumerate(params):
        entries = {k.split(".", 1)[1]: v.to(p.device) for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
        if entries:
            optimizer.state[p] = entries


def ptq_start(loaded: LoadedModel, plan: Plan, progress: bool = True) -> tuple[dict[str, QuantizedTensor], dict]:
    """Run the plan's PTQ method on a copy of the model; the model itself takes every change the
    method made outside the planned weights (AWQ / SmoothQuant scales folded into norms and
    biases), so prepare(model, plan, init=tensors) starts exactly at the PTQ model. Returns the
    tensors and what the method recorded (calibration, options, RTN fallbacks)."""
    from lowbit.api import execute

    ptq = execute(LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.source, loaded.kind), plan,
                  progress=progress)
    quantized = dict(ptq.model.named_parameters())
    quantized.update(dict(ptq.model.named_buffers()))
    with torch.no_grad():
        for name, p in list(loaded.model.named_parameters()) + list(loaded.model.named_buffers()):
            if name not in plan.tensors and name in quantized and quantized[name].shape == p.shape:
                p.copy_(quantized[name])
    record = {k: v for k, v in ptq.recipe.items() if k in ("calibration", "options", "rtn_fallback")}
    return ptq.tensors, record


def _prepared(model: torch.nn.Module) -> dict[str, WeightFakeQuant]:
    """The fake-quantized weights of a prepared model, by weight name."""
    return {fq.target.name: fq for m in model.modules() if parametrize.is_parametrized(m)
            for plist in m.parametrizations.values() for fq in plist if isinstance(fq, WeightFakeQuant)}


@dataclasses.dataclass
class QATResult:
    qm: QuantizedModel
    losses: list[float]
    resumed_from: int
    checkpoint: Path | None


def run_qat(loaded: LoadedModel, plan: Plan, text: str, text_label: str, cfg: QATConfig, output: str | os.PathLike,
            resume: bool = False, progress: bool = True, on_step: Callable[[int, float], None] | None = None,
            init: dict[str, QuantizedTensor] | None = None) -> QATResult:
    """PTQ init by the plan's method (or from `init`, the tensors of a PTQ result of this plan),
    then `cfg.steps` steps of QAT on `text`; returns the converted QuantizedModel (not yet
    saved). Checkpoints go to checkpoint_dir(output)."""
    from lowbit.train.fake_quant import resolve_mode

    torch.manual_seed(cfg.seed)
    windows = training_windows(loaded.tokenizer, text, cfg.ctx, cfg.batch_size)
    for tp in plan.tensors.values():  # refuse a scale mode the format cannot take before any PTQ runs
        resolve_mode(cfg.scales, tp.weights, cfg.clip_ste)
    # settings that do not change the numbers may differ on --resume (a lower --lr after a NaN)
    identity = {"source": loaded.source, "recipe": plan.recipe.to_dict(), "plan": plan.summary(),
                "qat": {k: v for k, v in dataclasses.asdict(cfg).items()
                        if k not in ("lr", "checkpoint_every", "gradient_checkpointing")},
                "data": text_label, "data_sha256": hashlib.sha256(text.encode()).hexdigest()}
    folder = checkpoint_dir(output)
    if resume and not folder.exists():
        raise SchemeError(f"--resume: no checkpoint at {folder}; run without --resume to start")
    meta = _read_checkpoint(folder, identity) if resume else None
    teacher = None
    if cfg.distill:
        teacher = copy.deepcopy(loaded.model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    student = loaded.model
    t0 = time.perf_counter()
    ptq_record, input_specs = {}, {}
    if resume:  # a resumed run reads every tensor from the checkpoint
        init, ptq_record, input_specs = None, meta.get("ptq", {}), meta.get("input_specs", {})
    elif init is None:
        init, ptq_record = ptq_start(loaded, plan, progress)
    hooks = prepare(student, plan, init, cfg.scales, cfg.clip_ste, input_specs=input_specs)
    input_specs = {n: fq.input_quant for n, fq in _prepared(student).items() if getattr(fq, "input_quant", None)}
    del init
    seconds_init = time.perf_counter() - t0
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    start, losses = 0, []
    if resume:
        _load_checkpoint(folder, student, optimizer, params)
        start, losses = int(meta["step"]), list(meta.get("losses", []))
    if cfg.gradient_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    last_good = [start] if resume else [None]

    def after_step(step: int, value: float) -> None:
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save_checkpoint(folder, step, student, optimizer, params, identity, losses, ptq_record, input_specs)
            last_good[0] = step

    t0 = time.perf_counter()
    try:
        train_steps(student, optimizer, windows, cfg.schedule, cfg.batch_size, cfg.seed,
                    lambda ids: qat_loss(student, teacher, ids), start, after_step, "qat", progress)
    except NonFiniteLoss as e:
        if last_good[0] is None:
            raise SchemeError(f"{e} (no checkpoint was written yet)") from None
        raise SchemeError(f"the loss became {e.value} at step {e.step} (learning rate {e.lr:.2e}); the last good "
                          f"checkpoint (step {last_good[0]}) is kept in {folder}: add --resume with a lower --lr") from None
    if cfg.gradient_checkpointing and hasattr(student, "gradient_checkpointing_disable"):
        student.gradient_checkpointing_disable()
    seconds_train = time.perf_counter() - t0
    record = {"qat": {**dataclasses.asdict(cfg), "init": plan.recipe.method, "data": text_label,
                      "windows": int(windows.shape[0]), "losses": losses},
              **ptq_record, "seconds": {"init": seconds_init, "train": seconds_train}}
    qm = convert(student, plan, loaded.tokenizer, loaded.source, hooks, record)
    return QATResult(qm, losses, start, folder if folder.exists() else None)
