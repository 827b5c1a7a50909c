"""Configs of stage 1: the VQ-VAE architecture (saved in config.json) and a training run."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from shared.config import option
from shared.data import DataConfig
from shared.errors import UserError
from shared.training import LoopConfig


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Architecture of the tokenizer. Images (B, in_channels, S, S) -> codes (B, S / 2^n, S / 2^n)."""

    in_channels: int = option(1, "image channels")
    image_size: int = option(32, "training image size; any multiple of the downsample factor encodes")
    hidden_channels: int = option(64, "width of the encoder and decoder")
    num_downsamples: int = option(2, "each halves the resolution: latent side = image_size / 2^n")
    num_res_blocks: int = option(2, "residual blocks at the latent resolution, in encoder and decoder")
    latent_channels: int = option(64, "channels of the encoder output fed to the quantizer")
    quantizer: Literal["vq", "fsq"] = option("vq", "vq: EMA vector quantization; fsq: finite scalar quantization")
    codebook_size: int = option(512, "number of codes (for fsq: the product of --fsq-levels)")
    codebook_dim: int | None = option(None, "lower codebook dimension (factorised codes); default latent_channels")
    ema_decay: float = option(0.8, "EMA decay of the codebook")
    kmeans_init: bool = option(True, "initialise the codebook with k-means on the first batch")
    kmeans_iters: int = option(10, "k-means iterations for the initialisation")
    dead_code_threshold: float = option(2.0, "codes whose EMA usage falls below this are replaced by batch vectors")
    use_cosine_sim: bool = option(False, "cosine-similarity codebook (l2-normalised codes)")
    rotation_trick: bool = option(True, "rotation trick gradient (Fifty et al. 2024) instead of straight-through")
    commitment_weight: float = option(0.25, "weight of the commitment loss")
    fsq_levels: tuple[int, ...] = option((8, 8, 8), "levels per FSQ dimension")

    def __post_init__(self) -> None:
        factor = 2 ** self.num_downsamples
        if self.num_downsamples < 0 or self.image_size % factor:
            raise UserError(f"image size {self.image_size} is not divisible by the downsample factor {factor} "
                            f"(2^{self.num_downsamples}); pick an --image-size that is a multiple of {factor}")
        if self.in_channels not in (1, 3):
            raise UserError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.quantizer == "fsq" and math.prod(self.fsq_levels) != self.codebook_size:
            product = math.prod(self.fsq_levels)
            raise UserError(f"with quantizer fsq the codebook size is the product of --fsq-levels "
                            f"({'*'.join(map(str, self.fsq_levels))} = {product}), not {self.codebook_size}; "
                            f"pass --codebook-size {product}")
        if self.codebook_size < 2:
            raise UserError(f"codebook_size must be at least 2, got {self.codebook_size}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.num_downsamples

    @property
    def latent_shape(self) -> tuple[int, int]:
        side = self.image_size // self.downsample_factor
        return (side, side)


@dataclasses.dataclass(frozen=True)
class Stage1TrainConfig(LoopConfig, DataConfig):
    """A tokenizer training run (train_config.json): data, loop and loss settings."""

    perceptual_weight: float = option(0.0, "weight of the LPIPS loss (0 turns it off)")
    perceptual_net: Literal["alex", "vgg", "squeeze"] = option("alex", "LPIPS backbone")
    reconstruction_loss: Literal["mse", "l1"] = option("mse", "pixel loss")
    # loop defaults for stage 1: a good digits tokenizer in about two CPU minutes
    max_steps: int = 1000
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    eval_every: int = 500
    save_every: int = 500
