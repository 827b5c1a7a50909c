"""Checkpoints: crash-safe writes, verification, and the fall back to an older one.

A checkpoint is written to `checkpoints/.step_N.tmp`, its files' sha256 recorded in
`trainer_state.json`, flushed to disk, then renamed to `checkpoints/step_N`; `--resume` verifies the
hashes and falls back to the previous checkpoint when the newest is incomplete or corrupt.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import write_json_atomic
from shared.errors import UserError, first_line
from shared.files import file_sha256, fsync_file
from shared.training.config import CHECKPOINTS, TRAINER_STATE_NAME


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Finished (renamed) checkpoints in `output_dir/checkpoints`, newest first."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith("step_") and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found, reverse=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE_NAME).read_text())


def verify_checkpoint(path: Path) -> str | None:
    """None when every file listed in trainer_state.json is present with its recorded sha256, else why not."""
    state_path = path / TRAINER_STATE_NAME
    if not state_path.is_file():
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        hashes = read_trainer_state(path)["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{TRAINER_STATE_NAME} is unreadable"
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != expected:
            return f"{name} is corrupt (sha256 mismatch)"
    return None


def write_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict[str, Any], keep: int,
                     sharding=None) -> Path:
    """Save the full training state as checkpoints/step_N (every process writes its RNG state, and with
    `sharding` (--fsdp) its shards, so every process calls this) with `trainer_state` and the files'
    hashes, then rename it into place and drop all but the newest `keep` checkpoints."""
    final = output_dir / CHECKPOINTS / f"step_{step:08d}"
    staging = output_dir / CHECKPOINTS / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if sharding is not None:
        sharding.save(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        hashes = {file.name: file_sha256(file) for file in sorted(staging.iterdir()) if file.is_file()}
        for file in staging.iterdir():
            if file.is_file():
                fsync_file(file)
        write_json_atomic(staging / TRAINER_STATE_NAME, {**trainer_state, "sha256": hashes})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for _, old in list_checkpoints(output_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_newest_checkpoint(accelerator, output_dir: Path, report: Callable[[str], None], sharding=None
                           ) -> tuple[int | None, dict[str, Any]]:
    """Load the newest good checkpoint into the accelerator's objects: (its step, its trainer state), or
    (None, {}) when there is none. Checkpoints that are incomplete or corrupt are reported and renamed
    `corrupt_step_N` (kept, never deleted), so they neither shadow nor rotate out later checkpoints."""
    rejected: list[Path] = []
    loaded_step, attempted_load, state = None, False, {}
    for step, path in list_checkpoints(output_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            state = read_trainer_state(path)
            written_by = int(state.get("num_processes", 1))
            if written_by != accelerator.num_processes:
                convert = (f" (its shards convert to one file for other uses with python -m "
                           f"torch.distributed.checkpoint.format_utils dcp_to_torch_save {path} state.pt)") if sharding else ""
                raise UserError(f"{path} was written by {written_by} process(es), this run has "
                                f"{accelerator.num_processes}: the data order and RNG streams would differ; "
                                f"resume with {written_by} process(es){convert}")
            attempted_load = True
            try:
                accelerator.load_state(str(path))
                if sharding is not None:
                    sharding.load(path)
            except Exception as error:  # verified but does not load: try the previous one
                problem = f"it does not load ({first_line(error)})"
        if problem is None:
            loaded_step = step
            report(f"resumed from {path} (step {step})")
            break
        report(f"warning: skipping checkpoint {path}: {problem}; trying the previous one")
        rejected.append(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in rejected:
            os.replace(path, path.with_name(f"corrupt_{path.name}"))
    accelerator.wait_for_everyone()
    if loaded_step is None and attempted_load:  # a failed load may have half-restored the model: unsafe to go on
        raise UserError(f"no checkpoint in {output_dir / CHECKPOINTS} could be loaded; "
                        "start a new --output-dir (or pass --overwrite instead of --resume)")
    return loaded_step, state
