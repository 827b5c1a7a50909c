"""Configs of stage 2: the prior's architecture (config.json) and a training run."""
from __future__ import annotations

import dataclasses
from typing import Literal

from shared.config import option
from shared.errors import UserError
from shared.training import LoopConfig


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture of the PixelCNN prior over code grids (B, h, w) in [0, vocab_size)."""

    vocab_size: int = option(512, "number of codes (the tokenizer's codebook_size)")
    latent_shape: tuple[int, int] = option((8, 8), "code grid (h, w)")
    num_classes: int | None = option(None, "classes for a class-conditional prior; None: unconditional")
    hidden_channels: int = option(64, "channels of each stack")
    num_layers: int = option(15, "gated blocks (or masked-conv layers for arch pixelcnn)")
    kernel_size: int = option(3, "odd filter size of the stacks")
    arch: Literal["gated", "pixelcnn"] = option("gated", "gated: Gated PixelCNN; pixelcnn: the original masked stack")
    dropout: float = option(0.1, "dropout on each block's gated output, in training only (code datasets are small)")

    def __post_init__(self) -> None:
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise UserError(f"kernel_size must be odd and at least 3, got {self.kernel_size}")
        if self.vocab_size < 2 or self.num_layers < 1 or self.hidden_channels < 1:
            raise UserError("vocab_size >= 2, num_layers >= 1 and hidden_channels >= 1 are required")
        if len(self.latent_shape) != 2 or min(self.latent_shape) < 1:
            raise UserError(f"latent_shape must be (h, w) with h, w >= 1, got {self.latent_shape}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise UserError(f"num_classes must be None or at least 1, got {self.num_classes}")


@dataclasses.dataclass(frozen=True)
class Stage2TrainConfig(LoopConfig):
    """A prior training run (train_config.json)."""

    codes: str = option("", "codes folder written by vqvae-export")
    tokenizer: str | None = option(None, "tokenizer folder for decoded sample grids (default: from codes.json if found)")
    conditional: bool = option(True, "class-conditional when the codes have labels")
    validation_fraction: float = option(0.1, "held-out fraction of the codes for validation")
    validation_codes: str | None = option(None, "a separate codes folder to validate on (default: a held-out fraction)")
    sample_every: int = option(1000, "write a decoded sample grid every N steps (needs a tokenizer)")
    max_steps: int = 3000
    learning_rate: float = 1e-3
    batch_size: int = 64
    eval_every: int = 500
    save_every: int = 500
