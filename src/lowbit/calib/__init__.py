"""Calibration: text -> token windows, and the layer-sequential runner."""

import dataclasses

import torch

from lowbit.data import read_text, token_windows


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration windows come from: --calib FILE --samples 128 --seqlen 512 --seed 0."""

    text: str | None = None      # a text file; None: the default text's calibration part
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    sequential: bool = True       # feed quantized layers' outputs to the next layer
    hessian_precision: str = "fp32"  # X^T X products: fp32 | bf16 (see calib.runner.accumulate_gram)
    expert_min_tokens: int = 128     # a routed expert reached by fewer tokens is calibrated on all (calib.moe)

    def windows(self, tokenizer) -> torch.Tensor:
        """(samples, seqlen) token windows at seeded positions of the calibration text."""
        text, _ = read_text(self.text, "calib")
        return token_windows(tokenizer, text, self.seqlen, self.samples, what="calibration", seed=self.seed)
