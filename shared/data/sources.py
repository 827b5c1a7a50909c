"""Opening a source (`--dataset`): cheap, reads no image, and (for folders) lists the tree only when a
split is used. A source is digits, an image folder, a `save_to_disk` folder or a Hub dataset; its
splits are tables of undecoded images and integer labels (`FolderRows`, `ArrowRows`)."""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.data.config import (CAPTION_COLUMN, DIGITS, DIGITS_TEST_FRACTION, FOLDER_METADATA, HUB_NAME,
                                IMAGE_SUFFIXES, NO_LABEL, SPLIT_FOLDERS, VALIDATION_SEED, DataConfig, is_shard_pattern)
from shared.data.captions import checked_caption_column, clean_caption, folder_captions
from shared.data.shapes import (OBJECT_SETS, OBJECTS_COLUMN, SHAPES, SPLIT_SIZES, objects_label,
                                 shapes_split)
from shared.errors import UserError, first_line


class FolderRows:
    """Image files of one split: paths in one byte buffer (workers share it without copying, unlike a
    list of str whose reference counts would touch every page), and labels as an int64 array."""

    def __init__(self, root: Path, relative_paths: Sequence[str], labels: np.ndarray,
                 captions: np.ndarray | None = None) -> None:
        self.root = root
        self.captions = captions  # (N,) object: str, or None where a row has none; None: no caption column
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
                          self.labels[indices], None if self.captions is None else self.captions[indices])


class ArrowRows:
    """One split of a `datasets.Dataset` with undecoded images; labels are read once as an array."""

    def __init__(self, table: Any, image_column: str, label_column: str | None,
                 caption_column: str | None = None) -> None:
        self.table = table.select_columns([image_column])
        self.image_column = image_column
        self.captions = None  # (N,) object: str, or None where a row has none; None: no caption column
        if caption_column is not None:
            self.captions = np.array([clean_caption(value) for value in table[caption_column]] + [None])[:-1]
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
        selected.captions = None if self.captions is None else self.captions[indices]
        return selected


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
    caption_column: str | None = None  # where the captions come from, or None

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
        if config.caption_column is not None and not config.captions_off:
            raise UserError("--dataset digits has no captions; drop --caption-column, or use --dataset shapes")
        return wrap_datasets(DIGITS, _digits_splits(), "image", "none" if config.labels_off else "label")
    if dataset == SHAPES:
        if config.image_column or hub_only:
            raise UserError("--image-column, --dataset-config and --revision do not apply to --dataset shapes; "
                            "drop them")
        if config.label_column not in (None, OBJECTS_COLUMN) and not config.labels_off:
            raise UserError(f"--dataset shapes has one label column, {OBJECTS_COLUMN!r} (the colours and shapes an "
                            "image holds, for a feature network); fix --label-column or drop it")
        if config.caption_column not in (None, CAPTION_COLUMN) and not config.captions_off:
            raise UserError(f"--dataset shapes has one caption column, {CAPTION_COLUMN!r}; fix --caption-column")
        # unlabelled unless asked: its captions, not a class, are what a prior conditions on
        labels = OBJECTS_COLUMN if config.label_column == OBJECTS_COLUMN else "none"
        return wrap_datasets(SHAPES, _shapes_splits(), "image", labels, config.caption_column)
    if is_shard_pattern(dataset):
        raise UserError(f"--dataset {dataset} names tar shards, which only stage-1 training reads (as a stream, with "
                        "--streaming); convert them to a folder or a save_to_disk dataset for this command")
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
        return _open_folder(path, labels=not config.labels_off, caption_column=config.caption_column)
    if not HUB_NAME.fullmatch(dataset):
        raise UserError(f"dataset folder {dataset} does not exist; pass an existing folder, 'digits', or a Hub name")
    return _open_hub(dataset, config)


def _open_saved(path: Path, config: DataConfig) -> Source:
    import datasets

    _quiet_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several types for a broken folder
        raise UserError(f"cannot open save_to_disk folder {path} ({first_line(error)}); re-create it") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return wrap_datasets(str(path), splits, config.image_column, config.label_column, config.caption_column)


def _open_hub(name: str, config: DataConfig) -> Source:
    import datasets

    _quiet_datasets()
    try:
        loaded = datasets.load_dataset(name, config.dataset_config, revision=config.revision)
    except Exception as error:  # offline, unknown name or config, or a script dataset
        raise UserError(f"cannot load dataset {name!r}: it is not a local folder and the Hub gave "
                        f"'{first_line(error)}'; pass 'digits', an image folder or a save_to_disk folder") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return wrap_datasets(name, splits, config.image_column, config.label_column, config.caption_column)


def wrap_datasets(description: str, splits: dict[str, Any], image_column: str | None,
                   label_column: str | None, caption_column: str | None = None) -> Source:
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
    caption_column = checked_caption_column(description, features, caption_column)
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
        captioned = caption_column if caption_column in splits[split].column_names else None
        return ArrowRows(splits[split], image_column, labelled, captioned)

    return Source(description, list(splits), label_names, image_column, label_column, open_rows, first_value,
                  caption_column=caption_column)


def _holds_class_ids(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))


def _open_folder(root: Path, labels: bool, caption_column: str | None = None) -> Source:
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
        return FolderRows(split_root, paths, np.asarray(found_labels, dtype=np.int64),
                          folder_captions(split_root, paths, caption_column))

    def first_value(split: str) -> tuple[Any, str]:
        first = next(_walk_images(split_roots[split], listing), None)
        if first is None:
            raise UserError(f"image folder {split_roots[split]} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); point --dataset at a folder of images")
        path = split_roots[split] / first
        return {"path": str(path), "bytes": None}, f"{path}"

    captioned = not (caption_column is not None and caption_column.lower() == "none") and (
        caption_column is not None or any((split_root / FOLDER_METADATA).is_file() for split_root in split_roots.values()))
    return Source(str(root), list(split_roots), class_names or None, None, "label" if class_names else None,
                  list_split, first_value, caption_column=(caption_column or CAPTION_COLUMN) if captioned else None)


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
        images = [{"bytes": png_bytes(pixels[i]), "path": None} for i in indices]
        return datasets.Dataset.from_dict({"image": images, "label": bunch.target[indices].tolist()}, features=features)

    return {"train": build(np.sort(order[num_test:])), "test": build(np.sort(order[:num_test]))}


@functools.lru_cache(maxsize=1)
def _shapes_splits() -> dict[str, Any]:
    import datasets

    _quiet_datasets()
    features = datasets.Features({"image": datasets.Image(decode=False), CAPTION_COLUMN: datasets.Value("string"),
                                  OBJECTS_COLUMN: datasets.ClassLabel(names=OBJECT_SETS)})
    splits = {}
    for split in SPLIT_SIZES:
        images, captions = shapes_split(split)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": png_bytes(image), "path": None} for image in images], CAPTION_COLUMN: captions,
             OBJECTS_COLUMN: [objects_label(caption) for caption in captions]}, features=features)
    return splits


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def png_bytes(pixels: np.ndarray) -> bytes:
    """An image (H, W[, C]) uint8 as PNG bytes, as the built-in datasets store it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
