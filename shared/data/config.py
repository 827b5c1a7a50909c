"""Where images come from and how they are read: `DataConfig` (the data flags of every command), and the
names and limits the data modules share."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Literal

from shared.config import option
from shared.errors import UserError


DIGITS = "digits"
DIGITS_TEST_FRACTION = 0.1
CAPTION_COLUMN = "text"  # the caption column of the built-in shapes and of an image folder's metadata.jsonl
FOLDER_METADATA = "metadata.jsonl"  # an image folder's captions: {"file_name": ..., "text": ...} per line
VALIDATION_SEED = 0  # fixed, so every run of any seed holds out the same images
# Held-out splits in order of preference: ImageNet-style sources keep their labelled evaluation set in
# `validation` and an unlabelled `test`; the tokenizer can use either, `validation` is the usual choice.
HELD_OUT_SPLITS = ("validation", "valid", "val", "test")
SPLIT_FOLDERS = frozenset({"train", *HELD_OUT_SPLITS})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'mnist' or 'user/name'; anything else is a path
NO_LABEL = -1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from, how they are shaped, and how training reads them."""

    dataset: str = option(DIGITS, "digits, shapes (captioned), an image folder, a save_to_disk folder, or a Hub "
                                  "dataset name")
    split: str = option("train", "split to train on (or export)")
    image_size: int = option(32, "images are resized (shorter side) and centre-cropped to this size")
    channels: int | None = option(None, "1 or 3; default: the channel count of the first image")
    image_column: str | None = option(None, "image column of a datasets source (default: the first image column)")
    label_column: str | None = option(None, "label column of a datasets source (default: 'label' when present; "
                                            "'none' turns labels off)")
    caption_column: str | None = option(None, "caption column of a datasets source or of an image folder's "
                                              "metadata.jsonl (default: 'text' when present; 'none' turns captions off)")
    strict_captions: bool = option(False, "refuse a split with empty or non-string captions instead of warning")
    dataset_config: str | None = option(None, "configuration name of a Hub dataset")
    revision: str | None = option(None, "revision (branch, tag or commit) of a Hub dataset")
    validation_fraction: float = option(0.1, "held-out fraction when the source has no held-out split")
    cache_images: Literal["auto", "always", "never"] = option(
        "auto", "decode the split once into memory: auto does it when the decoded pixels fit in 256 MiB")
    random_flip: bool = option(False, "flip training images left-right at random (a function of seed, step, example)")
    random_crop: bool = option(False, "crop training images at random from a slightly larger resize (--crop-resize)")
    crop_resize: int | None = option(None, "with --random-crop: shorter side before the crop (default image_size * 9/8)")
    strict_images: bool = option(False, "stop at the first unreadable image instead of skipping it")

    def check_data_flags(self) -> None:
        """UserError for data settings no run can use (checked before any file is read)."""
        if self.image_size < 1:
            raise UserError(f"--image-size must be positive, got {self.image_size}")
        if self.channels is not None and self.channels not in (1, 3):
            raise UserError(f"--channels must be 1 or 3, got {self.channels}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise UserError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}")
        if self.crop_resize is not None and not self.random_crop:
            raise UserError("--crop-resize applies only with --random-crop; add --random-crop or drop it")
        if self.random_crop and self.base_size < self.image_size:
            raise UserError(f"--crop-resize {self.base_size} is smaller than --image-size {self.image_size}: the "
                            f"crop would be larger than the resized image; pass --crop-resize >= {self.image_size}")

    @property
    def base_size(self) -> int:
        """Side of the square training images are cut from: image_size, or the larger resize to crop from."""
        if not self.random_crop:
            return self.image_size
        return self.crop_resize if self.crop_resize is not None else int(round(self.image_size * 9 / 8))

    @property
    def labels_off(self) -> bool:
        return self.label_column is not None and self.label_column.lower() == "none"

    @property
    def captions_off(self) -> bool:
        return self.caption_column is not None and self.caption_column.lower() == "none"


def is_shard_pattern(dataset: str) -> bool:
    """True for WebDataset-style tar shards (`shards/train-{000000..000099}.tar`, `shards/*.tar`)."""
    return ".tar" in os.path.basename(dataset)


def resolve_num_workers(requested: int | None, local_processes: int = 1) -> int:
    """Loader workers per process: `requested` (--num-workers) when given, else the CPUs this process
    may use, shared with its siblings, at most 8."""
    if requested is not None:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(1, local_processes)))


def check_num_workers(num_workers: int | None) -> None:
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num-workers must be 0 (load in the main process) or more, got {num_workers}")
