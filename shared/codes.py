"""Codes datasets: integer code grids exported once by stage 1, read by stage 2 and by anyone else.

A codes folder is either a `datasets` folder written with `save_to_disk` (columns `codes` (h, w),
`label` when the source had labels, `source_index`) or, with `--format npy`, `codes.npy` (N, h, w)
+ `labels.npy`; both carry `codes.json` with everything needed to trust and reuse them.

    from shared.codes import open_codes
    codes, metadata = open_codes("runs/codes")      # validated against codes.json
    grids, labels = codes[:16]                       # int64 (16, h, w), int64 (16,) (-1: no label)
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


class CodesDataset(torch.utils.data.Dataset):
    """Code grids in memory (small: 2 bytes a code): item i is (codes int64 (h, w), label int64, -1 if none)."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor, metadata: CodesMetadata) -> None:
        self.codes = codes  # (N, h, w) int16 or int32
        self.labels = labels  # (N,) int64
        self.metadata = metadata

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[index].long(), self.labels[index]

    def subset(self, indices: torch.Tensor) -> "CodesDataset":
        return CodesDataset(self.codes[indices], self.labels[indices], self.metadata)


def read_codes_metadata(path: str | Path) -> CodesMetadata:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"codes folder {path} does not exist; export one with vqvae-export")
    meta_path = path / CODES_META_NAME
    if not meta_path.is_file():
        raise UserError(f"{path} is not a codes dataset: {CODES_META_NAME} is missing; export one with vqvae-export")
    return CodesMetadata.from_json(read_json(meta_path), str(meta_path))


def open_codes(path: str | Path, tokenizer_dir: str | Path | None = None) -> tuple[CodesDataset, CodesMetadata]:
    """Open a codes folder, check its data against codes.json (row count, shape, dtype, range) and,
    when `tokenizer_dir` is given, that it was made by that tokenizer. Returns (dataset, metadata)."""
    path = Path(path)
    metadata = read_codes_metadata(path)
    if metadata.format == "npy":
        codes, labels = _read_npy(path, metadata)
    else:
        codes, labels = _read_arrow(path, metadata)
    _check(path, metadata, codes, labels)
    codes = codes.to(getattr(torch, metadata.dtype))
    if tokenizer_dir is not None:
        check_tokenizer_matches(metadata, tokenizer_dir, path)
    return CodesDataset(codes, labels, metadata), metadata


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


def _read_npy(path: Path, metadata: CodesMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        codes = np.load(path / "codes.npy")
        labels = np.load(path / "labels.npy") if metadata.has_labels else np.full(len(codes), -1, dtype=np.int64)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the arrays in {path} ({error}); re-export the codes") from None
    return torch.from_numpy(codes), torch.from_numpy(labels.astype(np.int64))


def _read_arrow(path: Path, metadata: CodesMetadata) -> tuple[torch.Tensor, torch.Tensor]:
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
    with_format = table.with_format("numpy")  # numpy format widens to int64; narrowed back after the checks
    codes = _stack_column(with_format, "codes")
    if metadata.has_labels:
        if "label" not in table.column_names:
            raise UserError(f"{CODES_META_NAME} in {path} says the codes have labels, but there is no 'label' column")
        labels = _stack_column(with_format, "label").astype(np.int64)
    else:
        labels = np.full(len(codes), -1, dtype=np.int64)
    return torch.from_numpy(codes), torch.from_numpy(labels)


def _stack_column(table: Any, column: str) -> np.ndarray:
    parts = [np.asarray(batch[column]) for batch in table.iter(batch_size=65536)]
    return np.concatenate(parts) if parts else np.empty(0)


def _check(path: Path, metadata: CodesMetadata, codes: torch.Tensor, labels: torch.Tensor) -> None:
    where = f"codes in {path}"
    if len(codes) != metadata.num_rows:
        raise UserError(f"{where}: {CODES_META_NAME} says {metadata.num_rows} rows, the data has {len(codes)}; "
                        "the export is incomplete or altered: re-export it")
    if tuple(codes.shape[1:]) != tuple(metadata.latent_shape):
        raise UserError(f"{where}: grids are {tuple(codes.shape[1:])}, {CODES_META_NAME} says "
                        f"{tuple(metadata.latent_shape)}; re-export it")
    if metadata.format == "npy" and str(codes.dtype).replace("torch.", "") != metadata.dtype:
        raise UserError(f"{where}: dtype {str(codes.dtype).replace('torch.', '')}, {CODES_META_NAME} says "
                        f"{metadata.dtype}; re-export it")
    if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= metadata.vocab_size):
        raise UserError(f"{where}: values in [{int(codes.min())}, {int(codes.max())}] fall outside "
                        f"[0, {metadata.vocab_size}); re-export them with the tokenizer that made them")
    if metadata.label_names and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(metadata.label_names)):
        raise UserError(f"{where}: labels fall outside [0, {len(metadata.label_names)}); re-export them")
