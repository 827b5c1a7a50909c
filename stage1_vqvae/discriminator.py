"""The PatchGAN discriminator of VQGAN's adversarial loss.

Isola et al. 2017 (pix2pix), sec. 3.2.2: a convolutional classifier whose every output judges one
overlapping patch of the image as real or fake, so it penalises structure at the scale of patches
(the textures an L1/L2 or perceptual loss leaves blurry). VQGAN (Esser et al. 2021, sec. 3.1) trains
its tokenizer against one, with the hinge loss and the adaptive weight in `stage1_vqvae.losses`.

The layout follows taming-transformers' NLayerDiscriminator (64 channels, doubling per strided
block up to 8x, a stride-1 block, a 1-channel patch map), with GroupNorm in place of BatchNorm:
GroupNorm normalises each image on its own, so real and fake images in one batch do not mix
statistics, there are no running buffers to synchronise across processes or to differ between
training and evaluation, and a checkpoint holds all of its state.
"""
from __future__ import annotations

import torch
from torch import nn

from stage1_vqvae.config import check_discriminator_depth, patch_grid_side  # noqa: F401 (re-exported)
from stage1_vqvae.networks import group_norm

DISCRIMINATOR_CHANNELS = 64  # taming's ndf
MAX_CHANNEL_MULT = 8


class PatchDiscriminator(nn.Module):
    """Images (B, C, S, S) in [-1, 1] -> patch logits (B, 1, S / 2^L - 2, S / 2^L - 2): high means real."""

    def __init__(self, in_channels: int, layers: int = 3, channels: int = DISCRIMINATOR_CHANNELS) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for depth in range(1, layers):  # strided blocks: the side halves, the width doubles up to 8x
            out_width = channels * min(2 ** depth, MAX_CHANNEL_MULT)
            blocks += [nn.Conv2d(width, out_width, 4, stride=2, padding=1, bias=False), group_norm(out_width),
                       nn.LeakyReLU(0.2)]
            width = out_width
        out_width = channels * min(2 ** layers, MAX_CHANNEL_MULT)
        blocks += [nn.Conv2d(width, out_width, 4, stride=1, padding=1, bias=False), group_norm(out_width),
                   nn.LeakyReLU(0.2),
                   nn.Conv2d(out_width, 1, 4, stride=1, padding=1)]  # one logit per patch
        self.layers = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # (B, 1, s, s)


def _init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. 2016, sec. 4), as pix2pix and taming use: convolutions
    N(0, 0.02), normalisation scales N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
