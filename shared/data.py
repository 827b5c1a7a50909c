"""Image datasets for both stages, loaded through Hugging Face `datasets`.

`--dataset` accepts:
- `digits`: scikit-learn's 1,797 handwritten 8x8 digits, labels 0-9, a fixed seeded 90/10 train/test split;
- a local image folder (class subfolders become labels; `train/` and `test/` subfolders become splits);
- a folder written with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a Hub dataset name (`--image-column`, `--label-column` pick the columns).

Images leave this module as float tensors in [-1, 1], shape (C, H, W): resized so the shorter side
is `image_size`, centre-cropped, with 1 or 3 channels.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shared.config import option
from shared.errors import UserError

DIGITS = "digits"
DIGITS_TEST_FRACTION = 0.1
VALIDATION_SEED = 0  # fixed, so every run of any seed holds out the same images
HELD_OUT_SPLITS = ("test", "validation", "valid", "val")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'mnist' or 'user/name'; anything else is a path
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are shaped."""

    dataset: str = option(DIGITS, "digits, an image folder, a save_to_disk folder, or a Hub dataset name")
    split: str = option("train", "split to train on (or export)")
    image_size: int = option(32, "images are resized (shorter side) and centre-cropped to this size")
    channels: int | None = option(None, "1 or 3; default: the channel count of the first image")
    image_column: str | None = option(None, "image column of a datasets source (default: the first image column)")
    label_column: str | None = option(None, "label column of a datasets source (default: 'label' when present)")
    validation_fraction: float = option(0.1, "held-out fraction when the source has no test split")


# ------------------------------------------------------------------------------------------------
# Opening a source
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """The splits of one source, each a `datasets.Dataset` with undecoded images."""

    description: str
    splits: dict[str, Any]
    image_column: str
    label_column: str | None
    label_names: list[str] | None


def open_source(dataset: str, image_column: str | None = None, label_column: str | None = None) -> Source:
    """Open `dataset` (any form in the module docstring) without decoding any image yet."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if dataset == DIGITS:
        if image_column or label_column:
            raise UserError("--image-column and --label-column do not apply to --dataset digits; drop them")
        return _digits_source()
    path = Path(dataset).expanduser()
    if path.is_file():
        raise UserError(f"--dataset {dataset} is a file; pass a folder of images, a save_to_disk folder or 'digits'")
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as error:  # datasets raises several types for a broken folder
                raise UserError(f"cannot open save_to_disk folder {path} ({_first_line(error)}); re-create it") from None
        else:
            loaded = _load_image_folder(path)
        return _wrap(str(path), loaded, image_column, label_column)
    if not HUB_NAME.fullmatch(dataset):
        raise UserError(f"dataset folder {dataset} does not exist; pass an existing folder, 'digits', or a Hub name")
    try:
        loaded = datasets.load_dataset(dataset)
    except Exception as error:  # offline, unknown name, or a script dataset
        raise UserError(f"cannot load dataset {dataset!r}: it is not a local folder and the Hub gave "
                        f"'{_first_line(error)}'; pass 'digits', an image folder or a save_to_disk folder") from None
    return _wrap(dataset, loaded, image_column, label_column)


def _load_image_folder(path: Path) -> Any:
    import datasets

    has_images = any(child.suffix.lower() in IMAGE_SUFFIXES for child in path.rglob("*") if child.is_file())
    if not has_images:
        raise UserError(f"image folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "point --dataset at a folder of images")
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as error:
        raise UserError(f"cannot read image folder {path} ({_first_line(error)})") from None


def _wrap(description: str, loaded: Any, image_column: str | None, label_column: str | None) -> Source:
    import datasets

    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    first = next(iter(splits.values()))
    features = first.features
    if image_column is None:
        image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if not image_columns:
            raise UserError(f"{description} has no image column (columns: {', '.join(features)}); "
                            "pass --image-column")
        image_column = image_columns[0]
    elif image_column not in features:
        raise UserError(f"{description} has no column {image_column!r} (columns: {', '.join(features)}); "
                        "fix --image-column")
    elif not _holds_images(features[image_column]):
        raise UserError(f"column {image_column!r} of {description} does not hold images "
                        f"({type(features[image_column]).__name__}); fix --image-column")
    if label_column is None:
        label_column = "label" if "label" in features else None
    elif label_column not in features:
        raise UserError(f"{description} has no column {label_column!r} (columns: {', '.join(features)}); "
                        "fix --label-column")
    if label_column is not None and not _holds_class_ids(features[label_column]):
        raise UserError(f"column {label_column!r} of {description} does not hold integer class ids "
                        f"({features[label_column]}); pick a ClassLabel or integer column with --label-column")
    label_names = None
    if label_column is not None and isinstance(features[label_column], datasets.ClassLabel):
        label_names = list(features[label_column].names)
    if isinstance(features[image_column], datasets.Image):
        splits = {name: split.cast_column(image_column, datasets.Image(decode=False)) for name, split in splits.items()}
    return Source(description, splits, image_column, label_column, label_names)


def _holds_images(feature: Any) -> bool:
    import datasets

    return isinstance(feature, (datasets.Image, datasets.Array2D, datasets.Array3D, datasets.Sequence, list))


def _holds_class_ids(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))


@functools.lru_cache(maxsize=1)
def _digits_source() -> Source:
    import datasets
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 17 grey levels
    order = np.random.RandomState(VALIDATION_SEED).permutation(len(pixels))
    num_test = int(round(len(pixels) * DIGITS_TEST_FRACTION))
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])})

    def build(indices: np.ndarray) -> datasets.Dataset:
        images = [{"bytes": _png_bytes(pixels[i]), "path": None} for i in indices]
        return datasets.Dataset.from_dict({"image": images, "label": bunch.target[indices].tolist()}, features=features)

    splits = {"train": build(np.sort(order[num_test:])), "test": build(np.sort(order[:num_test]))}
    return Source(DIGITS, splits, "image", "label", [str(digit) for digit in range(10)])


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------
# A split as a torch dataset
# ------------------------------------------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """One split of a source: item i is (image float (C, H, W) in [-1, 1], label int, -1 when unlabelled)."""

    def __init__(self, source: Source, split: str, rows: Any, image_size: int, channels: int) -> None:
        self.source = source
        self.split = split
        self.rows = rows  # a datasets.Dataset
        self.image_size = image_size
        self.channels = channels
        # what to tell the user when an image disagrees with the expected channel count
        self.channels_fix = ("pass --channels {found} if every image has {found}; a folder that mixes grey and "
                             "colour images must be converted to one mode first")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def has_labels(self) -> bool:
        return self.source.label_column is not None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[int(index)]
        image = preprocess(self.read_image(row[self.source.image_column], index), self.image_size)
        label = -1
        if self.has_labels:
            label = row[self.source.label_column]
            if label is None or label < 0:
                raise UserError(f"row {index} of {self.source.description} [{self.split}] has no class label "
                                f"({label!r}); fill it in or train without --label-column")
        return image, int(label)

    def read_image(self, value: Any, index: int) -> Image.Image:
        """Decode one stored image and check its channel count, naming the row and file on failure."""
        image, where = self.decode(value, index)
        found = channels_of(image)
        if found != self.channels:
            raise UserError(f"the image at {where} has {found} channel{'s' * (found > 1)}, expected "
                            f"{self.channels}; {self.channels_fix.format(found=found)}")
        return image.convert("L" if found == 1 else "RGB")

    def decode(self, value: Any, index: int) -> tuple[Image.Image, str]:
        """The stored image of row `index` as a PIL image, and a description of where it is."""
        where = f"row {index} of {self.source.description} [{self.split}]"
        if isinstance(value, dict):
            where += f" ({value.get('path')})" if value.get("path") else ""
            try:
                image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
                image.load()
            except (UnidentifiedImageError, OSError, ValueError, TypeError) as error:
                raise UserError(f"cannot read the image at {where}: {_first_line(error)}; "
                                "remove or replace that file") from None
            return image, where
        if isinstance(value, Image.Image):
            return value, where
        return Image.fromarray(np.asarray(value)), where


def channels_of(image: Image.Image) -> int:
    """1 for grey modes, 3 for colour ones (an alpha channel is dropped)."""
    return 1 if image.mode in GREY_MODES else 3


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size` (antialiased bicubic), centre-crop, scale to [-1, 1]."""
    width, height = image.size
    scale = image_size / min(width, height)
    if (width, height) != (image_size, image_size):
        new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(new_size, Image.BICUBIC)
        left = (new_size[0] - image_size) // 2
        top = (new_size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    if pixels.ndim == 2:
        pixels = pixels[None]  # (1, H, W)
    else:
        pixels = pixels.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return pixels.float().div(127.5).sub(1.0)  # (C, H, W) in [-1, 1]


def _open_split(config: DataConfig, split: str) -> tuple[Source, Any]:
    source = open_source(config.dataset, config.image_column, config.label_column)
    if split not in source.splits:
        raise UserError(f"{source.description} has no split {split!r} (splits: {', '.join(source.splits)}); "
                        "fix --split")
    return source, source.splits[split]


def load_split(config: DataConfig, split: str | None = None) -> ImageDataset:
    """The split `split` (default `config.split`) of `config.dataset` as an ImageDataset."""
    split = split or config.split
    source, rows = _open_split(config, split)
    return _make_dataset(source, split, rows, config)


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


def load_train_and_validation(config: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """The training split and a held-out split: the source's test split where it has one, else a
    seeded `validation_fraction` of the training split (the same images for every run)."""
    source, rows = _open_split(config, config.split)
    held_out = next((name for name in HELD_OUT_SPLITS if name in source.splits and name != config.split), None)
    if held_out is not None:
        train = _make_dataset(source, config.split, rows, config)
        return train, _make_dataset(source, held_out, source.splits[held_out], config)
    kept, validation = held_out_indices(len(rows), config.validation_fraction)
    return (_make_dataset(source, config.split, rows.select(kept), config),
            _make_dataset(source, f"{config.split} held-out {config.validation_fraction:g}", rows.select(validation),
                          config))


def _make_dataset(source: Source, split: str, rows: Any, config: DataConfig) -> ImageDataset:
    if len(rows) == 0:
        raise UserError(f"{source.description} [{split}] is empty; point --dataset at a source with images")
    if config.image_size < 1:
        raise UserError(f"--image-size must be positive, got {config.image_size}")
    dataset = ImageDataset(source, split, rows, config.image_size, config.channels or 0)
    if config.channels is None:
        dataset.channels = channels_of(dataset.decode(rows[0][source.image_column], 0)[0])
    elif config.channels not in (1, 3):
        raise UserError(f"--channels must be 1 or 3, got {config.channels}")
    return dataset


# ------------------------------------------------------------------------------------------------
# Batches in a fixed order: batch k is a pure function of (seed, k), so resume needs only the step.
# ------------------------------------------------------------------------------------------------

class CachedImages(torch.utils.data.Dataset):
    """A split decoded once into memory as uint8 (lossless: preprocessing ends on 8-bit pixels)."""

    def __init__(self, dataset: ImageDataset, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        num = len(dataset)
        self.images = torch.empty(num, dataset.channels, dataset.image_size, dataset.image_size, dtype=torch.uint8)
        self.labels = torch.empty(num, dtype=torch.long)
        for index in tqdm(range(num), desc=f"decoding {dataset.split}", disable=not progress, leave=False):
            image, label = dataset[index]
            self.images[index] = image.add(1.0).mul(127.5).round().to(torch.uint8)
            self.labels[index] = label

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) float in [-1, 1] and labels (B,) for `indices`."""
        return self.images[indices].float().div(127.5).sub(1.0), self.labels[indices]


class StepOrder:
    """An endless stream of seeded epoch permutations, cut into global batches.

    The examples of micro-batch k (k = step * accumulation + micro) are stream positions
    [k * global_batch, (k + 1) * global_batch); process `rank` takes every `world`-th of them.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size  # per process
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def _permutation_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_examples, generator=generator)
            self._epoch = epoch
        return self._permutation

    def indices(self, micro_batch: int) -> torch.Tensor:
        """This process's example indices (batch_size,) for micro-batch `micro_batch`."""
        global_batch = self.batch_size * self.world_size
        start = micro_batch * global_batch
        positions = torch.arange(start + self.rank, start + global_batch, self.world_size)  # (batch_size,)
        out = torch.empty(len(positions), dtype=torch.long)
        for epoch in torch.unique(positions // self.num_examples).tolist():
            in_epoch = positions // self.num_examples == epoch
            out[in_epoch] = self._permutation_of(epoch)[positions[in_epoch] % self.num_examples]
        return out


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous block of `range(num_items)` that process `rank` of `world_size` handles."""
    per_rank = math.ceil(num_items / world_size)
    return range(min(num_items, rank * per_rank), min(num_items, (rank + 1) * per_rank))


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save images (B, C, H, W) in [-1, 1] as one PNG grid (written to a temporary file, then renamed)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    save_image(images.detach().float().cpu().add(1).div(2).clamp(0, 1), str(temporary), nrow=nrow, padding=2,
               pad_value=1.0)
    os.replace(temporary, path)

