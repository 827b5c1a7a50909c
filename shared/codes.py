"""Codes datasets: integer code grids exported once by stage 1, read by stage 2 and by anyone else.

A codes folder is either a `datasets` folder written with `save_to_disk` or, with `--format npy`,
one `.npy` array per column + `labels.npy`; both carry `codes.json` with everything needed to trust
and reuse them. Columns: `codes` (h, w) for a one-level tokenizer (h, w, D with a stack of D codes
per position: residual quantizers, colour pixels), or one column per level of a hierarchical one
(`codes_top`, `codes_bottom`); `label` when the source has labels; `source_index`.

`codes.json`: format 1 (a single level of one code per position, as the first release wrote it)
has `vocab_size`, `latent_shape` and `dtype` at the top; format 2 describes each level in `levels`
(name, column, vocab_size, latent_shape, depth, dtype) and names the tokenizer's class.

    from shared.codes import open_codes
    codes, metadata = open_codes("runs/codes")      # memory-mapped, validated against codes.json
    grids, labels = codes[:16]                       # int16 (16, h, w) as stored, int64 (16,) (-1: no label)
    top = codes.level_view("bottom", condition_level="top")   # items: (bottom, label, top)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import read_json
from shared.errors import UserError
from shared.pretrained import WEIGHTS_NAME, file_sha256

CODES_META_NAME = "codes.json"
CODES_FORMAT_VERSION = 2
SINGLE_LEVEL = "codes"
FORMAT1_TOKENIZER_CLASS = "VQVAE"


def codes_dtype(vocab_size: int) -> str:
    """int16 when every code fits, else int32."""
    return "int16" if vocab_size <= 32767 else "int32"


def default_scales(side: int) -> tuple[int, ...]:
    """A multi-scale pyramid's default sides for a latent side: 1, then about 1/4, 3/8, 1/2 and 3/4 of it, then
    the side itself (8: 1 2 3 4 6 8, the scales of VAR's 8x8 example)."""
    return tuple(sorted({1, *(max(1, round(side * share)) for share in (1 / 4, 3 / 8, 1 / 2, 3 / 4)), side}))


def scale_level_name(side: int) -> str:
    """The level of one scale of a multi-scale export (VAR's token pyramid): "scale_<side>"."""
    return f"scale_{side}"


def level_column(name: str) -> str:
    """The column of a level in a codes export: "codes" for the single level, "codes_<name>" for the others."""
    return SINGLE_LEVEL if name == SINGLE_LEVEL else f"{SINGLE_LEVEL}_{name}"


@dataclasses.dataclass(frozen=True)
class LevelInfo:
    """One grid of codes per row: its column and what it holds."""

    name: str  # "codes", or "top" / "bottom"
    column: str  # "codes", or "codes_top" / "codes_bottom"
    vocab_size: int
    latent_shape: tuple[int, int]
    depth: int  # codes per position
    dtype: str

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Shape of one row's codes: (h, w), or (h, w, depth)."""
        return tuple(self.latent_shape) if self.depth == 1 else (*self.latent_shape, self.depth)


@dataclasses.dataclass(frozen=True)
class CodesMetadata:
    """The contents of codes.json."""

    format_version: int  # 1: the first release's (one level of one code per position); 2: levels described
    format: str  # "arrow" or "npy"
    levels: tuple[LevelInfo, ...]  # in generation order (top before bottom)
    num_rows: int
    has_labels: bool
    label_names: list[str] | None
    tokenizer_class: str  # the class name of the tokenizer (stage1_vqvae.tokenizer.Tokenizer.registry)
    tokenizer_config: dict[str, Any]
    tokenizer_sha256: str
    tokenizer_path: str  # where the tokenizer was at export time; trust it only if the hash still matches
    source: dict[str, Any]
    scales: tuple[int, ...] | None = None  # a multi-scale pyramid: the side of each level's grid, coarse to fine

    def __post_init__(self) -> None:
        if self.scales is not None and [scale_level_name(side) for side in self.scales] != self.level_names:
            raise UserError(f"codes.json names the scales {list(self.scales)} but has the levels "
                            f"{', '.join(self.level_names)}; re-export the codes")

    @property
    def num_classes(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def level(self, name: str | None = None) -> LevelInfo:
        """The level called `name`, or the only one."""
        if name is None:
            if len(self.levels) > 1:
                raise UserError(f"these codes have levels {', '.join(self.level_names)}: pick one with --level")
            return self.levels[0]
        for level in self.levels:
            if level.name == name:
                return level
        raise UserError(f"these codes have no level {name!r} (levels: {', '.join(self.level_names)}); fix --level "
                        "or --condition-level, or export a tokenizer with that level")

    @property
    def level_names(self) -> list[str]:
        return [level.name for level in self.levels]

    # the single level's facts, as format 1 offered them
    @property
    def vocab_size(self) -> int:
        return self.level().vocab_size

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.level().latent_shape

    @property
    def dtype(self) -> str:
        return self.level().dtype

    @property
    def fits_first_format(self) -> bool:
        """A single level of one code per position: what format 1 can describe."""
        return len(self.levels) == 1 and self.levels[0].depth == 1 and self.levels[0].name == SINGLE_LEVEL

    def to_json(self) -> dict[str, Any]:
        common = {"num_rows": self.num_rows, "has_labels": self.has_labels, "label_names": self.label_names,
                  "tokenizer_config": self.tokenizer_config, "tokenizer_sha256": self.tokenizer_sha256,
                  "tokenizer_path": self.tokenizer_path, "source": self.source}
        if self.format_version == 1:
            level = self.levels[0]
            return {"format_version": 1, "format": self.format, "vocab_size": level.vocab_size,
                    "latent_shape": list(level.latent_shape), "dtype": level.dtype, **common}
        levels = [{**dataclasses.asdict(level), "latent_shape": list(level.latent_shape)} for level in self.levels]
        scales = {} if self.scales is None else {"scales": list(self.scales)}
        return {"format_version": 2, "format": self.format, "levels": levels, "tokenizer_class": self.tokenizer_class,
                **scales, **common}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str) -> "CodesMetadata":
        version = values.get("format_version")
        if version == 1:
            expected = {"format_version", "format", "vocab_size", "latent_shape", "dtype", "num_rows", "has_labels",
                        "label_names", "tokenizer_config", "tokenizer_sha256", "tokenizer_path", "source"}
        elif version == 2:
            expected = {"format_version", "format", "levels", "tokenizer_class", "num_rows", "has_labels",
                        "label_names", "tokenizer_config", "tokenizer_sha256", "tokenizer_path", "source"}
        else:
            raise UserError(f"{where} has format_version {version}, this vqprior reads 1 and 2; re-export the codes")
        missing = sorted(expected - set(values))
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}; re-export the codes with vqvae-export")
        optional = {"scales"} if version == 2 else set()
        unknown = sorted(set(values) - expected - optional)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; was it written by a newer vqprior?")
        common = {key: values[key] for key in ("format", "num_rows", "has_labels", "label_names", "tokenizer_config",
                                               "tokenizer_sha256", "tokenizer_path", "source")}
        if version == 1:
            level = LevelInfo(SINGLE_LEVEL, SINGLE_LEVEL, values["vocab_size"], tuple(values["latent_shape"]), 1,
                              values["dtype"])
            # format 1 was written for the VQ-VAE tokenizer alone, and so does not name its class
            return cls(format_version=1, levels=(level,), tokenizer_class=FORMAT1_TOKENIZER_CLASS, **common)
        try:
            levels = tuple(LevelInfo(**{**level, "latent_shape": tuple(level["latent_shape"])})
                           for level in values["levels"])
        except TypeError as error:
            raise UserError(f"{where}: a level is malformed ({error}); re-export the codes") from None
        scales = tuple(values["scales"]) if values.get("scales") is not None else None
        return cls(format_version=2, levels=levels, tokenizer_class=values["tokenizer_class"], scales=scales, **common)


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
                 joined: bool = False) -> None:
        self.grids = grids  # level name -> its column
        self.labels = labels  # (N,) int64 for the selected rows
        self.metadata = metadata
        self.rows = rows  # which rows of the columns this dataset holds (None: all)
        self.level = level if level is not None or len(grids) > 1 or joined else next(iter(grids))
        self.condition_level = condition_level
        self.joined = joined  # items hold every level flattened and joined in order (a pyramid's scales)

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
        if np.ndim(indices) == 0:
            return tuple(value[0] if isinstance(value, torch.Tensor) else {k: v[0] for k, v in value.items()}
                         for value in item)
        return item

    def __getitems__(self, indices: list[int]) -> tuple:
        return self[np.asarray(indices, dtype=np.int64)]

    @property
    def codes(self) -> torch.Tensor:
        """Every selected grid of the chosen level, read into memory (for small datasets and tests)."""
        return self[np.arange(len(self))][0]

    def subset(self, indices: np.ndarray | torch.Tensor) -> "CodesDataset":
        indices = np.asarray(indices, dtype=np.int64)
        rows = indices if self.rows is None else self.rows[indices]
        return CodesDataset(self.grids, self.labels[torch.from_numpy(indices)], self.metadata, rows, self.level,
                            self.condition_level, self.joined)

    def level_view(self, level: str | None, condition_level: str | None = None) -> "CodesDataset":
        """The same rows with items of `level` (and the codes of `condition_level` as a third element)."""
        info = self.metadata.level(level)
        if condition_level is not None:
            self.metadata.level(condition_level)
        return CodesDataset(self.grids, self.labels, self.metadata, self.rows, info.name, condition_level)

    def pyramid_view(self) -> "CodesDataset":
        """The same rows with items of a multi-scale pyramid's every scale, flattened and joined coarse to fine:
        codes (N,) per row, as a VAR prior reads them."""
        if self.metadata.scales is None:
            raise UserError(f"these codes are {'one grid' if len(self.metadata.levels) == 1 else 'levels'} "
                            f"{', '.join(self.metadata.level_names)}, not a multi-scale pyramid: a pyramid arch (var) "
                            "needs codes of a --quantizer multiscale tokenizer; pick a raster --arch for these")
        return CodesDataset(self.grids, self.labels, self.metadata, self.rows, None, None, joined=True)


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
    return CodesDataset(grids, labels, metadata), metadata


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
