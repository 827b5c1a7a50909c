"""Image datasets for both stages: opened lazily, decoded in DataLoader workers, batched by step.

`--dataset` accepts:
- `digits`: scikit-learn's 1,797 handwritten 8x8 digits, labels 0-9, a fixed seeded 90/10 train/test split;
- a local image folder: class subfolders become labels, `train/`, `test/`, `validation/` subfolders
  become splits; the tree is listed once, with `os.scandir`, into a compact path table;
- a folder written with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a Hub dataset name (`--dataset-config`, `--revision`, `--image-column`, `--label-column` apply).

Opening a source reads no image. Images are decoded where they are used: in DataLoader worker
processes during training, evaluation and export. A small split (see `CACHE_LIMIT_BYTES`) is
decoded once into memory as uint8 instead, because re-decoding it every epoch would cost more.

Every image becomes 8-bit grey or RGB the same way: EXIF orientation applied, 16-bit scaled (not
clipped) to 8 bits, palettes expanded, alpha composited onto white, CMYK converted. Then the shorter
side is resized to `image_size` (bicubic, antialiased), the centre cropped, and pixels are scaled
to [-1, 1] as (C, H, W) floats when they reach the model.

Batches are a pure function of (seed, step): `StepOrder` says which examples micro-batch k holds,
and augmentation draws come from (seed, k, example). So a resumed run, with any number of workers,
sees exactly the batches of the uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import sys
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.config import option
from shared.errors import UserError

DIGITS = "digits"
DIGITS_TEST_FRACTION = 0.1
VALIDATION_SEED = 0  # fixed, so every run of any seed holds out the same images
# Held-out splits in order of preference: ImageNet-style sources keep their labelled evaluation set in
# `validation` and an unlabelled `test`; the tokenizer can use either, `validation` is the usual choice.
HELD_OUT_SPLITS = ("validation", "valid", "val", "test")
SPLIT_FOLDERS = frozenset({"train", *HELD_OUT_SPLITS})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'mnist' or 'user/name'; anything else is a path
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
GREY_MODES = frozenset({"1", "L", "LA", "La", *SIXTEEN_BIT_MODES})
# A split whose decoded uint8 pixels fit in this many bytes is decoded once into memory (--cache-images auto).
CACHE_LIMIT_BYTES = 256 * 2 ** 20
# A corrupt image is replaced by the next readable one; give up after this many unreadable in a row.
MAX_SUBSTITUTE_TRIES = 64
NO_LABEL = -1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from, how they are shaped, and how training reads them."""

    dataset: str = option(DIGITS, "digits, an image folder, a save_to_disk folder, or a Hub dataset name")
    split: str = option("train", "split to train on (or export)")
    image_size: int = option(32, "images are resized (shorter side) and centre-cropped to this size")
    channels: int | None = option(None, "1 or 3; default: the channel count of the first image")
    image_column: str | None = option(None, "image column of a datasets source (default: the first image column)")
    label_column: str | None = option(None, "label column of a datasets source (default: 'label' when present; "
                                            "'none' turns labels off)")
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


# ------------------------------------------------------------------------------------------------
# Rows: one split of a source, as a table of undecoded images and optional integer labels
# ------------------------------------------------------------------------------------------------

class FolderRows:
    """Image files of one split: paths in one byte buffer (workers share it without copying, unlike a
    list of str whose reference counts would touch every page), and labels as an int64 array."""

    def __init__(self, root: Path, relative_paths: Sequence[str], labels: np.ndarray) -> None:
        self.root = root
        encoded = [path.encode("utf-8", "surrogateescape") for path in relative_paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self.root / self._blob[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def image_value(self, index: int) -> Any:
        return {"path": str(self.path(index)), "bytes": None}

    def select(self, indices: np.ndarray) -> "FolderRows":
        return FolderRows(self.root, [str(self.path(int(i)).relative_to(self.root)) for i in indices],
                          self.labels[indices])


class ArrowRows:
    """One split of a `datasets.Dataset` with undecoded images; labels are read once as an array."""

    def __init__(self, table: Any, image_column: str, label_column: str | None) -> None:
        self.table = table.select_columns([image_column])
        self.image_column = image_column
        if label_column is None:
            self.labels = np.full(len(table), NO_LABEL, dtype=np.int64)
        else:
            column = table.data.column(label_column)
            if table._indices is not None:  # a selected view: its rows are an index map over the table
                column = column.take(table._indices.column(0))
            values = column.to_numpy(zero_copy_only=False)
            labels = np.array([NO_LABEL if value is None else value for value in values] if values.dtype == object
                              else values, dtype=np.int64)
            self.labels = np.where(labels < 0, NO_LABEL, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def image_value(self, index: int) -> Any:
        return self.table[int(index)][self.image_column]

    def select(self, indices: np.ndarray) -> "ArrowRows":
        selected = object.__new__(ArrowRows)
        selected.table = self.table.select(indices)
        selected.image_column = self.image_column
        selected.labels = self.labels[indices]
        return selected


# ------------------------------------------------------------------------------------------------
# Opening a source: cheap, reads no image and (for folders) lists the tree only when a split is used
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """The splits of one source. `rows(split)` builds a split's table (listing a folder once)."""

    description: str
    split_names: list[str]
    label_names: list[str] | None
    image_column: str | None
    label_column: str | None
    _opener: Any  # split name -> rows
    _first_value: Any  # split name -> the undecoded first image and where it is
    _opened: dict[str, Any] = dataclasses.field(default_factory=dict)

    def rows(self, split: str) -> FolderRows | ArrowRows:
        if split not in self._opened:
            self._opened[split] = self._opener(split)
        return self._opened[split]

    def first_image_value(self, split: str) -> tuple[Any, str]:
        """The first image of `split`, undecoded, without listing or reading the whole split."""
        return self._first_value(split)

    def check_split(self, split: str) -> None:
        if split not in self.split_names:
            raise UserError(f"{self.description} has no split {split!r} (splits: {', '.join(self.split_names)}); "
                            "fix --split")


def open_source(config: DataConfig) -> Source:
    """Open `config.dataset` (any form in the module docstring) without decoding or listing images."""
    dataset = config.dataset
    hub_only = [flag for flag, value in (("--dataset-config", config.dataset_config), ("--revision", config.revision))
                if value is not None]
    if dataset == DIGITS:
        if config.image_column or (config.label_column and not config.labels_off):
            raise UserError("--image-column and --label-column do not apply to --dataset digits; drop them")
        if hub_only:
            raise UserError(f"{hub_only[0]} applies to Hub datasets only, not to --dataset digits; drop it")
        return _wrap_datasets(DIGITS, _digits_splits(), "image", "none" if config.labels_off else "label")
    path = Path(dataset).expanduser()
    if path.is_file():
        raise UserError(f"--dataset {dataset} is a file; pass a folder of images, a save_to_disk folder or 'digits'")
    if path.is_dir():
        if hub_only:
            raise UserError(f"{hub_only[0]} applies to Hub datasets only, not to the local folder {dataset}; drop it")
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _open_saved(path, config)
        if config.image_column is not None:
            raise UserError(f"--image-column does not apply to the image folder {dataset}; drop it")
        if config.label_column is not None and not config.labels_off:
            raise UserError(f"--label-column {config.label_column} does not apply to the image folder {dataset}: its "
                            "labels are its class subfolders; drop it, or pass --label-column none")
        return _open_folder(path, labels=not config.labels_off)
    if not HUB_NAME.fullmatch(dataset):
        raise UserError(f"dataset folder {dataset} does not exist; pass an existing folder, 'digits', or a Hub name")
    return _open_hub(dataset, config)


def _open_saved(path: Path, config: DataConfig) -> Source:
    import datasets

    _quiet_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several types for a broken folder
        raise UserError(f"cannot open save_to_disk folder {path} ({_first_line(error)}); re-create it") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return _wrap_datasets(str(path), splits, config.image_column, config.label_column)


def _open_hub(name: str, config: DataConfig) -> Source:
    import datasets

    _quiet_datasets()
    try:
        loaded = datasets.load_dataset(name, config.dataset_config, revision=config.revision)
    except Exception as error:  # offline, unknown name or config, or a script dataset
        raise UserError(f"cannot load dataset {name!r}: it is not a local folder and the Hub gave "
                        f"'{_first_line(error)}'; pass 'digits', an image folder or a save_to_disk folder") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return _wrap_datasets(name, splits, config.image_column, config.label_column)


def _wrap_datasets(description: str, splits: dict[str, Any], image_column: str | None,
                   label_column: str | None) -> Source:
    """A Source over `datasets.Dataset` splits, after checking the image and label columns."""
    import datasets

    features = next(iter(splits.values())).features
    if image_column is None:
        image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if not image_columns:
            raise UserError(f"{description} has no image column (columns: {', '.join(features)}); "
                            "pass --image-column")
        image_column = image_columns[0]
    elif image_column not in features:
        raise UserError(f"{description} has no column {image_column!r} (columns: {', '.join(features)}); "
                        "fix --image-column")
    elif not isinstance(features[image_column], (datasets.Image, datasets.Array2D, datasets.Array3D,
                                                 datasets.Sequence, list)):
        raise UserError(f"column {image_column!r} of {description} does not hold images "
                        f"({type(features[image_column]).__name__}); fix --image-column")
    if label_column is not None and label_column.lower() == "none":
        label_column = None
    elif label_column is None:
        label_column = "label" if "label" in features and _holds_class_ids(features["label"]) else None
    elif label_column not in features:
        raise UserError(f"{description} has no column {label_column!r} (columns: {', '.join(features)}); "
                        "fix --label-column, or pass --label-column none")
    elif not _holds_class_ids(features[label_column]):
        raise UserError(f"column {label_column!r} of {description} does not hold integer class ids "
                        f"({features[label_column]}); pick a ClassLabel or integer column with --label-column, "
                        "or pass --label-column none")
    label_names = None
    if label_column is not None and isinstance(features[label_column], datasets.ClassLabel):
        label_names = list(features[label_column].names)
    if isinstance(features[image_column], datasets.Image):
        splits = {name: split.cast_column(image_column, datasets.Image(decode=False)) for name, split in splits.items()}

    def first_value(split: str) -> tuple[Any, str]:
        table = splits[split]
        if len(table) == 0:
            raise UserError(f"{description} [{split}] is empty; point --dataset at a source with images")
        return table[0][image_column], f"row 0 of {description} [{split}]"

    def open_rows(split: str) -> ArrowRows:  # a split may lack the label column (an unlabelled test split)
        labelled = label_column if label_column in splits[split].column_names else None
        return ArrowRows(splits[split], image_column, labelled)

    return Source(description, list(splits), label_names, image_column, label_column, open_rows, first_value)


def _holds_class_ids(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))


def _open_folder(root: Path, labels: bool) -> Source:
    """An image folder. Top-level `train/`, `test/`, ... folders are splits; below a split, first-level
    subfolders are classes. Only the top levels are read here; a split is listed when it is used, and
    no folder is ever listed twice (`Listing`)."""
    listing = Listing()
    subfolders = listing(root)[0]
    split_folders = [name for name in subfolders if name.lower() in SPLIT_FOLDERS]
    if split_folders and len(split_folders) < len(subfolders):
        others = [name for name in subfolders if name not in split_folders]
        raise UserError(f"image folder {root} mixes split folders ({', '.join(split_folders)}) with other folders "
                        f"({', '.join(others[:3])}); put every class folder inside a split folder")
    split_roots = {name.lower(): root / name for name in split_folders} if split_folders else {"train": root}
    # Class names come from every split, so a class id means the same in train and test.
    class_names = sorted({name for split_root in split_roots.values() for name in listing(split_root)[0]}) \
        if labels else []

    def list_split(split: str) -> FolderRows:
        paths, found_labels = [], []
        class_ids = {name: index for index, name in enumerate(class_names)}
        split_root = split_roots[split]
        for relative in _walk_images(split_root, listing):
            paths.append(relative)
            top = relative.split(os.sep, 1)
            found_labels.append(class_ids[top[0]] if len(top) == 2 and top[0] in class_ids else NO_LABEL)
        if not paths:
            raise UserError(f"image folder {split_root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "point --dataset at a folder of images")
        return FolderRows(split_root, paths, np.asarray(found_labels, dtype=np.int64))

    def first_value(split: str) -> tuple[Any, str]:
        first = next(_walk_images(split_roots[split], listing), None)
        if first is None:
            raise UserError(f"image folder {split_roots[split]} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); point --dataset at a folder of images")
        path = split_roots[split] / first
        return {"path": str(path), "bytes": None}, f"{path}"

    return Source(str(root), list(split_roots), class_names or None, None, "label" if class_names else None,
                  list_split, first_value)


class Listing:
    """Folder contents read once with `os.scandir` and remembered: (sorted subfolders, sorted image files)."""

    def __init__(self) -> None:
        self.seen: dict[Path, tuple[list[str], list[str]]] = {}

    def __call__(self, folder: Path) -> tuple[list[str], list[str]]:
        if folder not in self.seen:
            folders, files = [], []
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        folders.append(entry.name)
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                        files.append(entry.name)
            self.seen[folder] = (sorted(folders), sorted(files))
        return self.seen[folder]


def _walk_images(root: Path, listing: Listing) -> Iterator[str]:
    """Image files below `root` as relative paths, in sorted order (depth first)."""
    pending = [""]
    while pending:
        relative = pending.pop()
        folders, files = listing(root / relative if relative else root)
        for name in files:
            yield os.path.join(relative, name) if relative else name
        pending.extend(os.path.join(relative, name) if relative else name for name in reversed(folders))


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, Any]:
    import datasets
    from sklearn.datasets import load_digits

    _quiet_datasets()
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 17 grey levels
    order = np.random.RandomState(VALIDATION_SEED).permutation(len(pixels))
    num_test = int(round(len(pixels) * DIGITS_TEST_FRACTION))
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])})

    def build(indices: np.ndarray) -> Any:
        images = [{"bytes": _png_bytes(pixels[i]), "path": None} for i in indices]
        return datasets.Dataset.from_dict({"image": images, "label": bunch.target[indices].tolist()}, features=features)

    return {"train": build(np.sort(order[num_test:])), "test": build(np.sort(order[:num_test]))}


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------
# Decoding and preprocessing one image
# ------------------------------------------------------------------------------------------------

class ImageProblem(Exception):
    """An image that cannot be used; `where` names the row and file."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot read the image at {where}: {reason}")
        self.where, self.reason = where, reason

    def __reduce__(self):  # it travels from loader workers to the main process
        return ImageProblem, (self.where, self.reason)


def decode_image(value: Any, where: str) -> Image.Image:
    """A stored image (a {path, bytes} dict, a PIL image or an array) as a loaded PIL image."""
    if isinstance(value, dict):
        if value.get("path"):
            where = f"{where} ({value['path']})" if value["path"] not in where else where
        try:
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as error:
            raise ImageProblem(where, _first_line(error)) from None
        return image
    if isinstance(value, Image.Image):
        return value
    try:
        return Image.fromarray(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise ImageProblem(where, _first_line(error)) from None


def channels_of(image: Image.Image) -> int:
    """1 for grey images (a palette of greys included), 3 for colour ones (an alpha channel is dropped)."""
    if image.mode == "P":
        palette = image.getpalette() or []
        colours = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
        return 1 if len(colours) and (colours == colours[:, :1]).all() else 3
    return 1 if image.mode in GREY_MODES else 3


def to_8bit(image: Image.Image, channels: int, where: str) -> Image.Image:
    """Convert any PIL mode to 8-bit 'L' (channels 1) or 'RGB' (channels 3).

    16-bit grey is scaled by 255/65535 (PIL's own conversion clips at 255); transparency is
    composited onto white; palettes, CMYK and YCbCr go through PIL's conversions.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / 65535.0)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ImageProblem(where, "32-bit float images have no defined range; convert it to 8- or 16-bit")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    try:
        return image.convert("L" if channels == 1 else "RGB")
    except ValueError as error:  # modes PIL cannot convert (LAB, HSV, ...)
        raise ImageProblem(where, f"mode {image.mode} cannot be converted ({_first_line(error)})") from None


def resize_and_centre_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (antialiased bicubic), centre-crop: uint8 (C, size, size)."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.BICUBIC)
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = np.array(image, dtype=np.uint8, copy=True)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, S, S)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (same shape)."""
    return pixels.float().div(127.5).sub(1.0)


def augmentation_draws(seed: int, micro_batch: int, index: int, base_size: int, image_size: int,
                       flip: bool, crop: bool) -> tuple[bool, int, int]:
    """(flip?, top, left) for example `index` in micro-batch `micro_batch`: a pure function of its inputs."""
    generator = np.random.default_rng([seed, micro_batch, index, 0xA06])
    top, left = (base_size - image_size) // 2, (base_size - image_size) // 2
    if crop:
        top, left = (int(value) for value in generator.integers(0, base_size - image_size + 1, size=2))
    return bool(flip and generator.random() < 0.5), top, left


def augment(base: torch.Tensor, draws: tuple[bool, int, int], image_size: int) -> torch.Tensor:
    """Crop (C, S, S) uint8 at (top, left) to image_size, flipped left-right when asked."""
    flip, top, left = draws
    cropped = base[:, top:top + image_size, left:left + image_size]
    return cropped.flip(-1) if flip else cropped


# ------------------------------------------------------------------------------------------------
# A split as a torch dataset
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training-time draws; off for evaluation and export."""

    seed: int = 0
    flip: bool = False
    crop: bool = False


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


class _Examples(torch.utils.data.Dataset):
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


def _collate_or_problem(items: list[Example | ImageProblem]) -> Batch | ImageProblem:
    problem = next((item for item in items if isinstance(item, ImageProblem)), None)
    return problem if problem is not None else collate_examples(items)


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


def _loader(dataset: torch.utils.data.Dataset, batch_sampler: Any, num_workers: int, pin: bool,
            persistent: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_collate_or_problem,
        pin_memory=pin, persistent_workers=persistent and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, generator=_private_generator())


def _private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from this instead of torch's global generator, whose
    state a checkpoint restores: a loader started after --resume must not shift the training RNG stream.
    (Nothing here uses the workers' seeds: augmentation draws come from (seed, step, example).)"""
    return torch.Generator().manual_seed(0)


def _raise_problem(item: Batch | ImageProblem) -> Batch:
    if isinstance(item, ImageProblem):
        raise UserError(f"{item}; remove or replace that file (or drop --strict-images to skip such images)")
    return item


# ------------------------------------------------------------------------------------------------
# Batches in a fixed order: micro-batch k is a pure function of (seed, k), so resume needs only the step.
# ------------------------------------------------------------------------------------------------

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


class StepBatchSampler(torch.utils.data.Sampler):
    """Keys [(index, k), ...] of micro-batches k = first, first + 1, ... (endless): the batch sampler
    of the training loader, so batch composition stays a pure function of (seed, step)."""

    def __init__(self, order: StepOrder, first_micro_batch: int) -> None:
        self.order = order
        self.first = first_micro_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_batch = self.first
        while True:
            yield [(int(index), micro_batch) for index in self.order.indices(micro_batch)]
            micro_batch += 1


class CachedImages:
    """A split decoded once into memory as uint8 (lossless: preprocessing ends on 8-bit pixels),
    at the size training crops from. Batches equal those the streaming path gives."""

    def __init__(self, dataset: ImageDataset, num_workers: int, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        self.dataset = dataset
        num, size = len(dataset), dataset.base_size
        try:
            self.pixels = torch.empty(num, dataset.channels, size, size, dtype=torch.uint8)
        except RuntimeError as error:
            raise UserError(f"the decoded split needs {num * dataset.channels * size * size / 2 ** 30:.1f} GiB "
                            f"({_first_line(error)}); pass --cache-images never") from None
        self.problems: list[str] = []
        plain = ImageDataset(dataset.source, dataset.split, dataset.rows, size, dataset.channels,
                             strict=dataset.strict)
        bar = tqdm(total=num, desc=f"decoding {dataset.split}", disable=not progress, leave=False, unit="img")
        for batch in sequential_batches(plain, range(num), 256, num_workers):
            self.pixels[batch.indices] = batch.pixels
            self.problems.extend(batch.problems)
            bar.update(len(batch.indices))
        bar.close()
        self.labels = torch.from_numpy(dataset.labels.copy())

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, keys: list[tuple[int, int]]) -> Batch:
        dataset, augmentation = self.dataset, self.dataset.augmentation
        pixels = [augment(self.pixels[index], augmentation_draws(
            augmentation.seed, micro_batch, index, dataset.base_size, dataset.image_size, augmentation.flip,
            augmentation.crop), dataset.image_size) for index, micro_batch in keys]
        indices = torch.tensor([index for index, _ in keys], dtype=torch.long)
        # the cache holds each replaced row's substitute; the problem was reported when it was decoded
        return Batch(torch.stack(pixels), self.labels[indices], indices, [])


def should_cache(dataset: ImageDataset, mode: str) -> bool:
    """The caching rule (--cache-images): always, never, or auto = when the decoded uint8 pixels fit
    in CACHE_LIMIT_BYTES (small datasets read for many epochs; decoding them once pays)."""
    if mode != "auto":
        return mode == "always"
    return len(dataset) * dataset.channels * dataset.base_size ** 2 <= CACHE_LIMIT_BYTES


def training_batches(data: ImageDataset | CachedImages, order: StepOrder, first_micro_batch: int,
                     num_workers: int, pin_memory: bool) -> Iterator[Batch]:
    """Micro-batches first_micro_batch, first_micro_batch + 1, ... for this process, endlessly."""
    sampler = StepBatchSampler(order, first_micro_batch)
    if isinstance(data, CachedImages):
        return (data.batch(keys) for keys in sampler)
    loader = _loader(_Examples(data), sampler, num_workers, pin_memory, persistent=True)
    return (_raise_problem(item) for item in loader)


def code_batches(codes: Any, order: StepOrder, first_micro_batch: int, num_workers: int,
                 pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(codes, labels) of micro-batches first_micro_batch, ... from a memory-mapped CodesDataset, endlessly.
    A batch is one gather from the mapped file; workers (`num_workers` > 0) read ahead."""
    def index_lists() -> Iterator[list[int]]:
        micro_batch = first_micro_batch
        while True:
            yield order.indices(micro_batch).tolist()
            micro_batch += 1

    if num_workers == 0:
        return (codes.__getitems__(indices) for indices in index_lists())
    return iter(torch.utils.data.DataLoader(codes, batch_sampler=index_lists(), num_workers=num_workers,
                                            collate_fn=_already_batched, pin_memory=pin_memory,
                                            persistent_workers=True, prefetch_factor=4,
                                            generator=_private_generator()))


def _already_batched(batch: Any) -> Any:
    return batch


def sequential_batches(data: ImageDataset | CachedImages, rows: range, batch_size: int, num_workers: int,
                       pin_memory: bool = False) -> Iterator[Batch]:
    """Rows `rows` of `data` in order, in batches of `batch_size` (no augmentation)."""
    starts = range(rows.start, rows.stop, batch_size)
    keys = [[(index, 0) for index in range(start, min(start + batch_size, rows.stop))] for start in starts]
    if isinstance(data, CachedImages):
        yield from (data.batch(batch_keys) for batch_keys in keys)
        return
    if not keys:
        return
    loader = _loader(_Examples(data), keys, min(num_workers, len(keys)), pin_memory, persistent=False)
    for item in loader:
        yield _raise_problem(item)


# ------------------------------------------------------------------------------------------------
# Splits for the commands
# ------------------------------------------------------------------------------------------------

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


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save images (B, C, H, W) in [-1, 1] as one PNG grid (written to a temporary file, then renamed)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    save_image(images.detach().float().cpu().add(1).div(2).clamp(0, 1), str(temporary), nrow=nrow, padding=2,
               pad_value=1.0)
    os.replace(temporary, path)
