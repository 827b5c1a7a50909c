"""`PixelTokenizer`: the identity tokenizer, for a PixelCNN on raw pixels (van den Oord et al. 2016a).

Each channel of each pixel is quantized to one of K levels (K in 2, 4, 16, 256) and decoded back
to the level's value, so codes are the pixels themselves: (B, H, W) for grey images, (B, H, W, C)
for colour ones (a stack of C subpixels per position, R then G then B). It keeps the tokenizer
contract (`stage1_vqvae.tokenizer`), so export, stage-2 training and `Pipeline` take it unchanged.

    tokenizer = PixelTokenizer(levels=256, channels=3, image_size=32)
    load_tokenizer("pixels:256", channels=3, image_size=32)   # the --tokenizer shortcut
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from shared.codes import SINGLE_LEVEL, CodesMetadata, LevelInfo, codes_dtype
from shared.config import option
from shared.errors import UserError
from stage1_vqvae.tokenizer import Tokenizer, TokenizerOutput

PIXEL_LEVELS = (2, 4, 16, 256)


@dataclasses.dataclass(frozen=True)
class PixelTokenizerConfig:
    """Quantization of raw pixels: `levels` per channel, `channels` per pixel."""

    levels: int = option(256, "levels per channel: 2, 4, 16 or 256")
    channels: int = option(1, "1 (grey) or 3 (RGB)")
    image_size: int = option(32, "image side")

    def __post_init__(self) -> None:
        if self.levels not in PIXEL_LEVELS:
            raise UserError(f"pixel levels must be one of {', '.join(map(str, PIXEL_LEVELS))}, got {self.levels}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise UserError(f"image_size must be positive, got {self.image_size}")

    # the names a VQVAEConfig offers, so code that reads a tokenizer's config reads this one too
    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def codebook_size(self) -> int:
        return self.levels

    @property
    def downsample_factor(self) -> int:
        return 1

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)


class PixelTokenizer(Tokenizer):
    """Images (B, C, H, W) in [-1, 1] <-> pixel levels (B, H, W) or (B, H, W, C) in [0, levels)."""

    config_class = PixelTokenizerConfig
    shortcut = "pixels"
    codes_are_subpixels = True

    def __init__(self, config: PixelTokenizerConfig | None = None, *, levels: int | None = None,
                 channels: int | None = None, image_size: int | None = None) -> None:
        if config is None:
            config = PixelTokenizerConfig(**{key: value for key, value in
                                             dict(levels=levels, channels=channels, image_size=image_size).items()
                                             if value is not None})
        super().__init__(config)
        # the value of each level: also what model.safetensors holds, so a saved folder has a weights hash
        self.register_buffer("level_values", torch.linspace(-1.0, 1.0, config.levels))

    def code_layout(self, image_size: int | None = None) -> tuple[LevelInfo, ...]:
        """One level: the pixel grid, with a stack of C subpixels per position for colour images."""
        side, config = image_size or self.config.image_size, self.config
        return (LevelInfo(SINGLE_LEVEL, SINGLE_LEVEL, config.levels, (side, side), config.channels,
                          codes_dtype(config.levels)),)

    @property
    def codebooks_per_position(self) -> int:
        return 1  # the subpixels of a position share one set of levels

    @classmethod
    def from_shortcut(cls, argument: str, channels: int | None, image_size: int | None) -> "PixelTokenizer":
        """"pixels:K": K levels per channel; `channels` and `image_size` come from the data."""
        if not argument.isdigit():
            raise UserError(f"--tokenizer pixels:{argument}: write pixels:K with K one of "
                            f"{', '.join(map(str, PIXEL_LEVELS))}")
        if channels is None or image_size is None:
            raise UserError("--tokenizer pixels:K needs the image channels and size (from the dataset or --image-size)")
        return cls(PixelTokenizerConfig(levels=int(argument), channels=channels, image_size=image_size))

    @classmethod
    def for_codes(cls, metadata: CodesMetadata) -> "PixelTokenizer":
        return cls(PixelTokenizerConfig(**metadata.tokenizer_config))  # nothing trained: rebuilt from its config

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.channels:
            raise UserError(f"images must be (B, {self.config.channels}, H, W), got {tuple(images.shape)}")

    def as_levels(self, codes: Any) -> dict[str, torch.Tensor]:
        if isinstance(codes, dict):
            codes = codes.get(SINGLE_LEVEL)
        stacked = self.config.channels > 1
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.ndim != 3 + stacked or (
                stacked and codes.shape[-1] != self.config.channels):
            shape = f"(B, H, W, {self.config.channels})" if stacked else "(B, H, W)"
            raise UserError(f"pixel codes must be an integer tensor {shape}, got "
                            f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.levels):
            raise UserError(f"pixel codes must lie in [0, {self.config.levels}), got values in "
                            f"[{int(codes.min())}, {int(codes.max())}]")
        return {SINGLE_LEVEL: codes}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> levels (B, H, W) or (B, H, W, C) int64."""
        self.check_images(images)
        levels = torch.round((images.float().clamp(-1, 1) + 1) * ((self.config.levels - 1) / 2)).long()  # (B, C, H, W)
        return levels[:, 0] if self.config.channels == 1 else levels.permute(0, 2, 3, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Levels -> images (B, C, H, W) in [-1, 1]."""
        codes = self.as_levels(codes)[SINGLE_LEVEL]
        values = self.level_values[codes.long()]  # (B, H, W[, C])
        return values[:, None] if self.config.channels == 1 else values.permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        codes = self.encode(images)
        return TokenizerOutput(self.decode(codes), codes, images.new_zeros(()))
