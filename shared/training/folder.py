"""A run's output folder: refused when it holds another run, written only once the run starts, and undone
when the run fails before its first checkpoint."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from shared.config import read_json, write_json_atomic
from shared.errors import UserError
from shared.pretrained import CONFIG_NAME, WEIGHTS_NAME
from shared.training.checkpoints import list_checkpoints
from shared.training.config import (BEST, CHECKPOINTS, REPLACED, RESUMABLE_CHANGES, RUN_FILES, TRAIN_CONFIG_NAME,
                                    LoopConfig)


def check_output_dir(config: LoopConfig, run_settings: dict[str, Any] | None = None) -> None:
    """Refuse to touch a folder that holds another run, unless --resume or --overwrite says so; with
    --resume and `run_settings`, refuse settings that would make another run.

    Read-only: runs on every process before anything is read or written.
    """
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output-dir {output} is a file; pass a folder")
    holds_model = (output / WEIGHTS_NAME).exists() or (output / CONFIG_NAME).exists()
    holds_checkpoints = any(list_checkpoints(output))
    if config.resume and config.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    if (holds_model or holds_checkpoints) and not (config.resume or config.overwrite):
        what = "a trained model" if holds_model else "checkpoints of a run"
        raise UserError(f"{output} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
                        "or choose another --output-dir")
    saved_path = output / TRAIN_CONFIG_NAME
    if config.resume and run_settings is not None and saved_path.is_file():
        saved = read_json(saved_path)
        for key in sorted(set(saved) | set(run_settings)):
            if key in RESUMABLE_CHANGES or saved.get(key) == run_settings.get(key):
                continue
            raise UserError(f"--resume with {key}={run_settings.get(key)!r}, but the run in {output} used "
                            f"{saved.get(key)!r}; resume with the same settings or start a new --output-dir")


class RunFolder:
    """What a run writes into its output folder, on the main process: `begin` (after every check),
    `first_step_done` (what --overwrite moved aside can go), `undo` (remove what this run wrote and
    put back what --overwrite moved aside)."""

    def __init__(self, output_dir: Path, overwrite: bool) -> None:
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.created: list[Path] = []
        self.existed = output_dir.exists()

    def begin(self, run_settings: dict[str, Any]) -> None:
        output = self.output_dir
        if not self.existed:
            self.created.append(output)
        if self.overwrite:
            replaced = output / REPLACED
            shutil.rmtree(replaced, ignore_errors=True)
            for name in RUN_FILES:
                if (output / name).exists():
                    replaced.mkdir(parents=True, exist_ok=True)
                    os.replace(output / name, replaced / name)
        for name in (CHECKPOINTS, "logs", "samples", BEST):
            if not (output / name).exists():
                self.created.append(output / name)
        if not (output / TRAIN_CONFIG_NAME).exists():
            self.created.append(output / TRAIN_CONFIG_NAME)
        (output / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        write_json_atomic(output / TRAIN_CONFIG_NAME, run_settings)

    def first_step_done(self) -> None:
        shutil.rmtree(self.output_dir / REPLACED, ignore_errors=True)

    def undo(self) -> None:
        for path in reversed(self.created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        replaced = self.output_dir / REPLACED
        if replaced.is_dir():
            for item in replaced.iterdir():
                target = self.output_dir / item.name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
                os.replace(item, target)
            replaced.rmdir()
