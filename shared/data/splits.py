"""The splits the commands use: the training split, its held-out split, and process shards."""
from __future__ import annotations

import math

import numpy as np

from shared.data.config import HELD_OUT_SPLITS, VALIDATION_SEED, DataConfig
from shared.data.datasets import ImageDataset
from shared.data.images import Augmentation, ImageProblem, channels_of, decode_image
from shared.data.sources import ArrowRows, FolderRows, Source, open_source
from shared.errors import UserError


def first_image_channels(source: Source, split: str, channels: int | None, fix: str | None = None) -> int:
    """The channel count to use: `channels`, checked against the first image, or the first image's own.
    Reads that one image only, so a wrong dataset or flag is refused before anything is scanned."""
    source.check_split(split)
    value, where = source.first_image_value(split)
    try:
        found = channels_of(decode_image(value, where))
    except ImageProblem as error:
        raise UserError(f"{error}; remove or replace that file") from None
    if channels is not None and found != channels:
        advice = fix or (f"pass --channels {found} if every image has {found}; a folder that mixes grey and colour "
                         "images is converted image by image to the channel count of --channels")
        raise UserError(f"the image at {where} has {found} channel{'s' * (found > 1)}, expected {channels}; {advice}")
    return channels or found


def make_dataset(source: Source, split: str, rows: FolderRows | ArrowRows, config: DataConfig, channels: int,
                 augmentation: Augmentation | None = None) -> ImageDataset:
    if len(rows) == 0:
        raise UserError(f"{source.description} [{split}] is empty; point --dataset at a source with images")
    base = config.base_size if augmentation is not None else config.image_size
    return ImageDataset(source, split, rows, config.image_size, channels, base_size=base,
                        augmentation=augmentation or Augmentation(), strict=config.strict_images)


def load_split(config: DataConfig, split: str | None = None, source: Source | None = None,
               channels: int | None = None) -> ImageDataset:
    """The split `split` (default `config.split`) of `config.dataset` as an ImageDataset (no augmentation)."""
    config.check_data_flags()
    split = split or config.split
    source = source or open_source(config)
    channels = channels or first_image_channels(source, split, config.channels)
    return make_dataset(source, split, source.rows(split), config, channels)


def held_out_indices(num_rows: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) row indices, each sorted: a fixed seeded `fraction` (at least one row) is held
    out, the same for every run and every --seed."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--validation-fraction must be in (0, 1), got {fraction}")
    if num_rows < 2:
        raise UserError(f"{num_rows} row(s) cannot be split into training and validation; at least 2 are needed")
    order = np.random.RandomState(VALIDATION_SEED).permutation(num_rows)
    num_held_out = max(1, int(math.floor(num_rows * fraction)))
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


def held_out_split(source: Source, split: str) -> str | None:
    """The source's own held-out split for training on `split`, if it has one."""
    return next((name for name in HELD_OUT_SPLITS if name in source.split_names and name != split), None)


def load_train_and_validation(config: DataConfig, source: Source | None = None, channels: int | None = None,
                              augmentation: Augmentation | None = None) -> tuple[ImageDataset, ImageDataset]:
    """The training split (augmented when asked) and a held-out split: the source's own held-out
    split where it has one, else a seeded `validation_fraction` of the training split."""
    config.check_data_flags()
    source = source or open_source(config)
    channels = channels or first_image_channels(source, config.split, config.channels)
    rows = source.rows(config.split)
    held_out = held_out_split(source, config.split)
    if held_out is not None:
        return (make_dataset(source, config.split, rows, config, channels, augmentation),
                make_dataset(source, held_out, source.rows(held_out), config, channels))
    kept, validation = held_out_indices(len(rows), config.validation_fraction)
    return (make_dataset(source, config.split, rows.select(kept), config, channels, augmentation),
            make_dataset(source, f"{config.split} held-out {config.validation_fraction:g}", rows.select(validation),
                         config, channels))


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous block of `range(num_items)` that process `rank` of `world_size` handles."""
    per_rank = math.ceil(num_items / world_size)
    return range(min(num_items, rank * per_rank), min(num_items, (rank + 1) * per_rank))
