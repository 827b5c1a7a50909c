"""Causal layers over code grids, raster order (row by row, left to right), then a position's stack.

- `group_mask`, `GroupLinear`: channel groups order the stack of codes at one position inside a
  network (PixelRNN paper, sec. 3.4): output group g sees input groups < g (mask A) or <= g (mask B).
- `MaskedConv2d`: the masked convolution of PixelCNN (van den Oord et al. 2016a, sec. 3.4). Mask A
  hides the centre and everything after it; mask B lets the centre through. With channel groups
  (a stack of D codes per position), the centre tap is masked by group instead: output group g sees
  input groups < g (A) or <= g (B), as the paper does for R, G, B.
- `GatedBlock`: the gated layer of Gated PixelCNN (van den Oord et al. 2016b, sec. 2.1-2.2), built from
  shifted convolutions: the vertical stack at (i, j) sees only rows < i (a full window of width k),
  the horizontal stack only row i, columns < j (first layer) or <= j of the previous layer's
  horizontal output. Because the vertical stack never sees row i, it can feed the horizontal stack
  at the same position without a shift, and nothing leaks. The window over whole rows above
  removes the blind spot of the masked stack. Labels add a per-layer bias (sec. 2.3), and a
  conditioning map a per-layer 1x1 projection of it (location-dependent conditioning, sec. 2.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_mask(out_channels: int, in_channels: int, groups: int, strict: bool, out_repeats: int = 1) -> torch.Tensor:
    """(out, in) mask: output group g sees input groups < g (strict, mask A) or <= g (mask B).

    Output channels are `out_repeats` consecutive blocks of `out_channels // out_repeats`, each split
    into `groups` groups (e.g. the two halves of a gated pre-activation).
    """
    block = out_channels // out_repeats
    out_group = (torch.arange(out_channels) % block) // (block // groups)  # (out,)
    in_group = torch.arange(in_channels) // (in_channels // groups)  # (in,)
    allowed = out_group[:, None] > in_group[None, :] if strict else out_group[:, None] >= in_group[None, :]
    return allowed.float()


class GroupLinear(nn.Conv2d):
    """A 1x1 convolution whose weights are masked by channel group (all ones for one group)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, strict: bool = False,
                 out_repeats: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.masked = groups > 1
        mask = group_mask(out_channels, in_channels, groups, strict, out_repeats) if self.masked else torch.ones(1, 1)
        self.register_buffer("mask", mask[:, :, None, None], persistent=False)

    @property
    def matrix(self) -> torch.Tensor:
        """The masked weight as an (out, in) matrix."""
        weight = self.weight * self.mask if self.masked else self.weight
        return weight.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask if self.masked else self.weight, self.bias)

    def vector(self, x: torch.Tensor) -> torch.Tensor:
        """The same map on channel-last vectors (..., in) -> (..., out)."""
        return F.linear(x, self.matrix, self.bias)


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution whose weights are multiplied by a causal mask at every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str, groups: int = 1) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.ones(out_channels, in_channels, kernel_size, kernel_size)
        mask[:, :, centre, centre + 1:] = 0  # the centre row after the centre
        mask[:, :, centre + 1:] = 0  # rows below the centre
        if groups > 1:
            mask[:, :, centre, centre] = group_mask(out_channels, in_channels, groups, strict=mask_type == "A")
        elif mask_type == "A":
            mask[:, :, centre, centre] = 0
        self.mask_type = mask_type
        self.register_buffer("mask", mask, persistent=False)  # (out, in, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (row 0 becomes zeros): output row i holds input row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (column 0 becomes zeros)."""
    return F.pad(x, (1, 0))[:, :, :, :-1]


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) over the two channel halves (B, 2C, ...) -> (B, C, ...)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(nn.Module):
    """One Gated PixelCNN layer: (vertical, horizontal) -> (vertical, horizontal, skip).

    Vertical conv: kernel (k//2 + 1, k) over rows i - k//2 .. i of its input (which only knows rows
    above), so vertical[i] depends on rows < i. Horizontal conv: kernel (1, k//2 + 1) over columns
    j - k//2 .. j. The first block takes the embedded codes, shifted one row down (vertical) and one
    column right (horizontal), so that it too sees only what lies before (i, j); with channel groups
    it also reads the position itself through a 1x1 of mask A (`centre`), and later blocks mask their
    centre tap and 1x1s by group (mask B).
    """

    def __init__(self, channels: int, kernel_size: int, label_rows: int | None, first: bool,
                 dropout: float = 0.0, groups: int = 1, condition: bool = False) -> None:
        super().__init__()
        half = kernel_size // 2
        self.dropout = dropout
        self.half = half
        self.first = first
        self.groups = groups
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        # the horizontal output: residual update (1x1) and skip contribution (1x1), fused in one conv
        self.horizontal_out = GroupLinear(channels, 2 * channels, groups, out_repeats=2)
        self.class_bias = nn.Embedding(label_rows, 2 * channels) if label_rows else None
        self.condition_bias = nn.Conv2d(channels, 2 * channels, 1) if condition else None
        self.centre = GroupLinear(channels, 2 * channels, groups, strict=True, out_repeats=2, bias=False) \
            if first and groups > 1 else None  # no bias: the horizontal conv has one
        mask = torch.ones(2 * channels, channels, 1, half + 1)
        if groups > 1 and not first:  # the tap on the current column: mask B by group
            mask[:, :, 0, half] = group_mask(2 * channels, channels, groups, strict=False, out_repeats=2)
        self.register_buffer("horizontal_mask", mask, persistent=False)

    def horizontal_weight(self) -> torch.Tensor:
        return self.horizontal.weight * self.horizontal_mask if self.groups > 1 else self.horizontal.weight

    def forward(self, vertical: torch.Tensor, horizontal: torch.Tensor, labels: torch.Tensor | None,
                condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        half = self.half
        here = horizontal
        if self.first:
            vertical, horizontal = shift_down(vertical), shift_right(horizontal)
        vertical_pre = self.vertical(F.pad(vertical, (half, half, half, 0)))  # (B, 2C, h, w)
        horizontal_pre = F.conv2d(F.pad(horizontal, (half, 0, 0, 0)), self.horizontal_weight(),
                                  self.horizontal.bias)  # (B, 2C, h, w)
        horizontal_pre = horizontal_pre + self.vertical_to_horizontal(vertical_pre)
        if self.centre is not None:
            horizontal_pre = horizontal_pre + self.centre(here)  # the position's lower groups (mask A)
        if self.class_bias is not None:
            bias = self.class_bias(labels)[:, :, None, None]  # (B, 2C, 1, 1)
            vertical_pre, horizontal_pre = vertical_pre + bias, horizontal_pre + bias
        if self.condition_bias is not None:
            bias = self.condition_bias(condition)  # (B, 2C, h, w)
            vertical_pre, horizontal_pre = vertical_pre + bias, horizontal_pre + bias
        vertical_out = gate(vertical_pre)  # (B, C, h, w)
        gated = F.dropout(gate(horizontal_pre), self.dropout, self.training)  # (B, C, h, w)
        residual, skip = self.horizontal_out(gated).chunk(2, dim=1)  # 2 x (B, C, h, w)
        horizontal_out = residual if self.first else here + residual
        return vertical_out, horizontal_out, skip


class MaskedResidualBlock(nn.Module):
    """The plain PixelCNN layer: relu -> masked 'B' conv -> relu -> 1x1 (masked by group), added to its input."""

    def __init__(self, channels: int, kernel_size: int, label_rows: int | None, dropout: float = 0.0,
                 groups: int = 1, condition: bool = False) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv = MaskedConv2d(channels, channels, kernel_size, "B", groups)
        self.out = GroupLinear(channels, channels, groups)
        self.class_bias = nn.Embedding(label_rows, channels) if label_rows else None
        self.condition_bias = nn.Conv2d(channels, channels, 1) if condition else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.conv(F.relu(x))
        if self.class_bias is not None:
            hidden = hidden + self.class_bias(labels)[:, :, None, None]
        if self.condition_bias is not None:
            hidden = hidden + self.condition_bias(condition)
        return x + self.out(F.dropout(F.relu(hidden), self.dropout, self.training))
