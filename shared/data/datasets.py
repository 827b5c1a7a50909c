"""A split as a torch dataset (`ImageDataset`): decoding in loader workers, an unreadable image replaced
by the next readable row (or an error with --strict-images), and the batches the loaders yield."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

from shared.data.images import (Augmentation, ImageProblem, augment, augmentation_draws, decode_image,
                                resize_and_centre_crop, to_8bit, to_model_range)
from shared.data.sources import ArrowRows, FolderRows, Source
from shared.errors import UserError


# A corrupt image is replaced by the next readable one; give up after this many unreadable in a row.
MAX_SUBSTITUTE_TRIES = 64


class ImageDataset(torch.utils.data.Dataset):
    """One split: item i is (image float (C, H, W) in [-1, 1], label int, -1 when unlabelled).

    Loaders use `example(index, micro_batch)`: uint8 pixels, augmented when `augmentation` asks,
    and an unreadable image replaced by the next readable row (reported in `Example.problem`), or
    raised as ImageProblem when `strict`.
    """

    def __init__(self, source: Source, split: str, rows: FolderRows | ArrowRows, image_size: int, channels: int,
                 base_size: int | None = None, augmentation: Augmentation = Augmentation(),
                 strict: bool = False) -> None:
        self.source = source
        self.split = split
        self.rows = rows
        self.image_size = image_size
        self.base_size = base_size or image_size
        self.channels = channels
        self.augmentation = augmentation
        self.strict = strict

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def has_labels(self) -> bool:
        """True when the split has a label column and at least one row carries a label."""
        return self.source.label_column is not None and bool((self.rows.labels >= 0).any())

    @property
    def labels(self) -> np.ndarray:
        return self.rows.labels  # (N,) int64, -1 where a row has no label

    @property
    def captions(self) -> np.ndarray | None:
        """(N,) object: each row's caption (str), None where it has none; None when the source has no captions."""
        return self.rows.captions

    def where(self, index: int) -> str:
        return f"row {index} of {self.source.description} [{self.split}]"

    def read(self, index: int, size: int) -> np.ndarray:
        """Decode row `index` into uint8 (C, size, size), or raise ImageProblem."""
        where = self.where(index)
        image = decode_image(self.rows.image_value(index), where)
        return resize_and_centre_crop(to_8bit(image, self.channels, where), size)

    def example(self, index: int, micro_batch: int = 0) -> "Example":
        problem = None
        used = index
        tries = min(MAX_SUBSTITUTE_TRIES, len(self))
        for _ in range(tries):
            try:
                base = self.read(used, self.base_size)
                break
            except ImageProblem as error:
                if self.strict:
                    raise
                problem = problem or str(error)
                used = (used + 1) % len(self)
        else:
            raise ImageProblem(self.where(index), "no row of this split is readable" if tries == len(self)
                               else f"it and the next {tries - 1} rows are unreadable")
        augmentation = self.augmentation
        draws = augmentation_draws(augmentation.seed, micro_batch, index, self.base_size, self.image_size,
                                   augmentation.flip, augmentation.crop)
        pixels = augment(torch.from_numpy(base), draws, self.image_size)
        return Example(pixels.contiguous(), int(self.rows.labels[used]), index, problem)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            pixels = self.read(int(index), self.image_size)
        except ImageProblem as error:
            raise UserError(f"{error}; remove or replace that file") from None
        return to_model_range(torch.from_numpy(pixels)), int(self.rows.labels[int(index)])


@dataclasses.dataclass
class Example:
    pixels: torch.Tensor  # (C, H, W) uint8
    label: int
    index: int
    problem: str | None  # why this row was replaced by the next readable one


@dataclasses.dataclass
class Batch:
    """A batch of images as the loaders yield it."""

    pixels: torch.Tensor  # (B, C, H, W) uint8
    labels: torch.Tensor  # (B,) int64, -1 for unlabelled rows
    indices: torch.Tensor  # (B,) int64 rows of the split
    problems: list[str]  # unreadable images that were replaced in this batch

    def pin_memory(self) -> "Batch":
        return Batch(self.pixels.pin_memory(), self.labels.pin_memory(), self.indices, self.problems)

    def images(self, device: torch.device | str) -> torch.Tensor:
        """(B, C, H, W) float in [-1, 1] on `device`."""
        return to_model_range(self.pixels.to(device, non_blocking=True))


def collate_examples(examples: list[Example]) -> Batch:
    return Batch(torch.stack([example.pixels for example in examples]),
                 torch.tensor([example.label for example in examples], dtype=torch.long),
                 torch.tensor([example.index for example in examples], dtype=torch.long),
                 [example.problem for example in examples if example.problem])


class Examples(torch.utils.data.Dataset):
    """What DataLoader workers call: key (index, micro_batch) -> Example. A bad image in strict mode
    comes back as a value, so the main process can raise it as a one-line error."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Example | ImageProblem:
        try:
            return self.dataset.example(*key)
        except ImageProblem as problem:
            return problem

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Example | ImageProblem]:
        return [self[key] for key in keys]


def warn_substituted(problems: list[str]) -> None:
    """One warning per unreadable image that a command replaced by the next readable row."""
    for problem in problems:
        print(f"warning: {problem}; it was replaced by the next readable row", file=sys.stderr)
