"""The one training loop QAT, QLoRA, FP8 and BitNet training share: the batch and learning
rate of each step are pure functions of the step (so a resumed run continues bit-identically),
AdamW, a non-finite loss stops the run with one line."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.errors import DataError, SchemeError


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Peak learning rate `lr`, reached linearly over `warmup` steps (default 5% of steps),
    then cosine to 0 at `steps`."""

    steps: int
    lr: float
    warmup: int | None = None

    def __post_init__(self):
        if self.steps <= 0:
            raise SchemeError(f"--steps must be a positive number of optimizer steps, got {self.steps}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise SchemeError(f"--lr must be a positive learning rate, got {self.lr}")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        w = self.warmup_steps
        if step < w:
            return self.lr * (step + 1) / w
        progress = (step - w) / max(1, self.steps - w)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n_windows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Windows of step `step`: consecutive slices of a seeded permutation per epoch."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def training_windows(tokenizer, text: str, ctx: int, batch_size: int) -> torch.Tensor:
    """Consecutive windows of `ctx` tokens of the training text (at least one batch)."""
    from lowbit.data import token_windows

    if batch_size <= 0 or ctx < 2:
        raise SchemeError("--batch-size must be >= 1 and --ctx >= 2")
    windows = token_windows(tokenizer, text, ctx, None, what="training")
    if windows.shape[0] < batch_size:
        raise DataError(f"training text has {windows.shape[0]} windows of {ctx} tokens, fewer than one batch of "
                        f"{batch_size}; give more text (--data) or a smaller --ctx/--batch-size")
    return windows


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class NonFiniteLoss(SchemeError):
    def __init__(self, step: int, value: float, lr: float):
        self.step, self.value, self.lr = step, value, lr
        super().__init__(f"the loss became {value} at step {step} (learning rate {lr:.2e}); lower --lr and start again")


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, windows: torch.Tensor, schedule: Schedule,
                batch_size: int, seed: int, loss_fn: Callable[[torch.Tensor], torch.Tensor], start: int = 0,
                after_step: Callable[[int, float], None] | None = None, desc: str = "train",
                progress: bool = True) -> list[float]:
    """Steps start..schedule.steps-1; returns their losses. after_step(step_done, loss) runs
    after each optimizer step (delayed scaling updates, checkpoints)."""
    losses = []
    model.train()
    bar = tqdm(range(start, schedule.steps), desc=desc, disable=not progress, unit="step", initial=start,
               total=schedule.steps)
    for step in bar:
        torch.manual_seed(seed * 1_000_003 + step)  # dropout masks depend on the step alone, so a resume repeats them
        ids = windows[batch_indices(windows.shape[0], batch_size, step, seed)]
        lr = schedule.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(ids)
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            raise NonFiniteLoss(step + 1, value, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if after_step is not None:
            after_step(step + 1, value)
    model.eval()
    return losses
