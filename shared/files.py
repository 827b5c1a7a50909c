"""The files of a pretrained folder and the byte-level helpers every writer and checker of them uses."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def fsync_file(path: Path) -> None:
    """Flush a written file to disk, so that a rename after it never publishes an empty file."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
