"""Configs of stage 1: the tokenizer architecture (saved in config.json) and a training run."""
from __future__ import annotations

import dataclasses
from typing import Literal

from shared.config import option
from shared.data import DataConfig
from shared.data.streaming import StreamingConfig
from shared.errors import UserError
from shared.training import LoopConfig
from shared.codes import default_scales
from stage1_vqvae import multiscale  # noqa: F401  (registers --quantizer multiscale)
from stage1_vqvae.quantizers import QUANTIZERS, quantizer_names

MIN_PATCH_GRID = 1  # the patch map must keep at least one output per side


def patch_grid_side(image_size: int, layers: int) -> int:
    """Side of the patch map for images of `image_size`: each 4x4 stride-2 convolution (padding 1)
    halves the side (rounding down), and the two 4x4 stride-1 convolutions take one pixel off each."""
    side = image_size
    for _ in range(layers):
        side //= 2
    return side - 2


def check_discriminator_depth(image_size: int, layers: int) -> None:
    """UserError unless `layers` strided blocks leave a patch map on images of `image_size`."""
    if layers < 1:
        raise UserError(f"--discriminator-layers must be at least 1, got {layers}")
    if patch_grid_side(image_size, layers) < MIN_PATCH_GRID:
        deepest = max((depth for depth in range(1, layers) if patch_grid_side(image_size, depth) >= MIN_PATCH_GRID),
                      default=None)
        fix = (f"pass --discriminator-layers {deepest} or a larger --image-size" if deepest is not None
               else "pass a larger --image-size (at least 6)")
        raise UserError(f"a {layers}-layer discriminator shrinks {image_size}px images to nothing "
                        f"(it needs image_size / 2^{layers} >= 3); {fix}")


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Architecture of the tokenizer. Images (B, in_channels, S, S) -> codes (B, S / 2^n, S / 2^n)
    (and with levels=2 a top grid at half that side; with rvq, num_quantizers codes per position)."""

    in_channels: int = option(1, "image channels")
    image_size: int = option(32, "training image size; any multiple of the downsample factor encodes")
    arch: Literal["vqvae", "vqgan"] = option(
        "vqvae", "vqvae: the 2017 VQ-VAE (one width, ReLU residual blocks); vqgan: per-resolution widths, "
                 "GroupNorm + SiLU residual blocks and self-attention (Esser et al. 2021)")
    hidden_channels: int = option(64, "width of the encoder and decoder (vqgan: the width at full resolution)")
    num_downsamples: int = option(2, "each halves the resolution: latent side = image_size / 2^n")
    num_res_blocks: int = option(2, "residual blocks per resolution (vqvae: at the latent resolution)")
    channel_mult: tuple[int, ...] | None = option(
        None, "vqgan: width multiplier per resolution, num_downsamples + 1 entries (default 1, 2, 2, 4, ...)")
    attention_resolutions: tuple[int, ...] | None = option(
        None, "vqgan: feature-map sides that get self-attention (default: the latent side)")
    latent_channels: int = option(64, "channels of the encoder output fed to the quantizer")
    levels: int = option(1, "1, or 2 for VQ-VAE-2: a bottom grid at 1/2^n and a top grid at 1/2^(n+1) of the image")
    quantizer: str = option("vq", "the quantizer (see --help for the registered ones)", choices=quantizer_names)
    codebook_size: int = option(512, "number of codes (fsq: the product of --fsq-levels; lfq: a power of 2)")
    codebook_dim: int | None = option(None, "lower codebook dimension (factorised codes); default latent_channels")
    num_quantizers: int = option(1, "rvq: codes per position (residual depth)")
    ema_decay: float = option(0.8, "EMA decay of the codebook")
    kmeans_init: bool = option(True, "initialise the codebook with k-means on the first batch")
    kmeans_iters: int = option(10, "k-means iterations for the initialisation")
    dead_code_threshold: float = option(2.0, "codes whose EMA usage falls below this are replaced by batch vectors")
    use_cosine_sim: bool = option(False, "cosine-similarity codebook (l2-normalised codes)")
    rotation_trick: bool = option(True, "rotation trick gradient (Fifty et al. 2024) instead of straight-through")
    commitment_weight: float = option(0.25, "weight of the commitment loss")
    entropy_loss_weight: float = option(0.1, "lfq: weight of the entropy loss that spreads codes over the codebook")
    fsq_levels: tuple[int, ...] = option((8, 8, 8), "levels per FSQ dimension")
    scales: tuple[int, ...] | None = option(
        None, "multiscale: the side of each scale's code grid, increasing and ending at the latent side (default for "
              "an 8x8 latent: 1 2 3 4 6 8)")

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise UserError(f"unknown quantizer {self.quantizer!r}; registered quantizers: {', '.join(QUANTIZERS)}")
        factor = self.downsample_factor
        if self.num_downsamples < 1:
            raise UserError(f"num_downsamples must be at least 1, got {self.num_downsamples}")
        if self.image_size % factor:
            raise UserError(f"image size {self.image_size} is not divisible by the downsample factor {factor} "
                            f"(2^{self.num_downsamples + self.levels - 1}); pick an --image-size that is a multiple "
                            f"of {factor}")
        if self.in_channels not in (1, 3):
            raise UserError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.levels not in (1, 2):
            raise UserError(f"levels must be 1 or 2, got {self.levels}")
        QUANTIZERS[self.quantizer].check(self)
        if self.scales is not None and not QUANTIZERS[self.quantizer].spatial:
            raise UserError(f"--scales is a setting of --quantizer multiscale, not {self.quantizer}; pass "
                            "--quantizer multiscale or drop --scales")
        if self.codebook_size < 2:
            raise UserError(f"codebook_size must be at least 2, got {self.codebook_size}")
        if self.num_quantizers < 1 or (self.num_quantizers > 1 and not QUANTIZERS[self.quantizer].stacked):
            stacked = [name for name, kind in QUANTIZERS.items() if kind.stacked]
            raise UserError(f"num_quantizers {self.num_quantizers} needs a quantizer that stacks codes "
                            f"(--quantizer {' or '.join(stacked)}) and must be at least 1")
        if self.arch == "vqgan":
            mult = self.widths_multipliers
            if len(mult) != self.num_downsamples + 1:
                raise UserError(f"channel_mult {tuple(mult)} has {len(mult)} entries, so {len(mult) - 1} downsamples, but "
                                f"num_downsamples is {self.num_downsamples}; pass --num-downsamples {len(mult) - 1} or "
                                f"{self.num_downsamples + 1} --channel-mult values")
            reachable = [self.image_size // 2 ** level for level in range(self.num_downsamples + 1)]
            unreachable = sorted(set(self.attention_sides) - set(reachable))
            if unreachable:
                raise UserError(f"attention at resolution {unreachable[0]}, which the network never reaches (its "
                                f"resolutions are {', '.join(map(str, reachable))}); fix --attention-resolutions")

    @property
    def downsample_factor(self) -> int:
        """Image side / the side of the coarsest code grid."""
        return 2 ** (self.num_downsamples + self.levels - 1)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """The (bottom, or only) code grid (h, w)."""
        side = self.image_size // 2 ** self.num_downsamples
        return (side, side)

    @property
    def widths_multipliers(self) -> tuple[int, ...]:
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        return tuple([1, 2, 2, 4, 4, 4, 4][:self.num_downsamples] + [min(4, 2 ** min(2, self.num_downsamples))])

    @property
    def attention_sides(self) -> tuple[int, ...]:
        if self.attention_resolutions is not None:
            return tuple(self.attention_resolutions)
        return (self.image_size // 2 ** self.num_downsamples,)

    @property
    def scale_sides(self) -> tuple[int, ...]:
        """multiscale: the sides of its code grids (--scales, or the default for the latent side)."""
        if self.scales is not None:
            return tuple(self.scales)
        return default_scales(self.latent_shape[0])

    @property
    def codes_per_position(self) -> int:
        return self.num_quantizers if QUANTIZERS[self.quantizer].stacked else 1


@dataclasses.dataclass(frozen=True)
class Stage1TrainConfig(LoopConfig, DataConfig, StreamingConfig):
    """A tokenizer training run (train_config.json): data, loop and loss settings."""

    perceptual_weight: float = option(0.0, "weight of the LPIPS loss (0 turns it off)")
    perceptual_net: Literal["alex", "vgg", "squeeze"] = option("alex", "LPIPS backbone")
    reconstruction_loss: Literal["mse", "l1"] = option("mse", "pixel loss")
    discriminator_weight: float = option(0.0, "weight of the adversarial loss (VQGAN, PatchGAN hinge); 0 turns it off")
    discriminator_start: int = option(0, "step at which the discriminator and its loss start")
    discriminator_layers: int = option(3, "PatchGAN discriminator depth (strided convolutions)")
    discriminator_learning_rate: float | None = option(None, "discriminator learning rate (default: --learning-rate)")
    best_metric: Literal["auto", "mse", "psnr", "lpips", "last"] = option(
        "auto", "the validation metric that picks the model --keep-best keeps: auto is mse, and for a run with a "
                "discriminator (which trades MSE for realism) lpips when --perceptual-weight > 0, else the last "
                "model; last keeps the last model")
    preset: Literal["none", "photos"] = option("none", "photos: the recipe found best for natural photographs "
                                                       "(see docs/benchmarks.md); explicit flags still win")
    # loop defaults for stage 1: a good digits tokenizer in about two CPU minutes
    max_steps: int = 1000
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    eval_every: int = 500
    save_every: int = 500

    def check(self) -> None:
        """UserError for settings no run can use: the loop's checks, then the discriminator's."""
        super().check()
        self.check_streaming_flags(self)
        if self.discriminator_weight < 0 or self.discriminator_start < 0:
            raise UserError("--discriminator-weight and --discriminator-start must be >= 0")
        if self.discriminator_learning_rate is not None and not self.discriminator_learning_rate > 0:
            raise UserError(f"--discriminator-learning-rate must be positive, got {self.discriminator_learning_rate}")
        if self.best_metric == "lpips" and self.perceptual_weight <= 0:
            raise UserError("--best-metric lpips needs the LPIPS network: pass --perceptual-weight > 0 (its weights must "
                            "be on this machine), or pick another --best-metric")
        if self.discriminator_weight > 0:
            if self.discriminator_start >= self.max_steps:
                raise UserError(f"--discriminator-start {self.discriminator_start} is not below --max-steps "
                                f"{self.max_steps}, so the discriminator would never train; pass a smaller "
                                "--discriminator-start, a larger --max-steps, or --discriminator-weight 0")
            check_discriminator_depth(self.image_size, self.discriminator_layers)


def best_metric_of(config: Stage1TrainConfig) -> tuple[str | None, bool]:
    """(the validation metric --keep-best watches, whether higher is better); None keeps the last model."""
    metric = config.best_metric
    if metric == "auto":
        if config.discriminator_weight <= 0:
            metric = "mse"
        else:
            metric = "lpips" if config.perceptual_weight > 0 else "last"
    return (None, False) if metric == "last" else (metric, metric == "psnr")
