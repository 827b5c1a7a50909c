"""Encoder and decoder bodies of the tokenizer, one pair per `VQVAEConfig.arch`.

- "vqvae": the network of the 2017 VQ-VAE (van den Oord et al., sec. 4.1): strided 4x4 convolutions,
  one width throughout, ReLU residual blocks at the latent resolution.
- "vqgan": the encoder/decoder of taming-transformers and the latent-diffusion autoencoders (Esser et
  al. 2021, sec. 3.1 and appendix; Rombach et al. 2022): per-resolution widths (`channel_mult`),
  residual blocks of GroupNorm + SiLU + 3x3 convolution, single-head self-attention at the chosen
  resolutions and in the middle, strided-convolution downsampling and nearest-neighbour upsampling.

Both take (B, C_in, H, W) to (B, C_out, H / 2^n, W / 2^n) and back; the VQ-VAE-2 hierarchy in
`stage1_vqvae.model` is built from the same pieces.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage1_vqvae.config import VQVAEConfig


# ------------------------------------------------------------------------------------------------
# The 2017 VQ-VAE
# ------------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the residual unit of the original VQ-VAE (van den Oord 2017, sec. 4.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class Encoder(nn.Module):
    """vqvae: image (B, C, S, S) -> latents (B, latent_out, S / 2^n, S / 2^n)."""

    def __init__(self, config: VQVAEConfig, in_channels: int | None = None, latent_out: int | None = None,
                 num_downsamples: int | None = None) -> None:
        super().__init__()
        width = config.hidden_channels
        self.conv_in = nn.Conv2d(in_channels or config.in_channels, width, 3, padding=1)
        self.downsamples = nn.ModuleList(nn.Conv2d(width, width, 4, stride=2, padding=1)
                                         for _ in range(config.num_downsamples if num_downsamples is None
                                                        else num_downsamples))
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(config.num_res_blocks)))
        self.conv_out = nn.Conv2d(width, latent_out or config.latent_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)  # (B, W, S, S)
        for downsample in self.downsamples:
            x = downsample(F.relu(x))  # halves H and W
        return self.conv_out(F.relu(self.blocks(x)))  # (B, D, h, w)


class Decoder(nn.Module):
    """vqvae: latents (B, latent_in, h, w) -> images (B, out, h * 2^n, w * 2^n)."""

    def __init__(self, config: VQVAEConfig, latent_in: int | None = None, out_channels: int | None = None,
                 num_upsamples: int | None = None) -> None:
        super().__init__()
        width = config.hidden_channels
        self.conv_in = nn.Conv2d(latent_in or config.latent_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(config.num_res_blocks)))
        self.upsamples = nn.ModuleList(nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
                                       for _ in range(config.num_downsamples if num_upsamples is None
                                                      else num_upsamples))
        self.conv_out = nn.Conv2d(width, out_channels or config.in_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv_in(latents))  # (B, W, h, w)
        for upsample in self.upsamples:
            x = upsample(F.relu(x))  # doubles H and W
        return self.conv_out(F.relu(x))  # (B, C, S, S)


# ------------------------------------------------------------------------------------------------
# VQGAN
# ------------------------------------------------------------------------------------------------

def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows (taming's choice), fewer for narrow test models."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x -> shortcut(x) + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(x)))
        hidden = self.conv2(F.silu(self.norm2(hidden)))
        return self.shortcut(x) + hidden


class AttentionBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c") for t in self.qkv(self.norm(x)).chunk(3, dim=1))
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, C)
        return x + self.out(rearrange(attended, "b 1 (h w) c -> b c h w", h=height))


class Downsample(nn.Module):
    """3x3 convolution of stride 2, padded on the right and bottom only (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _stage(in_channels: int, out_channels: int, blocks: int, attention: bool) -> nn.ModuleList:
    layers = nn.ModuleList()
    for index in range(blocks):
        layers.append(ResnetBlock(in_channels if index == 0 else out_channels, out_channels))
        if attention:
            layers.append(AttentionBlock(out_channels))
    return layers


class VQGANEncoder(nn.Module):
    """vqgan: image (B, C, S, S) -> latents (B, latent_out, S / 2^n, S / 2^n)."""

    def __init__(self, config: VQVAEConfig, in_channels: int | None = None, latent_out: int | None = None) -> None:
        super().__init__()
        widths = [config.hidden_channels * mult for mult in config.widths_multipliers]
        self.conv_in = nn.Conv2d(in_channels or config.in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        side, width = config.image_size, widths[0]
        for level, out_width in enumerate(widths):
            self.stages.append(_stage(width, out_width, config.num_res_blocks, side in config.attention_sides))
            width = out_width
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(width))
                side //= 2
        self.middle = nn.ModuleList([ResnetBlock(width, width), AttentionBlock(width), ResnetBlock(width, width)])
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, latent_out or config.latent_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for level, stage in enumerate(self.stages):
            for layer in stage:
                x = layer(x)
            if level < len(self.downsamples):
                x = self.downsamples[level](x)  # halves H and W
        for layer in self.middle:
            x = layer(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, D, h, w)


class VQGANDecoder(nn.Module):
    """vqgan: latents (B, latent_in, h, w) -> images (B, out, h * 2^n, w * 2^n)."""

    def __init__(self, config: VQVAEConfig, latent_in: int | None = None, out_channels: int | None = None) -> None:
        super().__init__()
        widths = [config.hidden_channels * mult for mult in config.widths_multipliers]
        width = widths[-1]
        self.conv_in = nn.Conv2d(latent_in or config.latent_channels, width, 3, padding=1)
        self.middle = nn.ModuleList([ResnetBlock(width, width), AttentionBlock(width), ResnetBlock(width, width)])
        self.stages = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        side = config.image_size // 2 ** config.num_downsamples
        for level, out_width in enumerate(reversed(widths)):
            self.stages.append(_stage(width, out_width, config.num_res_blocks + 1, side in config.attention_sides))
            width = out_width
            if level < len(widths) - 1:
                self.upsamples.append(Upsample(width))
                side *= 2
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels or config.in_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(latents)
        for layer in self.middle:
            x = layer(x)
        for level, stage in enumerate(self.stages):
            for layer in stage:
                x = layer(x)
            if level < len(self.upsamples):
                x = self.upsamples[level](x)  # doubles H and W
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, C, S, S)


def build_encoder(config: VQVAEConfig, **kwargs) -> nn.Module:
    return VQGANEncoder(config, **kwargs) if config.arch == "vqgan" else Encoder(config, **kwargs)


def build_decoder(config: VQVAEConfig, **kwargs) -> nn.Module:
    return VQGANDecoder(config, **kwargs) if config.arch == "vqgan" else Decoder(config, **kwargs)


# ------------------------------------------------------------------------------------------------
# The VQ-VAE-2 hierarchy (Razavi et al. 2019, sec. 3.1 and fig. 2a)
# ------------------------------------------------------------------------------------------------

class TopLevel(nn.Module):
    """The top of a two-level tokenizer, around the bottom encoder's latents (B, D, h, w):
    `encode` halves them to the top latents (B, D, h/2, w/2); `to_bottom` decodes quantized top
    latents back to the bottom grid, for the bottom quantizer's input and for the decoder."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        channels, width = config.latent_channels, config.hidden_channels
        self.encoder = nn.Sequential(nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, padding=1), ResidualBlock(width), nn.ReLU(),
                                     nn.Conv2d(width, channels, 1))
        self.decoder = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), ResidualBlock(width), nn.ReLU(),
                                     nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1))
        # the bottom quantizer sees the bottom latents and the decoded top (sec. 3.1: "conditioned on the top")
        self.bottom_input = nn.Conv2d(2 * channels, channels, 1)
        self.upsample_for_decoder = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def encode(self, bottom_latents: torch.Tensor) -> torch.Tensor:
        return self.encoder(bottom_latents)  # (B, D, h/2, w/2)

    def bottom_quantizer_input(self, bottom_latents: torch.Tensor, quantized_top: torch.Tensor) -> torch.Tensor:
        return self.bottom_input(torch.cat([bottom_latents, self.decoder(quantized_top)], dim=1))  # (B, D, h, w)

    def decoder_input(self, quantized_bottom: torch.Tensor, quantized_top: torch.Tensor) -> torch.Tensor:
        return torch.cat([quantized_bottom, self.upsample_for_decoder(quantized_top)], dim=1)  # (B, 2D, h, w)
