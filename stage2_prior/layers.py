"""Causal layers over code grids, raster order (row by row, left to right).

- `MaskedConv2d`: the masked convolution of PixelCNN (van den Oord et al. 2016a, sec. 3.4). Mask A
  hides the centre and everything after it; mask B lets the centre through.
- `GatedBlock`: the gated layer of Gated PixelCNN (van den Oord et al. 2016b, sec. 2.1-2.2), built from
  shifted convolutions: the vertical stack at (i, j) sees only rows < i (a full window of width k),
  the horizontal stack only row i, columns < j (first layer) or <= j of the previous layer's
  horizontal output. Because the vertical stack never sees row i, it can feed the horizontal stack
  at the same position without a shift, and nothing leaks. The window over whole rows above
  removes the blind spot of the masked stack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution whose weights are multiplied by a causal mask at every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.ones(kernel_size, kernel_size)
        mask[centre, centre + (mask_type == "B"):] = 0  # the centre row: from the centre (A) or after it (B)
        mask[centre + 1:] = 0  # rows below the centre
        self.mask_type = mask_type
        self.register_buffer("mask", mask[None, None], persistent=False)  # (1, 1, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (row 0 becomes zeros): output row i holds input row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (column 0 becomes zeros)."""
    return F.pad(x, (1, 0))[:, :, :, :-1]


class GatedBlock(nn.Module):
    """One Gated PixelCNN layer: (vertical, horizontal) -> (vertical, horizontal, skip).

    Vertical conv: kernel (k//2 + 1, k) over rows i - k//2 .. i of its input (which only knows rows
    above), so vertical[i] depends on rows < i. Horizontal conv: kernel (1, k//2 + 1) over columns
    j - k//2 .. j. The first block takes the embedded codes, shifted one row down (vertical) and one
    column right (horizontal), so that it too sees only what lies before (i, j).
    """

    def __init__(self, channels: int, kernel_size: int, num_classes: int | None, first: bool,
                 dropout: float = 0.0) -> None:
        super().__init__()
        half = kernel_size // 2
        self.dropout = dropout
        self.half = half
        self.first = first
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        # the horizontal output: residual update (1x1) and skip contribution (1x1), fused in one conv
        self.horizontal_out = nn.Conv2d(channels, 2 * channels, 1)
        self.class_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, vertical: torch.Tensor, horizontal: torch.Tensor, labels: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        half = self.half
        if self.first:
            vertical, horizontal = shift_down(vertical), shift_right(horizontal)
        vertical_pre = self.vertical(F.pad(vertical, (half, half, half, 0)))  # (B, 2C, h, w)
        horizontal_pre = self.horizontal(F.pad(horizontal, (half, 0, 0, 0)))  # (B, 2C, h, w)
        horizontal_pre = horizontal_pre + self.vertical_to_horizontal(vertical_pre)
        if self.class_bias is not None:
            bias = self.class_bias(labels)[:, :, None, None]  # (B, 2C, 1, 1)
            vertical_pre, horizontal_pre = vertical_pre + bias, horizontal_pre + bias
        vertical_out = gate(vertical_pre)  # (B, C, h, w)
        gated = F.dropout(gate(horizontal_pre), self.dropout, self.training)  # (B, C, h, w)
        residual, skip = self.horizontal_out(gated).chunk(2, dim=1)  # 2 x (B, C, h, w)
        horizontal_out = residual if self.first else horizontal + residual
        return vertical_out, horizontal_out, skip


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) over the two channel halves (B, 2C, ...) -> (B, C, ...)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class MaskedResidualBlock(nn.Module):
    """The plain PixelCNN layer: relu -> masked 'B' conv -> relu -> 1x1, added to its input."""

    def __init__(self, channels: int, kernel_size: int, num_classes: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv = MaskedConv2d(channels, channels, kernel_size, "B")
        self.out = nn.Conv2d(channels, channels, 1)
        self.class_bias = nn.Embedding(num_classes, channels) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        hidden = self.conv(F.relu(x))
        if self.class_bias is not None:
            hidden = hidden + self.class_bias(labels)[:, :, None, None]
        return x + self.out(F.dropout(F.relu(hidden), self.dropout, self.training))
