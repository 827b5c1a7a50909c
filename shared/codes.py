"""Codes datasets: integer code grids exported once by stage 1, read by stage 2 and by anyone else.

A codes folder is either a `datasets` folder written with `save_to_disk` or, with `--format npy`,
one `.npy` array per column + `labels.npy`; both carry `codes.json` with everything needed to trust
and reuse them. Columns: `codes` (h, w) for a one-level tokenizer (h, w, D with a stack of D codes
per position: residual quantizers, colour pixels), or one column per level of a hierarchical one
(`codes_top`, `codes_bottom`); `label` when the source has labels; `caption` when it has captions
(`captions.json` beside the npy arrays); `source_index`.

`codes.json`: format 1 (a single level of one code per position, as the first release wrote it)
has `vocab_size`, `latent_shape` and `dtype` at the top; format 2 describes each level in `levels`
(name, column, vocab_size, latent_shape, depth, dtype) and names the tokenizer's class.

    from shared.codes import open_codes
    codes, metadata = open_codes("runs/codes")      # memory-mapped, validated against codes.json
    grids, labels = codes[:16]                       # int16 (16, h, w) as stored, int64 (16,) (-1: no label)
    top = codes.level_view("bottom", condition_level="top")   # items: (bottom, label, top)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.codes_format import (CAPTION_COLUMN, CAPTIONS_NAME, CODES_FORMAT_VERSION, CODES_META_NAME, FORMAT1_TOKENIZER_CLASS,
                                 SINGLE_LEVEL, CodesMetadata, LevelInfo, codes_dtype, default_scales, level_column,
                                 scale_level_name)
from shared.config import read_json
from shared.errors import UserError
from shared.files import WEIGHTS_NAME, file_sha256

__all__ = ["CAPTIONS_NAME", "CODES_FORMAT_VERSION", "CODES_META_NAME", "FORMAT1_TOKENIZER_CLASS", "SINGLE_LEVEL",
           "CodeGrids", "CodesDataset", "CodesMetadata", "LevelInfo", "check_tokenizer_matches", "codes_dtype",
           "default_scales", "level_column", "open_codes", "read_codes_metadata", "scale_level_name"]


class CodeGrids:
    """One integer column of a codes folder, memory-mapped in its stored type: rows are gathered
    batch by batch from the files' pages, so RAM never holds the column (nor widens it to int64)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts  # each (n_i, h, w[, D]), a read-only view of the file
        self.starts = np.cumsum([0] + [len(part) for part in parts])  # (num_parts + 1,)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:]) if self.parts else (0,)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows (B,) -> codes (B, h, w[, D]) in the stored dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.parts) == 1:
            return self.parts[0][rows]
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.parts[0].shape[1:]), dtype=self.dtype)
        for part in np.unique(part_of):
            chosen = part_of == part
            out[chosen] = self.parts[part][rows[chosen] - self.starts[part]]
        return out

    def value_range(self) -> tuple[int, int]:
        """(min, max) over every code, read part by part (pages come and go; nothing is copied)."""
        lows, highs = zip(*((int(part.min()), int(part.max())) for part in self.parts if part.size))
        return min(lows), max(highs)


class CodesDataset(torch.utils.data.Dataset):
    """A codes split: item i is (codes in the stored int type, label int64, -1 if none), and with a
    condition level also the condition codes. The codes are those of `level` (the only level by
    default; every level as a dict when there are several and none is chosen).

    Codes stay memory-mapped in their stored type (int16 for vocabularies up to 32,767): a batch is
    gathered from the file when asked for, and widened only where the model embeds it.
    """

    def __init__(self, grids: dict[str, CodeGrids], labels: torch.Tensor, metadata: CodesMetadata,
                 rows: np.ndarray | None = None, level: str | None = None, condition_level: str | None = None,
                 joined: bool = False, captions: np.ndarray | None = None, text: torch.Tensor | None = None) -> None:
        self.grids = grids  # level name -> its column
        self.labels = labels  # (N,) int64 for the selected rows
        self.metadata = metadata
        self.rows = rows  # which rows of the columns this dataset holds (None: all)
        self.level = level if level is not None or len(grids) > 1 or joined else next(iter(grids))
        self.condition_level = condition_level
        self.joined = joined  # items hold every level flattened and joined in order (a pyramid's scales)
        self.captions = captions  # (N,) object: the selected rows' captions (None where a row has none), or None
        self.text = text  # (N, L) int64 token ids of the captions (`with_text`): the items' last element, or None

    def __len__(self) -> int:
        return len(self.labels)

    def _gather(self, name: str, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.grids[name].gather(rows)))

    def __getitem__(self, index: Any) -> tuple:
        indices = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        rows = np.atleast_1d(indices if self.rows is None else self.rows[indices])
        if self.joined:  # (B, N): every level's grid in raster order, in the export's order
            codes = torch.cat([self._gather(name, rows).reshape(len(rows), -1) for name in self.metadata.level_names], 1)
        elif self.level is not None:
            codes = self._gather(self.level, rows)
        else:
            codes = {name: self._gather(name, rows) for name in self.grids}
        labels = self.labels[torch.as_tensor(np.atleast_1d(indices))]
        item = (codes, labels)
        if self.condition_level is not None:
            item = (codes, labels, self._gather(self.condition_level, rows))
        if self.text is not None:
            item = (*item, self.text[torch.as_tensor(np.atleast_1d(indices))])
        if np.ndim(indices) == 0:
            return tuple(value[0] if isinstance(value, torch.Tensor) else {k: v[0] for k, v in value.items()}
                         for value in item)
        return item

    def __getitems__(self, indices: list[int]) -> tuple:
        return self[np.asarray(indices, dtype=np.int64)]

    def parts(self, item: tuple) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """An item or batch of this dataset as (codes, labels, condition codes or None, text ids or None)."""
        codes, labels, *rest = item
        condition = rest.pop(0) if self.condition_level is not None else None
        return codes, labels, condition, rest.pop(0) if self.text is not None else None

    def with_text(self, text: torch.Tensor) -> "CodesDataset":
        """The same rows with each row's caption as token ids (N, L) int64, the items' last element."""
        if len(text) != len(self):
            raise ValueError(f"{len(text)} token rows for {len(self)} rows")
        return self.replace(text=text)

    def replace(self, **changes: Any) -> "CodesDataset":
        fields = dict(grids=self.grids, labels=self.labels, metadata=self.metadata, rows=self.rows, level=self.level,
                      condition_level=self.condition_level, joined=self.joined, captions=self.captions,
                      text=self.text)
        return CodesDataset(**{**fields, **changes})

    @property
    def codes(self) -> torch.Tensor:
        """Every selected grid of the chosen level, read into memory (for small datasets and tests)."""
        return self[np.arange(len(self))][0]

    def subset(self, indices: np.ndarray | torch.Tensor) -> "CodesDataset":
        indices = np.asarray(indices, dtype=np.int64)
        rows = indices if self.rows is None else self.rows[indices]
        return self.replace(labels=self.labels[torch.from_numpy(indices)], rows=rows,
                            captions=None if self.captions is None else self.captions[indices],
                            text=None if self.text is None else self.text[torch.from_numpy(indices)])

    def level_view(self, level: str | None, condition_level: str | None = None) -> "CodesDataset":
        """The same rows with items of `level` (and the codes of `condition_level` as a third element)."""
        info = self.metadata.level(level)
        if condition_level is not None:
            self.metadata.level(condition_level)
        return self.replace(level=info.name, condition_level=condition_level, joined=False)

    def pyramid_view(self) -> "CodesDataset":
        """The same rows with items of a multi-scale pyramid's every scale, flattened and joined coarse to fine:
        codes (N,) per row, as a VAR prior reads them."""
        if self.metadata.scales is None:
            raise UserError(f"these codes are {'one grid' if len(self.metadata.levels) == 1 else 'levels'} "
                            f"{', '.join(self.metadata.level_names)}, not a multi-scale pyramid: a pyramid arch (var) "
                            "needs codes of a --quantizer multiscale tokenizer; pick a raster --arch for these")
        return self.replace(level=None, condition_level=None, joined=True)


def read_codes_metadata(path: str | Path) -> CodesMetadata:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"codes folder {path} does not exist; export one with vqvae-export")
    meta_path = path / CODES_META_NAME
    if not meta_path.is_file():
        raise UserError(f"{path} is not a codes dataset: {CODES_META_NAME} is missing; export one with vqvae-export")
    return CodesMetadata.from_json(read_json(meta_path), str(meta_path))


def open_codes(path: str | Path, tokenizer_dir: str | Path | None = None) -> tuple[CodesDataset, CodesMetadata]:
    """Open a codes folder memory-mapped, check its data against codes.json (row count, shape, dtype,
    range) and, when `tokenizer_dir` is given, that it was made by that tokenizer. Returns (dataset, metadata)."""
    path = Path(path)
    metadata = read_codes_metadata(path)
    if metadata.format == "npy":
        grids, labels = _read_npy(path, metadata)
    else:
        grids, labels = _read_arrow(path, metadata)
    _check(path, metadata, grids, labels)
    if tokenizer_dir is not None:
        check_tokenizer_matches(metadata, tokenizer_dir, path)
    return CodesDataset(grids, labels, metadata, captions=_read_captions(path, metadata)), metadata


def _read_captions(path: Path, metadata: CodesMetadata) -> np.ndarray | None:
    """(N,) object: each row's caption or None, from the arrow column or the npy export's captions.json."""
    if not metadata.has_captions:
        return None
    try:
        if metadata.format == "npy":
            values = json.loads((path / CAPTIONS_NAME).read_text(encoding="utf-8"))
        else:
            import datasets

            values = datasets.load_from_disk(str(path))[CAPTION_COLUMN]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{CODES_META_NAME} in {path} says the codes have captions, but they cannot be read "
                        f"({error}); re-export them") from None
    if len(values) != metadata.num_rows:
        raise UserError(f"{path}: {len(values)} captions for {metadata.num_rows} rows; re-export the codes")
    return np.array([value if isinstance(value, str) and value else None for value in values] + [None])[:-1]


def check_tokenizer_matches(metadata: CodesMetadata, tokenizer_dir: str | Path, codes_path: Path) -> None:
    weights = Path(tokenizer_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{tokenizer_dir} is not a tokenizer folder: {WEIGHTS_NAME} is missing")
    digest = file_sha256(weights)
    if digest != metadata.tokenizer_sha256:
        raise UserError(f"the codes in {codes_path} were made by another tokenizer (sha256 "
                        f"{metadata.tokenizer_sha256[:12]}...), not {tokenizer_dir} ({digest[:12]}...); "
                        "pass the tokenizer that made them or re-export")


def _read_npy(path: Path, metadata: CodesMetadata) -> tuple[dict[str, CodeGrids], torch.Tensor]:
    grids = {}
    try:
        for level in metadata.levels:
            grids[level.name] = CodeGrids([np.load(path / f"{level.column}.npy", mmap_mode="r")])
        num_rows = len(next(iter(grids.values())))
        labels = (np.load(path / "labels.npy") if metadata.has_labels else np.full(num_rows, -1, dtype=np.int64))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the arrays in {path} ({error}); re-export the codes") from None
    return grids, torch.from_numpy(labels.astype(np.int64))


def _read_arrow(path: Path, metadata: CodesMetadata) -> tuple[dict[str, CodeGrids], torch.Tensor]:
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several types for a broken folder
        raise UserError(f"cannot open the codes dataset {path} ({str(error).splitlines()[0]}); re-export it") from None
    grids = {}
    for level in metadata.levels:
        if level.column not in table.column_names:
            raise UserError(f"{path} has no {level.column!r} column; re-export it with vqvae-export")
        stored_dtype = getattr(table.features[level.column], "dtype", None)
        if stored_dtype != level.dtype:
            raise UserError(f"codes in {path}: column {level.column} stored as {stored_dtype}, {CODES_META_NAME} says "
                            f"{level.dtype}; re-export them")
        shape = tuple(table.features[level.column].shape)
        grids[level.name] = CodeGrids(_arrow_grid_views(table, level.column, shape, path))
    if metadata.has_labels:
        if "label" not in table.column_names:
            raise UserError(f"{CODES_META_NAME} in {path} says the codes have labels, but there is no 'label' column")
        labels = table.data.column("label").to_numpy().astype(np.int64)
    else:
        labels = np.full(len(table), -1, dtype=np.int64)
    return grids, torch.from_numpy(labels)


def _arrow_grid_views(table: Any, column: str, grid_shape: tuple[int, ...], path: Path) -> list[np.ndarray]:
    """Zero-copy numpy views (n_i, *grid_shape) of an Array2D/Array3D column, one per Arrow chunk.
    The nested lists of a fixed-shape array column flatten to one contiguous buffer per chunk."""
    views = []
    per_row = int(np.prod(grid_shape))
    for chunk in table.data.column(column).chunks:
        values = chunk.storage if hasattr(chunk, "storage") else chunk
        for _ in grid_shape:
            values = values.flatten()
        flat = values.to_numpy(zero_copy_only=True)
        if flat.size != len(chunk) * per_row:
            raise UserError(f"codes in {path}: a row of column {column!r} is not {grid_shape}; re-export them")
        views.append(flat.reshape(len(chunk), *grid_shape))
    return views


def _check(path: Path, metadata: CodesMetadata, grids: dict[str, CodeGrids], labels: torch.Tensor) -> None:
    where = f"codes in {path}"
    for level in metadata.levels:
        column = grids[level.name]
        if len(column) != metadata.num_rows:
            raise UserError(f"{where}: {CODES_META_NAME} says {metadata.num_rows} rows, the data has {len(column)}; "
                            "the export is incomplete or altered: re-export it")
        if len(column) and tuple(column.shape[1:]) != level.grid_shape:
            raise UserError(f"{where}: grids are {tuple(column.shape[1:])}, {CODES_META_NAME} says "
                            f"{level.grid_shape}; re-export it")
        if len(column) and str(column.dtype) != level.dtype:
            raise UserError(f"{where}: dtype {column.dtype}, {CODES_META_NAME} says {level.dtype}; re-export it")
        if len(column):
            low, high = column.value_range()
            if low < 0 or high >= level.vocab_size:
                raise UserError(f"{where}: values in [{low}, {high}] fall outside [0, {level.vocab_size}); "
                                "re-export them with the tokenizer that made them")
    if metadata.label_names and len(labels) and int(labels.max()) >= len(metadata.label_names):
        raise UserError(f"{where}: labels fall outside [0, {len(metadata.label_names)}); re-export them")
