"""The VQ-VAE tokenizer: residual conv encoder -> quantizer (vector-quantize-pytorch) -> conv decoder."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from shared.errors import UserError
from shared.pretrained import PretrainedModel
from stage1_vqvae.config import VQVAEConfig


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the residual unit of the original VQ-VAE (van den Oord 2017, sec. 4.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class Encoder(nn.Module):
    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        width = config.hidden_channels
        self.conv_in = nn.Conv2d(config.in_channels, width, 3, padding=1)
        self.downsamples = nn.ModuleList(nn.Conv2d(width, width, 4, stride=2, padding=1)
                                         for _ in range(config.num_downsamples))
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(config.num_res_blocks)))
        self.conv_out = nn.Conv2d(width, config.latent_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)  # (B, W, S, S)
        for downsample in self.downsamples:
            x = downsample(F.relu(x))  # halves H and W
        return self.conv_out(F.relu(self.blocks(x)))  # (B, D, h, w)


class Decoder(nn.Module):
    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        width = config.hidden_channels
        self.conv_in = nn.Conv2d(config.latent_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(config.num_res_blocks)))
        self.upsamples = nn.ModuleList(nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
                                       for _ in range(config.num_downsamples))
        self.conv_out = nn.Conv2d(width, config.in_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv_in(latents))  # (B, W, h, w)
        for upsample in self.upsamples:
            x = upsample(F.relu(x))  # doubles H and W
        return self.conv_out(F.relu(x))  # (B, C, S, S)


class VQVAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W) in [-1, 1]
    codes: torch.Tensor  # (B, h, w) int64
    quantizer_loss: torch.Tensor  # scalar: commitment loss (0 for FSQ)


class VQVAE(PretrainedModel):
    """Images (B, C, H, W) in [-1, 1] <-> codes (B, h, w) int64 in [0, codebook_size).

    Build it after `Accelerator()` in multi-process runs: the quantizer decides at construction
    whether to synchronise its codebook across processes.
    """

    config_class = VQVAEConfig

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "vq":
            self.quantizer = VectorQuantize(
                dim=config.latent_channels, codebook_size=config.codebook_size, codebook_dim=config.codebook_dim,
                decay=config.ema_decay, kmeans_init=config.kmeans_init, kmeans_iters=config.kmeans_iters,
                threshold_ema_dead_code=config.dead_code_threshold, use_cosine_sim=config.use_cosine_sim,
                rotation_trick=config.rotation_trick, straight_through=False,
                commitment_weight=config.commitment_weight, channel_last=True)
        else:
            self.quantizer = FSQ(levels=list(config.fsq_levels), dim=config.latent_channels)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.config.latent_shape

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def check_images(self, images: torch.Tensor) -> None:
        """ValueError unless images are (B, in_channels, H, W) with H and W multiples of the downsample factor."""
        factor = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise UserError(f"images must be (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % factor or images.shape[3] % factor:
            raise UserError(f"image size {tuple(images.shape[2:])} is not divisible by the tokenizer's downsample "
                            f"factor {factor}; resize to a multiple of {factor}")

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (B, D, h, w) -> quantized latents (B, D, h, w), codes (B, h, w), quantizer loss."""
        height, width = latents.shape[2:]
        flat = rearrange(latents, "b d h w -> b (h w) d")  # channel-last: works with a lower codebook_dim
        if self.config.quantizer == "vq":
            quantized, codes, loss = self.quantizer(flat)
        else:
            quantized, codes = self.quantizer(flat)
            loss = flat.new_zeros(())
        quantized = rearrange(quantized, "b (h w) d -> b d h w", h=height, w=width)
        codes = rearrange(codes.long(), "b (h w) -> b h w", h=height, w=width)
        return quantized, codes, loss

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """Encode, quantize (updating the EMA codebook in training mode) and decode."""
        self.check_images(images)
        quantized, codes, loss = self.quantize(self.encoder(images))
        reconstruction = self.decoder(quantized).clamp(-1.0, 1.0)  # (B, C, H, W)
        return VQVAEOutput(reconstruction, codes, loss)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w) int64. Never updates the codebook."""
        self.check_images(images)
        with self._quantizer_in_eval_mode():
            return self.quantize(self.encoder(images))[1]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) int in [0, codebook_size) -> images (B, C, H, W) in [-1, 1]."""
        if codes.ndim != 3 or codes.dtype.is_floating_point:
            raise UserError(f"codes must be an integer tensor (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise UserError(f"codes must lie in [0, {self.codebook_size}), got values in "
                            f"[{int(codes.min())}, {int(codes.max())}]")
        height, width = codes.shape[1:]
        flat = rearrange(codes.long(), "b h w -> b (h w)")
        if self.config.quantizer == "vq":
            quantized = self.quantizer.get_output_from_indices(flat)  # (B, h*w, D), projected out of codebook_dim
        else:
            quantized = self.quantizer.indices_to_codes(flat)  # (B, h*w, D)
        quantized = rearrange(quantized, "b (h w) d -> b d h w", h=height, w=width)
        return self.decoder(quantized).clamp(-1.0, 1.0)

    @contextlib.contextmanager
    def _quantizer_in_eval_mode(self):
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            yield
        finally:
            self.quantizer.train(was_training)
