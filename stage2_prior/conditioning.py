"""What a prior is conditioned on, one interface for every arch.

- `Context`: a batch of samples' conditions as the user gave them, checked once at the entry point
  (`Prior.sample`, `Pipeline.generate`, ...) and passed down whole: class labels (with the null class
  of classifier-free guidance), an aligned code map (a coarser tokenizer level).
- `Conditioning`: what a network reads: the label rows of its class tables and the code map's
  features on the prior's grid (`ConditionNetwork`, location-dependent conditioning, Gated PixelCNN
  paper sec. 2.3).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError


@dataclasses.dataclass(frozen=True)
class Context:
    """The checked conditions of a batch: labels (B,) int64 or None; code_map (B, hc, wc[, Dc]) int or None."""

    labels: torch.Tensor | None = None
    code_map: torch.Tensor | None = None

    def select(self, index: torch.Tensor | slice) -> "Context":
        """Rows `index` of the batch (a reorder, a subset, or one sample)."""
        return Context(*(None if value is None else value[index] for value in (self.labels, self.code_map)))

    def repeat_interleave(self, count: int) -> "Context":
        return Context(*(None if value is None else value.repeat_interleave(count, dim=0)
                         for value in (self.labels, self.code_map)))

    def guided(self, null_class: int) -> "Context":
        """The batch twice: as it is, then with the null class (classifier-free guidance's two branches)."""
        labels = torch.cat([self.labels, torch.full_like(self.labels, null_class)])
        code_map = None if self.code_map is None else torch.cat([self.code_map, self.code_map])
        return Context(labels, code_map)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a network reads besides the codes: labels (B,) (rows of its class tables, the null class
    included) or None; code_map (B, C, h', w): the condition map's features on the rows computed, or None."""

    labels: torch.Tensor | None = None
    code_map: torch.Tensor | None = None


def check_labels(config, labels: torch.Tensor | int | None, batch_size: int,
                 device: torch.device) -> torch.Tensor | None:
    """Labels as a (batch_size,) int64 tensor on `device` (an int is repeated); None for unconditional priors."""
    num_classes = config.num_classes
    if num_classes is None:
        if labels is not None:
            raise UserError("this prior is unconditional: pass labels=None (train with labelled codes "
                            "for a class-conditional prior)")
        return None
    if labels is None:
        raise UserError(f"this prior is class-conditional: pass labels in [0, {num_classes})")
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim == 0:
        labels = labels.expand(batch_size)
    if labels.shape != (batch_size,):
        raise UserError(f"labels must be an int or {batch_size} ints, got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got values in "
                        f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def check_code_map(config, code_map: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """The conditioning code map (batch_size, hc, wc[, Dc]) on `device`; None for a prior without one."""
    shape = config.condition_grid
    if shape is None:
        if code_map is not None:
            raise UserError("this prior takes no condition code map: pass condition=None")
        return None
    if code_map is None:
        raise UserError(f"this prior is conditioned on a code map: pass condition of shape "
                        f"({batch_size}, {', '.join(map(str, shape))})")
    code_map = torch.as_tensor(code_map, device=device)
    if code_map.dtype.is_floating_point or tuple(code_map.shape) != (batch_size, *shape):
        raise UserError(f"the condition code map must be integers of shape ({batch_size}, "
                        f"{', '.join(map(str, shape))}), got {code_map.dtype} {tuple(code_map.shape)}")
    if code_map.numel() and (int(code_map.min()) < 0 or int(code_map.max()) >= config.condition_vocab_size):
        raise UserError(f"the condition codes must lie in [0, {config.condition_vocab_size}), got values in "
                        f"[{int(code_map.min())}, {int(code_map.max())}]")
    return code_map


def check_context(config, labels, condition, batch_size: int, device: torch.device) -> Context:
    """The checked Context of a batch of `batch_size` samples."""
    return Context(check_labels(config, labels, batch_size, device),
                   check_code_map(config, condition, batch_size, device))


def label_rows(config) -> int:
    """Rows of the class embedding tables: the classes, and the null class when there is one."""
    return (config.num_classes or 0) + (config.null_class is not None)


def dropped_labels(config, labels: torch.Tensor | None, training: bool) -> torch.Tensor | None:
    """Labels as the network sees them: in training with label dropout, some become the null class."""
    null = config.null_class
    if labels is None or null is None or not training:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < config.label_dropout
    return torch.where(drop, torch.full_like(labels, null), labels)


class ConditionNetwork(nn.Module):
    """A coarser code grid (B, hc, wc[, Dc]) -> features (B, C, h, w) on the prior's grid.

    Embedded codes go through residual 3x3 convolutions at their own resolution, are upsampled by
    the integer factor between the grids (nearest), and mixed by one more 3x3 convolution. The map
    is known in full before sampling starts, so it needs no causal mask.
    """

    def __init__(self, vocab_size: int, condition_shape: tuple[int, ...], target_shape: tuple[int, int],
                 channels: int) -> None:
        super().__init__()
        self.depth = condition_shape[2] if len(condition_shape) == 3 else 1
        self.vocab_size = vocab_size
        self.scale = (target_shape[0] // condition_shape[0], target_shape[1] // condition_shape[1])
        self.embedding = nn.Embedding(vocab_size * self.depth, channels)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(channels, channels, 1)) for _ in range(2))
        self.out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        stacked = condition.long().reshape(*condition.shape[:3], self.depth)  # (B, hc, wc, Dc)
        offsets = torch.arange(self.depth, device=condition.device) * self.vocab_size
        x = self.embedding(stacked + offsets).sum(3).permute(0, 3, 1, 2)  # (B, C, hc, wc)
        for block in self.blocks:
            x = x + block(x)
        if self.scale != (1, 1):
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")  # (B, C, h, w)
        return self.out(F.relu(x))
