"""Captions: which column holds them, reading an image folder's metadata.jsonl, and counting the bad ones.

A caption is stored stripped; an empty or non-string value counts as missing (None), which a command
either warns about (the row is kept, and trains as having no caption) or, with --strict-captions, refuses.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.config import CAPTION_COLUMN, FOLDER_METADATA
from shared.errors import UserError


def checked_caption_column(description: str, features: Any, caption_column: str | None) -> str | None:
    """The checked caption column: the one given, 'text' when present and none is given, or None ('none')."""
    import datasets

    if caption_column is not None and caption_column.lower() == "none":
        return None
    if caption_column is None:
        found = features.get(CAPTION_COLUMN)
        return CAPTION_COLUMN if isinstance(found, datasets.Value) and found.dtype in ("string", "large_string") else None
    if caption_column not in features:
        raise UserError(f"{description} has no column {caption_column!r} (columns: {', '.join(features)}); "
                        "fix --caption-column, or pass --caption-column none")
    if not (isinstance(features[caption_column], datasets.Value)
            and features[caption_column].dtype in ("string", "large_string")):
        raise UserError(f"column {caption_column!r} of {description} does not hold text ({features[caption_column]}); "
                        "pick a string column with --caption-column")
    return caption_column


def clean_caption(value: Any) -> str | None:
    """A caption as stored: stripped text, or None for an empty or non-string value."""
    return value.strip() or None if isinstance(value, str) else None


def folder_captions(split_root: Path, paths: list[str], caption_column: str | None) -> np.ndarray | None:
    """The captions of an image folder's split from its metadata.jsonl ({"file_name": ..., "text": ...} per
    line, the `datasets` imagefolder convention), in the order of `paths`; None without the file."""
    if caption_column is not None and caption_column.lower() == "none":
        return None
    metadata = split_root / FOLDER_METADATA
    if not metadata.is_file():
        if caption_column is not None:
            raise UserError(f"--caption-column {caption_column}: the image folder {split_root} has no {FOLDER_METADATA}; "
                            f"add one with a line {{\"file_name\": ..., \"{caption_column}\": ...}} per image")
        return None
    column = caption_column or CAPTION_COLUMN
    by_file: dict[str, Any] = {}
    columns: set[str] = set()
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_file[os.path.normpath(record["file_name"])] = record.get(column)
        except (ValueError, KeyError, TypeError):
            raise UserError(f"line {number} of {metadata} is not a JSON object with a file_name; fix that line") from None
        columns.update(record)
    if column not in columns:
        raise UserError(f"{metadata} has no column {column!r} (columns: {', '.join(sorted(columns))}); "
                        "fix --caption-column")
    return np.array([clean_caption(by_file.get(os.path.normpath(path))) for path in paths] + [None])[:-1]


def check_captions(captions: np.ndarray | None, where: str, strict: bool) -> None:
    """Warn of (or with `strict`, refuse) rows of a split whose caption is empty or not a string."""
    if captions is None:
        return
    missing = sum(caption is None for caption in captions)
    if not missing:
        return
    if strict:
        raise UserError(f"{missing} of the {len(captions)} rows of {where} have an empty or non-string caption; fix "
                        "them, or drop --strict-captions to keep those rows without a caption")
    print(f"warning: {missing} of the {len(captions)} rows of {where} have an empty or non-string caption; they "
          "are kept without one (--strict-captions refuses them)", file=sys.stderr)
