"""The multi-scale residual quantizer of VAR (Tian et al., NeurIPS 2024, sec. 3.2, Algorithms 1 and 2):
`--quantizer multiscale --scales 1 2 3 4 6 8`.

A latent map f (B, D, h, w) becomes K code grids of growing sides s_1 < ... < s_K = h, all from one
codebook. Scale k quantizes the residual that the coarser scales left, seen at its own side:

    r_k = area-downsample(f - f_hat, s_k)          (f_hat = 0 before scale 1)
    z_k = codebook[nearest code of each vector of r_k]    (B, D, s_k, s_k)
    f_hat += phi_k(bicubic-upsample(z_k, h))

and the decoder reads f_hat. phi_k is a 3x3 convolution mixed half-and-half with its input (VAR's
`Phi` with its residual ratio 0.5), one per scale. The codebook is vector-quantize-pytorch's EMA
codebook, updated on the residuals of every scale (as residual VQ with a shared codebook); the
encoder commits to f_hat and phi learns to fit f with it, VAR's loss
    mean over k of  beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2,
with the straight-through estimator from f_hat to f for the decoder's gradient.

The codes are one level per scale, `scale_<side>` (B, s, s), in generation order (coarse to fine):
a VAR prior (`--arch var`) predicts each scale from the ones before it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from shared.codes import default_scales, scale_level_name
from shared.errors import UserError
from stage1_vqvae.quantizers import QuantizerKind, ema_settings, quantize, register_quantizer

RESIDUAL_RATIO = 0.5  # phi(h) = (1 - ratio) h + ratio conv(h) (VAR's quant_resi)


def check_scales(scales: tuple[int, ...], side: int) -> None:
    """UserError unless `scales` is an increasing list of positive sides ending at the latent side."""
    spelled = " ".join(map(str, scales))
    if not scales or min(scales) < 1 or any(b <= a for a, b in zip(scales, scales[1:])):
        raise UserError(f"--scales {spelled} must be increasing positive sides, e.g. --scales "
                        f"{' '.join(map(str, default_scales(side)))}")
    if scales[-1] != side:
        raise UserError(f"--scales {spelled} must end at the latent side {side} (image size / 2^num_downsamples); "
                        f"e.g. --scales {' '.join(map(str, default_scales(side)))}")


class Phi(nn.Module):
    """h -> (1 - RESIDUAL_RATIO) h + RESIDUAL_RATIO conv3x3(h), on (B, D, h, w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - RESIDUAL_RATIO) + self.conv(h) * RESIDUAL_RATIO


class MultiScaleQuantizer(nn.Module):
    """Latents (B, D, h, w) <-> one code grid per scale (see the module docstring)."""

    def __init__(self, config: Any, dim: int) -> None:
        super().__init__()
        self.scales = tuple(config.scale_sides)
        self.beta = config.commitment_weight
        self.codebook = VectorQuantize(dim=dim, codebook_size=config.codebook_size, straight_through=False,
                                       channel_last=True, **ema_settings(config))
        self.phis = nn.ModuleList(Phi(dim) for _ in self.scales)

    def vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, s, s) -> codebook vectors (B, D, s, s)."""
        side = codes.shape[1]
        vectors = self.codebook.get_output_from_indices(rearrange(codes.long(), "b h w -> b (h w)"))  # (B, s*s, D)
        return rearrange(vectors, "b (h w) d -> b d h w", h=side)

    def refined(self, index: int, vectors: torch.Tensor, side: int) -> torch.Tensor:
        """Scale `index`'s vectors (B, D, s, s) upsampled to the latent side and refined by its phi: (B, D, h, w)."""
        if vectors.shape[-1] != side:
            vectors = F.interpolate(vectors, size=(side, side), mode="bicubic", align_corners=False)
        return self.phis[index](vectors)

    def _initialise_codebook(self, latents: torch.Tensor) -> None:
        """k-means on the full-resolution latents before the first scale: the coarse scales alone hold as
        few vectors as images, too few to place a codebook of hundreds of codes."""
        flags = [buffer for name, buffer in self.codebook.named_buffers() if name.endswith("initted")]
        if self.training and flags and not all(bool(flag) for flag in flags):
            quantize(self.codebook, "vq", rearrange(latents.detach(), "b d h w -> b (h w) d"))

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Latents f (B, D, h, w) -> (f_hat for the decoder (B, D, h, w), codes per scale, loss).
        In eval mode no codebook is updated."""
        side = latents.shape[-1]
        if latents.shape[-2] != side or side != self.scales[-1]:
            raise UserError(f"the multi-scale quantizer codes a {self.scales[-1]}x{self.scales[-1]} latent grid, got "
                            f"{tuple(latents.shape[-2:])}; encode images of the size it was trained on")
        self._initialise_codebook(latents)
        target = latents.detach()
        rest, f_hat = target.clone(), torch.zeros_like(target)
        codes: dict[str, torch.Tensor] = {}
        loss = latents.new_zeros(())
        for index, scale in enumerate(self.scales):
            residual = rest if scale == side else F.interpolate(rest, size=(scale, scale), mode="area")  # (B, D, s, s)
            _, grid, _ = quantize(self.codebook, "vq", rearrange(residual, "b d h w -> b (h w) d"))
            grid = rearrange(grid.long(), "b (h w) -> b h w", h=scale)  # (B, s, s)
            refined = self.refined(index, self.vectors(grid), side)  # (B, D, h, w)
            f_hat = f_hat + refined
            rest = rest - refined.detach()
            codes[scale_level_name(scale)] = grid
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), latents) + F.mse_loss(f_hat, target)
        straight_through = latents + (f_hat - latents).detach()  # the decoder sees f_hat, the encoder its gradient
        return straight_through, codes, loss / len(self.scales)

    def latents_from_codes(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes per scale -> f_hat (B, D, h, w), as `forward` built it."""
        side = self.scales[-1]
        return sum(self.refined(index, self.vectors(codes[scale_level_name(scale)]), side)
                   for index, scale in enumerate(self.scales))


class MultiScaleKind(QuantizerKind):
    summary = "VAR's multi-scale residual quantization: one code grid per --scales side, one codebook"
    spatial = True  # quantizes the latent map as a whole (`MultiScaleQuantizer`), not vector by vector

    def check(self, config: Any) -> None:
        if config.levels != 1:
            raise UserError("--quantizer multiscale makes its own pyramid of scales: drop --levels 2")
        check_scales(config.scale_sides, config.latent_shape[0])
        # the pyramid adds residuals back in the latent space: codes must live there, at full length
        if config.use_cosine_sim:
            raise UserError("--quantizer multiscale quantizes residuals, whose length matters: drop --use-cosine-sim")
        if config.codebook_dim not in (None, config.latent_channels):
            raise UserError(f"--quantizer multiscale keeps its codes in the latent space: drop --codebook-dim "
                            f"{config.codebook_dim} (or set it to --latent-channels {config.latent_channels})")

    def build(self, config: Any, dim: int) -> nn.Module:
        return MultiScaleQuantizer(config, dim)

    def level_sides(self, config: Any) -> dict[str, int]:
        return {scale_level_name(scale): scale for scale in config.scale_sides}


register_quantizer("multiscale", MultiScaleKind())
