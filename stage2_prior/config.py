"""Configs of stage 2: the prior's architecture (config.json) and a training run."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from shared.config import option
from shared.errors import UserError
from shared.training import LoopConfig

ARCHS = ("gated", "pixelcnn", "pixelsnail", "transformer", "row_lstm", "diagonal_bilstm")
# Archs whose stacks order a position's codes by masking channel groups (PixelRNN paper, sec. 3.4);
# the others predict a position's stack with a small autoregressive depth head.
CHANNEL_GROUP_ARCHS = ("gated", "pixelcnn")
PIXEL_LEVELS = (2, 4, 16, 256)
# The default length of a prior run, in passes over the training codes. On the digits export (1,455
# training grids) the default prior's held-out bits/code bottom out after about 26 passes at a
# near-constant rate and then rise by 0.1 bits per 4 passes (docs/benchmarks.md); a fixed 3,000 steps
# was 130 passes and ended 3 bits above its best point.
AUTO_EPOCHS = 25
AUTO_MIN_STEPS = 200
AUTO_MAX_STEPS = 100_000


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture of an autoregressive prior over code grids in raster order.

    Codes are (B, h, w) in [0, vocab_size), or (B, h, w, depth) for an ordered stack of codes per
    position (RGB subpixels, residual-quantizer depths): raster order over positions, then the stack.
    """

    vocab_size: int = option(512, "number of codes (the tokenizer's codebook_size, or pixel levels)")
    latent_shape: tuple[int, int] = option((8, 8), "code grid (h, w)")
    depth: int = option(1, "codes per position, generated in order (3 for RGB pixels, D for residual quantizers)")
    num_classes: int | None = option(None, "classes for a class-conditional prior; None: unconditional")
    arch: Literal["gated", "pixelcnn", "pixelsnail", "transformer", "row_lstm", "diagonal_bilstm"] = option(
        "gated", "gated: Gated PixelCNN; pixelcnn: the original masked stack; pixelsnail: gated convolutions with "
                 "causal self-attention; transformer: decoder-only with a KV cache; row_lstm, diagonal_bilstm: PixelRNN")
    hidden_channels: int = option(64, "channels of each layer (the transformer's width)")
    num_layers: int = option(15, "layers (pixelsnail: gated layers in all; transformer: blocks; PixelRNN: LSTM layers)")
    kernel_size: int = option(3, "odd filter size of the convolutional stacks")
    dropout: float = option(0.1, "dropout inside each layer, in training only (code datasets are small)")
    num_heads: int = option(4, "attention heads (pixelsnail, transformer)")
    attention_every: int = option(4, "pixelsnail: a causal self-attention layer after every N gated layers")
    position_embedding: Literal["2d", "1d"] = option(
        "2d", "transformer: learned row + column embeddings (2d), or one learned table over raster positions (1d)")
    max_positions: int | None = option(None, "transformer with 1d positions: size of the position table "
                                             "(default: the grid's positions)")
    head: Literal["softmax", "logistic_mixture"] = option(
        "softmax", "softmax: a categorical per code; logistic_mixture: PixelCNN++'s discretized logistic mixture "
                   "(pixel levels, channels coupled linearly)")
    mixtures: int = option(10, "logistic mixture components (head logistic_mixture)")
    label_dropout: float = option(0.0, "training: fraction of labels replaced by a null class, which enables "
                                       "classifier-free guidance at sampling time")
    condition_vocab_size: int | None = option(None, "vocabulary of a conditioning code map (e.g. the top level)")
    condition_shape: tuple[int, ...] | None = option(None, "conditioning code map (h, w) or (h, w, depth)")
    # Provenance, set by training from codes.json: which tokenizer and level the codes came from.
    tokenizer_sha256: str | None = option(None, "sha256 of the weights of the tokenizer that made the codes")
    level: str | None = option(None, "the tokenizer level this prior models (codes, top, bottom)")
    condition_level: str | None = option(None, "the tokenizer level its condition code map is")

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
        if self.depth < 1:
            raise UserError(f"depth must be at least 1, got {self.depth}")
        if self.arch in CHANNEL_GROUP_ARCHS and self.head == "softmax" and self.hidden_channels % self.depth:
            raise UserError(f"arch {self.arch} orders a stack of {self.depth} codes by channel groups: "
                            f"--hidden-channels {self.hidden_channels} must be a multiple of {self.depth}")
        if self.arch in ("pixelsnail", "transformer") and self.hidden_channels % self.num_heads:
            raise UserError(f"--num-heads {self.num_heads} does not divide --hidden-channels {self.hidden_channels}; "
                            "pick a head count that divides the width")
        if self.max_positions is not None and self.max_positions < self.num_positions:
            raise UserError(f"a sequence of {self.num_positions} positions ({self.latent_shape[0]}x{self.latent_shape[1]}) "
                            f"is longer than the position table (--max-positions {self.max_positions}); raise "
                            f"--max-positions to at least {self.num_positions} or use --position-embedding 2d")
        if self.attention_every < 1:
            raise UserError(f"attention_every must be at least 1, got {self.attention_every}")
        if self.head == "logistic_mixture":
            if self.vocab_size not in PIXEL_LEVELS or self.vocab_size == 2:
                raise UserError(f"the logistic mixture head models pixel levels 4, 16 or 256, not {self.vocab_size}; "
                                "use --head softmax for this vocabulary")
            if self.mixtures < 1:
                raise UserError(f"mixtures must be at least 1, got {self.mixtures}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.label_dropout > 0 and self.num_classes is None:
            raise UserError("label dropout (classifier-free guidance) needs a class-conditional prior")
        if (self.condition_vocab_size is None) != (self.condition_shape is None):
            raise UserError("condition_vocab_size and condition_shape go together")
        if self.condition_shape is not None:
            if len(self.condition_shape) not in (2, 3) or min(self.condition_shape) < 1:
                raise UserError(f"condition_shape must be (h, w) or (h, w, depth), got {self.condition_shape}")
            if any(side % cond for side, cond in zip(self.latent_shape, self.condition_shape[:2])):
                raise UserError(f"the condition grid {tuple(self.condition_shape[:2])} must divide the prior's grid "
                                f"{tuple(self.latent_shape)} (an aligned coarser level)")

    @property
    def channel_groups(self) -> int:
        """Channel groups that order a position's stack inside the network (1: the head orders it)."""
        return self.depth if self.arch in CHANNEL_GROUP_ARCHS and self.head == "softmax" else 1

    @property
    def num_positions(self) -> int:
        return self.latent_shape[0] * self.latent_shape[1]

    @property
    def null_class(self) -> int | None:
        """The label index meaning 'no class' (classifier-free guidance), when the prior has one."""
        return self.num_classes if self.num_classes is not None and self.label_dropout > 0 else None


@dataclasses.dataclass(frozen=True)
class Stage2TrainConfig(LoopConfig):
    """A prior training run (train_config.json)."""

    codes: str = option("", "codes folder written by vqvae-export")
    level: str | None = option(None, "which level of a multi-level export to model (e.g. top, bottom)")
    condition_level: str | None = option(None, "a level of the same export to condition on (e.g. top)")
    tokenizer: str | None = option(None, "tokenizer folder for decoded sample grids (default: from codes.json if found)")
    conditional: bool = option(True, "class-conditional when the codes have labels")
    validation_fraction: float = option(0.1, "held-out fraction of the codes for validation")
    validation_codes: str | None = option(None, "a separate codes folder to validate on (default: a held-out fraction)")
    sample_every: int = option(1000, "write a decoded sample grid every N steps (needs a tokenizer)")
    max_steps: int | None = option(None, f"optimizer steps (default: {AUTO_EPOCHS} passes over the training codes, "
                                         f"{AUTO_MIN_STEPS} to {AUTO_MAX_STEPS:,} steps; longer overfits a small export)")
    learning_rate: float = 1e-3
    batch_size: int = 64
    eval_every: int = 250
    save_every: int = 500


def default_max_steps(num_rows: int, global_batch_size: int) -> int:
    """The run length when --max-steps is not given: AUTO_EPOCHS passes over `num_rows` grids, clamped."""
    steps_per_epoch = math.ceil(num_rows / global_batch_size)
    return min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, AUTO_EPOCHS * steps_per_epoch))
