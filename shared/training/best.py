"""The model of the best validation step, kept for `--keep-best`, and its record.

Each best model is a pretrained folder `best/step_N/`; its record {step, metrics, sha256 of its
weights} travels in every checkpoint. A resumed run takes the record of the checkpoint it resumes
from, checks the folder against it (the step's folder, its weights' sha256), and deletes the folders
written after that checkpoint: a run that crashed after a new best but before the next checkpoint,
resumed with another --eval-every, must not end with a model its metrics.json does not describe.
Folders that no checkpoint still refers to are removed as checkpoints rotate.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.files import CONFIG_NAME, WEIGHTS_NAME, file_sha256, fsync_file
from shared.training.config import BEST


class BestModel:
    """The best validation step so far of a run whose output folder is `output_dir`: `monitor` is the
    metric that decides (lower is better unless `higher_is_better`)."""

    def __init__(self, output_dir: Path, monitor: str, higher_is_better: bool = False) -> None:
        self.root = output_dir / BEST
        self.monitor = monitor
        self.higher_is_better = higher_is_better
        self.record: dict[str, Any] | None = None  # {"step", "metrics", "sha256"}

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def improves(self, metrics: dict[str, float]) -> bool:
        """Whether `metrics` beat the best so far (a missing or non-finite value never does)."""
        value = metrics.get(self.monitor)
        if value is None or not math.isfinite(value):
            return False
        if self.record is None:
            return True
        best = self.record["metrics"][self.monitor]
        return value > best if self.higher_is_better else value < best

    def save(self, step: int, metrics: dict[str, float], model) -> None:
        """Keep `model` as the best, at `step` with `metrics` (main process)."""
        folder = self.folder(step)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        self.record = {"step": step, "metrics": dict(metrics), "sha256": file_sha256(folder / WEIGHTS_NAME)}

    def copy_into(self, output_dir: Path, record: dict[str, Any]) -> None:
        """Make the best step's folder of `record` the output model of `output_dir`, checked against its sha256;
        weights first, so a reader never sees a config without them; then the model's own parts (subfolders)."""
        best = self.folder(record["step"])
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            temporary = output_dir / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(best / name, temporary)
            fsync_file(temporary)
            if name == WEIGHTS_NAME and file_sha256(temporary) != record["sha256"]:
                temporary.unlink()
                raise UserError(f"{best / WEIGHTS_NAME} changed after step {record['step']} recorded it; "
                                "restore it, or pass --no-keep-best to keep the last model")
            os.replace(temporary, output_dir / name)
        for folder in sorted(path for path in best.iterdir() if path.is_dir()):
            staging = output_dir / f".{folder.name}.tmp-{os.getpid()}"
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            shutil.rmtree(output_dir / folder.name, ignore_errors=True)
            os.replace(staging, output_dir / folder.name)

    def restore(self, record: dict[str, Any] | None, resumed_step: int) -> str | None:
        """Take the record of the checkpoint of `resumed_step` (main process: also delete the folders of
        later steps). Returns a warning when its folder is missing or altered (the record is then dropped
        and the next validation starts a new best)."""
        self.record = None
        for step in self.saved_steps():
            if step > resumed_step:  # written after the checkpoint: a run that no longer exists made it
                shutil.rmtree(self.folder(step), ignore_errors=True)
        if not record:
            return None
        weights = self.folder(record["step"]) / WEIGHTS_NAME
        if "sha256" not in record or not weights.is_file() or file_sha256(weights) != record["sha256"]:
            return (f"warning: the best model of step {record['step']} that the checkpoint records is missing or "
                    f"altered in {self.root}; the best model is chosen afresh from the next validation on")
        self.record = dict(record)
        return None

    def saved_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(path.name[5:]) for path in self.root.iterdir()
                      if path.is_dir() and path.name.startswith("step_") and path.name[5:].isdigit())

    def prune(self, referenced: set[int]) -> None:
        """Remove the best folders of steps that neither this run nor a kept checkpoint refers to."""
        keep = set(referenced) | ({self.record["step"]} if self.record else set())
        for step in self.saved_steps():
            if step not in keep:
                shutil.rmtree(self.folder(step), ignore_errors=True)
