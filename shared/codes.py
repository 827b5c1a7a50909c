"""Codes datasets: integer code grids exported once by stage 1, read by stage 2 and by anyone else.

A codes folder is either a `datasets` folder written with `save_to_disk` (columns `codes` (h, w),
`label` when the source had labels, `source_index`) or, with `--format npy`, `codes.npy` (N, h, w)
+ `labels.npy`; both carry `codes.json` with everything needed to trust and reuse them.

    from shared.codes import open_codes
    codes, metadata = open_codes("runs/codes")      # memory-mapped, validated against codes.json
    grids, labels = codes[:16]                       # int16 (16, h, w) as stored, int64 (16,) (-1: no label)
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
CODES_FORMAT_VERSION = 1


def codes_dtype(vocab_size: int) -> str:
    """int16 when every code fits, else int32."""
    return "int16" if vocab_size <= 32767 else "int32"


@dataclasses.dataclass(frozen=True)
class CodesMetadata:
    """The contents of codes.json."""

    format_version: int
    format: str  # "arrow" or "npy"
    vocab_size: int
    latent_shape: tuple[int, int]
    dtype: str
    num_rows: int
    has_labels: bool
    label_names: list[str] | None
    tokenizer_config: dict[str, Any]
    tokenizer_sha256: str
    tokenizer_path: str  # where the tokenizer was at export time; trust it only if the hash still matches
    source: dict[str, Any]

    @property
    def num_classes(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["latent_shape"] = list(self.latent_shape)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str) -> "CodesMetadata":
        names = {field.name for field in dataclasses.fields(cls)}
        missing = sorted(names - set(values))
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}; re-export the codes with vqvae-export")
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; was it written by a newer vqprior?")
        if values["format_version"] != CODES_FORMAT_VERSION:
            raise UserError(f"{where} has format_version {values['format_version']}, this vqprior reads "
                            f"{CODES_FORMAT_VERSION}; re-export the codes")
        return cls(**{**values, "latent_shape": tuple(values["latent_shape"])})


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
    """A codes split: item i is (codes (h, w) in the stored int type, label int64, -1 if none).

    Codes stay memory-mapped in their stored type (int16 for vocabularies up to 32,767): a batch is
    gathered from the file when asked for, and widened only where the model embeds it.
    """

    def __init__(self, grids: CodeGrids, labels: torch.Tensor, metadata: CodesMetadata,
                 rows: np.ndarray | None = None) -> None:
        self.grids = grids
        self.labels = labels  # (N,) int64 for the selected rows
        self.metadata = metadata
        self.rows = rows  # which rows of `grids` this dataset holds (None: all)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        rows = indices if self.rows is None else self.rows[indices]
        codes = torch.from_numpy(np.ascontiguousarray(self.grids.gather(np.atleast_1d(rows))))
        labels = self.labels[torch.as_tensor(np.atleast_1d(indices))]
        return (codes[0], labels[0]) if np.ndim(indices) == 0 else (codes, labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self[np.asarray(indices, dtype=np.int64)]

    @property
    def codes(self) -> torch.Tensor:
        """Every selected grid, read into memory (for small datasets and tests)."""
        return self[np.arange(len(self))][0]

    def subset(self, indices: np.ndarray | torch.Tensor) -> "CodesDataset":
        indices = np.asarray(indices, dtype=np.int64)
        rows = indices if self.rows is None else self.rows[indices]
        return CodesDataset(self.grids, self.labels[torch.from_numpy(indices)], self.metadata, rows)


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


def find_tokenizer(metadata: CodesMetadata) -> Path | None:
    """The tokenizer folder recorded in codes.json, if it is still there with the same weights."""
    weights = Path(metadata.tokenizer_path) / WEIGHTS_NAME
    if weights.is_file() and file_sha256(weights) == metadata.tokenizer_sha256:
        return Path(metadata.tokenizer_path)
    return None


def check_tokenizer_matches(metadata: CodesMetadata, tokenizer_dir: str | Path, codes_path: Path) -> None:
    weights = Path(tokenizer_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{tokenizer_dir} is not a tokenizer folder: {WEIGHTS_NAME} is missing")
    digest = file_sha256(weights)
    if digest != metadata.tokenizer_sha256:
        raise UserError(f"the codes in {codes_path} were made by another tokenizer (sha256 "
                        f"{metadata.tokenizer_sha256[:12]}...), not {tokenizer_dir} ({digest[:12]}...); "
                        "pass the tokenizer that made them or re-export")


def _read_npy(path: Path, metadata: CodesMetadata) -> tuple[CodeGrids, torch.Tensor]:
    try:
        codes = np.load(path / "codes.npy", mmap_mode="r")
        labels = np.load(path / "labels.npy") if metadata.has_labels else np.full(len(codes), -1, dtype=np.int64)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the arrays in {path} ({error}); re-export the codes") from None
    return CodeGrids([codes]), torch.from_numpy(labels.astype(np.int64))


def _read_arrow(path: Path, metadata: CodesMetadata) -> tuple[CodeGrids, torch.Tensor]:
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several types for a broken folder
        raise UserError(f"cannot open the codes dataset {path} ({str(error).splitlines()[0]}); re-export it") from None
    if "codes" not in table.column_names:
        raise UserError(f"{path} has no 'codes' column; re-export it with vqvae-export")
    stored_dtype = getattr(table.features["codes"], "dtype", None)
    if stored_dtype != metadata.dtype:
        raise UserError(f"codes in {path}: stored as {stored_dtype}, {CODES_META_NAME} says {metadata.dtype}; "
                        "re-export them")
    grids = CodeGrids(_arrow_grid_views(table, "codes", tuple(table.features["codes"].shape), path))
    if metadata.has_labels:
        if "label" not in table.column_names:
            raise UserError(f"{CODES_META_NAME} in {path} says the codes have labels, but there is no 'label' column")
        labels = table.data.column("label").to_numpy().astype(np.int64)
    else:
        labels = np.full(len(grids), -1, dtype=np.int64)
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


def _check(path: Path, metadata: CodesMetadata, grids: CodeGrids, labels: torch.Tensor) -> None:
    where = f"codes in {path}"
    if len(grids) != metadata.num_rows:
        raise UserError(f"{where}: {CODES_META_NAME} says {metadata.num_rows} rows, the data has {len(grids)}; "
                        "the export is incomplete or altered: re-export it")
    if len(grids) and tuple(grids.shape[1:]) != tuple(metadata.latent_shape):
        raise UserError(f"{where}: grids are {tuple(grids.shape[1:])}, {CODES_META_NAME} says "
                        f"{tuple(metadata.latent_shape)}; re-export it")
    if len(grids) and str(grids.dtype) != metadata.dtype:
        raise UserError(f"{where}: dtype {grids.dtype}, {CODES_META_NAME} says {metadata.dtype}; re-export it")
    if len(grids):
        low, high = grids.value_range()
        if low < 0 or high >= metadata.vocab_size:
            raise UserError(f"{where}: values in [{low}, {high}] fall outside [0, {metadata.vocab_size}); "
                            "re-export them with the tokenizer that made them")
    if metadata.label_names and len(labels) and int(labels.max()) >= len(metadata.label_names):
        raise UserError(f"{where}: labels fall outside [0, {len(metadata.label_names)}); re-export them")
