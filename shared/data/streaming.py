"""Streamed training images (`--streaming`): a `datasets.IterableDataset`, read in order and never listed
or loaded whole, from the Hub, a local folder of parquet / arrow / JSON + image files (or an image folder),
a `save_to_disk` folder, the built-in sets, or WebDataset-style tar shards
(`--dataset 'shards/train-{000000..000099}.tar'`: each sample an image member, with optional `.cls`
label and `.txt` caption members).

The order: each process reads its part of the stream (`datasets.distributed.split_dataset_by_node`:
whole shards when their count divides the processes, else every world-th example), shuffled through a
buffer of `--shuffle-buffer` examples seeded by (seed, epoch) (`IterableDataset.shuffle`, `set_epoch`),
epoch after epoch. The main process cuts it into micro-batches; DataLoader workers only decode them, so
the batches are the same for any `--num-workers`.

Exact resume is a deterministic skip: a run resumed at micro-batch k re-reads (without decoding) the
first k * batch_size records of its stream and goes on from there, so it sees exactly the samples the
uninterrupted run saw. (`IterableDataset.state_dict()` is faster, but loses the shuffle buffer's
contents on resume, so it would not be exact.) The skip costs one read of what was already trained on.

An unreadable image is replaced by the next readable one of its micro-batch (the same on every run and
resume) and reported; `--strict-images` stops instead. A held-out fraction needs random access, so a
streamed run validates on the first `--validation-images` examples of a held-out split of the source or
of `--validation-dataset`.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from shared.config import option
from shared.data.config import DIGITS, HELD_OUT_SPLITS, HUB_NAME, DataConfig, is_shard_pattern
from shared.data.datasets import Batch, Example, ImageDataset
from shared.data.images import (Augmentation, ImageProblem, augment, augmentation_draws, channels_of, decode_image,
                                resize_and_centre_crop, to_8bit)
from shared.data.loaders import make_loader, raise_problem
from shared.data.shapes import SHAPES
from shared.data.sources import _digits_splits, _quiet_datasets, _shapes_splits, wrap_datasets
from shared.data.splits import make_dataset
from shared.errors import UserError, first_line

BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
LABEL_COLUMNS = ("label", "cls")  # the default label column: datasets' name, then WebDataset's member suffix
BUILT_IN_SHARDS = 8  # the built-in sets are cut into this many shards when streamed


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    """How training reads a streamed source."""

    streaming: bool = option(False, "read --dataset as a stream (datasets.IterableDataset): Hub, local parquet / "
                                    "arrow / JSON files, or tar shards; nothing is listed or loaded whole")
    shuffle_buffer: int = option(1000, "with --streaming: examples in the seeded shuffle buffer (0: stream order)")
    validation_dataset: str | None = option(None, "with --streaming: a separate held-out source (tar shards, a "
                                                  "folder, a Hub name) when --dataset has no held-out split")
    validation_images: int = option(1000, "with --streaming: held-out examples read into memory for validation")

    def check_streaming_flags(self, data: DataConfig) -> None:
        if not self.streaming:
            if is_shard_pattern(data.dataset):
                raise UserError(f"--dataset {data.dataset} names tar shards, which are read as a stream: add --streaming")
            if self.validation_dataset is not None:
                raise UserError("--validation-dataset applies with --streaming; drop it, or add --streaming")
            return
        if data.validation_fraction != DataConfig.__dataclass_fields__["validation_fraction"].default:
            raise UserError("--validation-fraction holds rows out at random, which a stream cannot: with --streaming, "
                            "validation reads the first --validation-images of the source's held-out split or of "
                            "--validation-dataset; drop --validation-fraction")
        if self.shuffle_buffer < 0 or self.validation_images < 1:
            raise UserError("--shuffle-buffer must be >= 0 and --validation-images >= 1")
        if data.cache_images == "always":
            raise UserError("--cache-images always needs the whole split in memory, which --streaming never reads; "
                            "drop one of them")


def expand_shards(pattern: str) -> list[str]:
    """The files of a shard pattern: brace ranges (`{000000..000099}`, zero padding as written) and
    comma lists (`{a,b}`) expanded, then globs; refused when nothing matches.

    Written here (a dozen lines) rather than depending on `braceexpand`, unmaintained since 2020."""
    patterns = [pattern]
    while any("{" in item for item in patterns):
        expanded = []
        for item in patterns:
            match = BRACE_RANGE.search(item) or re.search(r"\{([^{}]*,[^{}]*)\}", item)
            if match is None:
                raise UserError(f"cannot expand {pattern!r}: write ranges as {{000000..000099}} and lists as {{a,b}}")
            if match.re is BRACE_RANGE:
                low, high = match.group(1), match.group(2)
                values = [str(number).zfill(len(low)) for number in range(int(low), int(high) + 1)]
            else:
                values = match.group(1).split(",")
            expanded += [item[:match.start()] + value + item[match.end():] for value in values]
        patterns = expanded
    files = [found for item in patterns for found in (sorted(glob.glob(item)) if glob.has_magic(item) else [item])]
    missing = [item for item in files if not Path(item).is_file()]
    if not files or missing:
        raise UserError(f"the shard pattern {pattern!r} matches no file{f' ({missing[0]} is missing)' if missing else ''}; "
                        "check the path and the range")
    return files


def _open_iterable(dataset: str, config: DataConfig, split: str | None) -> tuple[Any, str]:
    """(the stream of `dataset`'s split `split` (None: the dict of every split), its description)."""
    import datasets

    _quiet_datasets()
    if dataset in (DIGITS, SHAPES):
        splits = _digits_splits() if dataset == DIGITS else _shapes_splits()
        streams = {name: table.to_iterable_dataset(num_shards=BUILT_IN_SHARDS) for name, table in splits.items()}
        return (streams if split is None else streams.get(split)), dataset
    try:
        if is_shard_pattern(dataset):
            stream = datasets.load_dataset("webdataset", data_files={"train": expand_shards(dataset)}, split="train",
                                           streaming=True)
            return ({"train": stream} if split is None else stream if split == "train" else None), dataset
        path = Path(dataset).expanduser()
        if path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
            tables = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            streams = {name: table.to_iterable_dataset(num_shards=min(BUILT_IN_SHARDS, max(1, len(table))))
                       for name, table in tables.items()}
        elif path.is_dir() or HUB_NAME.fullmatch(dataset):
            streams = dict(datasets.load_dataset(str(path) if path.is_dir() else dataset, config.dataset_config,
                                                 revision=config.revision, streaming=True))
        else:
            raise UserError(f"dataset folder {dataset} does not exist; pass a folder, tar shards or a Hub name")
    except UserError:
        raise
    except Exception as error:  # datasets raises many types for a missing or unreadable source
        raise UserError(f"cannot stream {dataset!r} ({first_line(error)}); pass tar shards, a folder of data files, "
                        "a save_to_disk folder or a Hub name") from None
    return (streams if split is None else streams.get(split)), dataset


class Stream:
    """A streamed source: the training split as records with undecoded images, and its held-out split."""

    def __init__(self, config: DataConfig, settings: StreamingConfig, held_out: bool = True) -> None:
        """`held_out`: find the held-out split validation reads (training), or not (export)."""
        self.config, self.settings = config, settings
        splits, self.description = _open_iterable(config.dataset, config, None)
        if config.split not in splits:
            raise UserError(f"{self.description} has no split {config.split!r} (splits: {', '.join(splits)}); fix --split")
        self.stream, self.image_column, self.label_column = _prepared(splits[config.split], config, self.description)
        if not held_out:
            return
        held_out_name = next((name for name in HELD_OUT_SPLITS if name in splits and name != config.split), None)
        if settings.validation_dataset is not None:  # its held-out split if it has one, else its train split
            self.held_out_description = settings.validation_dataset
            others = _open_iterable(settings.validation_dataset, config, None)[0]
            held_out = others.get(next((name for name in HELD_OUT_SPLITS if name in others), "train"))
        elif held_out_name is not None:
            self.held_out_description, held_out = f"{self.description} [{held_out_name}]", splits[held_out_name]
        else:
            raise UserError(f"{self.description} has no held-out split, and a held-out fraction needs random access, "
                            "which --streaming does not have: pass --validation-dataset (e.g. "
                            "'shards/val-{000000..000009}.tar' or a folder) or a source with a validation or test split")
        if held_out is None:
            raise UserError(f"{settings.validation_dataset} has neither a held-out nor a train split to validate on; "
                            "pass another --validation-dataset")
        self.held_out = _prepared(held_out, config, self.held_out_description)

    def first_channels(self, channels: int | None, fix: str | None = None) -> int:
        """`channels`, checked against the first image (`fix`: the advice when it differs), or the first image's own."""
        record = next(iter(self.stream), None)
        if record is None:
            raise UserError(f"{self.description} [{self.config.split}] is empty; point --dataset at a source with images")
        found = channels_of(decode_image(record[self.image_column], f"the first image of {self.description}"))
        if channels is not None and found != channels:
            raise UserError(f"the first image of {self.description} has {found} channel(s), expected {channels}; "
                            f"{fix or f'pass --channels {found}'}")
        return channels or found

    def validation_set(self, channels: int) -> ImageDataset:
        """The first --validation-images held-out examples, in memory (validation needs the same rows every time)."""
        import datasets

        stream, image_column, label_column = self.held_out
        records = [{name: record[name] for name in (image_column, label_column) if name}
                   for record in itertools.islice(iter(stream), self.settings.validation_images)]
        if not records:
            raise UserError(f"{self.held_out_description} is empty; pass another --validation-dataset")
        features = datasets.Features({image_column: datasets.Image(decode=False),
                                      **({label_column: datasets.Value("int64")} if label_column else {})})
        table = datasets.Dataset.from_list(records, features=features)
        description = f"{self.held_out_description}, first {len(records)}"
        source = wrap_datasets(description, {"validation": table}, image_column, label_column or "none", "none")
        return make_dataset(source, "validation", source.rows("validation"), self.config, channels)

    @property
    def label_names(self) -> list[str] | None:
        import datasets

        feature = (self.stream.features or {}).get(self.label_column) if self.label_column else None
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def chunks(self, chunk_rows: int) -> Iterator[tuple[range, list[dict[str, Any]]]]:
        """The split in source order, `chunk_rows` records at a time, with their row numbers."""
        records, start = iter(self.stream), 0
        while chunk := list(itertools.islice(records, chunk_rows)):
            yield range(start, start + len(chunk)), chunk
            start += len(chunk)

    def decoded_batches(self, channels: int, rows: range, records: list[dict[str, Any]], batch_size: int,
                        num_workers: int) -> Iterator[Batch]:
        """`records` (rows `rows` of the split) decoded in order, in batches of `batch_size`, no augmentation."""
        keys = [[(rows.start + index, 0, records[index]) for index in range(first, min(first + batch_size, len(records)))]
                for first in range(0, len(records), batch_size)]
        loader = make_loader(StreamDecoder(self, channels, Augmentation()), keys, min(num_workers, len(keys)), False,
                         persistent=False)
        return (raise_problem(item) for item in loader)

    def records(self, seed: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        """This process's endless stream of records: epoch after epoch of its shuffled part."""
        from datasets.distributed import split_dataset_by_node

        buffer = self.settings.shuffle_buffer
        shuffled = self.stream.shuffle(seed=seed, buffer_size=buffer) if buffer > 0 else self.stream
        mine = split_dataset_by_node(shuffled, rank=rank, world_size=world_size)
        for epoch in itertools.count():
            mine.set_epoch(epoch)
            count = 0
            for record in mine:
                count += 1
                yield record
            if count == 0:
                raise UserError(f"process {rank} of {world_size} got no example of {self.description}; "
                                "use fewer processes or a larger dataset")

    def training_batches(self, channels: int, augmentation: Augmentation, batch_size: int, rank: int, world_size: int,
                         first_micro_batch: int, num_workers: int, pin_memory: bool) -> Iterator[Batch]:
        """Micro-batches first_micro_batch, first_micro_batch + 1, ... of this process, endlessly: example j of
        its stream is example j % batch_size of micro-batch j // batch_size, on every run and resume."""
        records = self.records(augmentation.seed, rank, world_size)
        skipped = first_micro_batch * batch_size
        records = itertools.islice(records, skipped, None)  # the deterministic skip of a resumed run

        def keys() -> Iterator[list[tuple[int, int, dict]]]:
            for micro_batch in itertools.count(first_micro_batch):
                start = micro_batch * batch_size
                yield [(start + offset, micro_batch, record)
                       for offset, record in enumerate(itertools.islice(records, batch_size))]

        decoder = StreamDecoder(self, channels, augmentation)
        loader = make_loader(decoder, keys(), num_workers, pin_memory, persistent=True)
        return (raise_problem(item) for item in loader)


class StreamDecoder(torch.utils.data.Dataset):
    """What DataLoader workers call: a micro-batch of (position, micro_batch, record) -> its Examples."""

    def __init__(self, stream: Stream, channels: int, augmentation: Augmentation) -> None:
        config = stream.config
        self.description, self.channels, self.augmentation = stream.description, channels, augmentation
        self.image_column, self.label_column = stream.image_column, stream.label_column
        self.image_size, self.strict = config.image_size, config.strict_images
        self.base_size = config.base_size if augmentation.crop else config.image_size

    def read(self, position: int, record: dict) -> Any:
        where = f"example {position} of {self.description}" + (f" ({record['__url__']}: {record['__key__']})"
                                                                  if "__key__" in record else "")
        image = decode_image(record[self.image_column], where)
        return resize_and_centre_crop(to_8bit(image, self.channels, where), self.base_size)

    def __getitems__(self, keys: list[tuple[int, int, dict]]) -> list[Example | ImageProblem]:
        bases, problems = [], []
        for position, _, record in keys:
            try:
                bases.append(self.read(position, record))
            except ImageProblem as problem:
                if self.strict:
                    return [problem]
                bases.append(None)
                problems.append(str(problem))
        if not any(base is not None for base in bases):
            return [ImageProblem(f"micro-batch {keys[0][1]} of {self.description}", "no image of it is readable")]
        examples = []
        for slot, (position, micro_batch, record) in enumerate(keys):
            used = next(index % len(keys) for index in range(slot, slot + len(keys)) if bases[index % len(keys)] is not None)
            draws = augmentation_draws(self.augmentation.seed, micro_batch, position, self.base_size, self.image_size,
                                       self.augmentation.flip, self.augmentation.crop)
            pixels = augment(torch.from_numpy(bases[used]), draws, self.image_size).contiguous()
            label = keys[used][2].get(self.label_column) if self.label_column else None
            examples.append(Example(pixels, -1 if label is None else int(label), position,
                                    problems.pop(0) if used != slot and problems else None))
        return examples


def _prepared(stream: Any, config: DataConfig, description: str) -> tuple[Any, str, str | None]:
    """(the stream with its image column undecoded and nothing else but its labels (and WebDataset's member
    names, for messages), its image column, its label column or None)."""
    import datasets

    features = stream.features
    if features is None:  # JSON files and some Hub sets say nothing before the first record
        first = next(iter(stream), None)
        if first is None:
            raise UserError(f"{description} is empty; point --dataset at a source with images")
        features = datasets.Features({key: _feature_of(value) for key, value in first.items()})
    image_column = config.image_column or next(
        (name for name, feature in features.items() if isinstance(feature, datasets.Image)), None)
    if image_column not in features:
        raise UserError(f"{description} has no image column{f' {image_column!r}' if image_column else ''} (columns: "
                        f"{', '.join(features)}); pass --image-column")
    label_column = None
    if config.label_column is not None and not config.labels_off:
        if config.label_column not in features:
            raise UserError(f"{description} has no column {config.label_column!r} (columns: {', '.join(features)}); "
                            "fix --label-column, or pass --label-column none")
        label_column = config.label_column
    elif not config.labels_off:
        label_column = next((name for name in LABEL_COLUMNS if name in features), None)
    kept = [name for name in (image_column, label_column, "__key__", "__url__") if name and name in features]
    return stream.select_columns(kept).cast_column(image_column, datasets.Image(decode=False)), image_column, label_column


def _feature_of(value: Any) -> Any:
    import datasets

    if isinstance(value, dict) and "bytes" in value:
        return datasets.Image(decode=False)
    return datasets.Value("string") if isinstance(value, str) else datasets.Value("int64")
