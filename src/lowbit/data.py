"""Text for calibration and evaluation, and its cutting into token windows.

Default text: the Python reference manual that ships with every Python (pydoc_data.topics),
split by topic into disjoint parts: every fourth topic (sorted by name) is evaluation text,
the rest calibration text."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.errors import DataError


def default_text(part: str) -> str:
    """'calib' or 'eval' part of the Python reference manual."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 4 == 3) == (part == "eval")]
    return "\n\n".join(topics[n] for n in chosen)


def read_text(path: str | os.PathLike | None, part: str) -> tuple[str, str]:
    """(text, label) from a user's file, or the default part when path is None."""
    if path is None:
        return default_text(part), f"python-reference-manual:{part}"
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {path} does not exist; pass a UTF-8 text file to --{'calib' if part == 'calib' else 'data'}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"text file {path} is empty; pass a file with text in it")
    return text, str(p.resolve())


def token_windows(tokenizer, text: str, ctx: int, n_windows: int | None, what: str = "evaluation",
                  seed: int | None = None) -> torch.Tensor:
    """(n, ctx) token windows. Consecutive non-overlapping windows from the start, or, with a
    seed, n windows at seeded random positions (calibration sampling)."""
    if ctx < 2:
        raise DataError(f"context length {ctx} is too short; use at least 2 tokens")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // ctx
    if available == 0:
        raise DataError(f"{what} text has {ids.numel()} tokens, fewer than one window of {ctx}; give more text or a smaller --ctx/--seqlen")
    if seed is None:
        n = available if n_windows is None else min(n_windows, available)
        return ids[: n * ctx].view(n, ctx)
    n = n_windows or available
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - ctx + 1, (n,), generator=g)
    return torch.stack([ids[s: s + ctx] for s in starts.tolist()])
