"""The one Accelerate training loop both stages use: output folder, checkpoints, exact resume, logging.

Exactness: the data order is a pure function of (seed, step) (see `shared.data.StepOrder`), the
learning rate a pure function of the step and the schedule recorded in the checkpoint, and a
checkpoint holds the model (with its buffers, e.g. the EMA codebook), the optimizer and every
process's RNG state. So a run resumed from the checkpoint of step s repeats the uninterrupted run
from step s on, bit for bit (CPU).

Crash safety: a checkpoint is written to `checkpoints/.step_N.tmp`, its files' sha256 recorded in
`trainer_state.json`, and only then renamed to `checkpoints/step_N`; `--resume` verifies the hashes
and falls back to the previous checkpoint when the newest is incomplete or corrupt.

Nothing is written before `run()` starts, so every check that can refuse a run comes first. A run
that fails before its first checkpoint (out of memory at the first step, say) removes what it wrote,
and puts back what `--overwrite` had moved aside.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from shared.config import config_to_dict, option, read_json, write_json_atomic
from shared.errors import TrainingStopped, UserError, one_line
from shared.pretrained import CONFIG_NAME, WEIGHTS_NAME, file_sha256, fsync_file
from shared.runtime import make_accelerator

CHECKPOINTS = "checkpoints"
TRAIN_CONFIG_NAME = "train_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.json"
REPLACED = ".replaced"  # where --overwrite keeps the old run until the new one has taken a step
BEST = "best"  # the model of the best validation step so far (a pretrained folder)
# What a run writes into its output folder (what --overwrite replaces).
RUN_FILES = (CHECKPOINTS, WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, TRAIN_CONFIG_NAME, "logs", "samples", BEST)
# Settings that may change on --resume without making it a different run.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "tokenizer", "max_steps", "resume", "overwrite", "eval_every", "save_every", "keep_checkpoints",
    "log_every", "report_to", "skip_nonfinite", "sample_every", "progress", "num_workers", "cache_images",
    "strict_images", "keep_best"})
# Corrupt-image paths kept in trainer_state.json (the count is always exact).
MAX_LISTED_PROBLEMS = 1000


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Settings of the training loop, shared by both stages."""

    output_dir: str = option("", "output folder: checkpoints, logs, samples, and the trained model")
    max_steps: int = option(2000, "optimizer steps to train for")
    batch_size: int = option(64, "images (or code grids) per process per micro-batch")
    learning_rate: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(100, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at learning_rate * min_lr_ratio")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 turns clipping off)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "Accelerate mixed precision")
    seed: int = option(0, "seed for initialisation and data order")
    num_workers: int | None = option(None, "data loader worker processes per process (default: the CPUs per "
                                           "process, at most 8, for images; 0 for codes); 0 loads in the main process")
    eval_every: int = option(500, "validate every N steps (and at the end)")
    save_every: int = option(500, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(2, "newest checkpoints to keep")
    log_every: int = option(25, "log training metrics every N steps")
    report_to: Literal["none", "tensorboard"] = option("none", "experiment tracker")
    resume: bool = option(False, "continue from the newest good checkpoint in --output-dir")
    overwrite: bool = option(False, "replace a trained model or checkpoints already in --output-dir")
    skip_nonfinite: bool = option(False, "skip steps whose loss is NaN or inf instead of stopping")
    keep_best: bool = option(True, "the output model is the one of the best validation step (metrics.json says "
                                   "which); --no-keep-best keeps the last")
    progress: bool = option(True, "show a progress bar")

    def check(self) -> None:
        """UserError for settings no run can use."""
        from shared.data import check_num_workers

        if not self.output_dir:
            raise UserError("--output-dir is required")
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_every", "save_every",
                    "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: the command picks
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("--warmup-steps must be >= 0 and --min-lr-ratio in [0, 1]")
        check_num_workers(self.num_workers)


@dataclasses.dataclass(frozen=True)
class ScheduleExtension:
    """Where --max-steps changed on --resume: from `step` on, a cosine from `learning_rate` (the rate the
    run had reached) to the floor at the new max_steps, so the rate continues without a jump."""

    step: int
    learning_rate: float


def learning_rate_at(config: LoopConfig, step: int, extension: ScheduleExtension | None = None) -> float:
    """Linear warmup to the peak, then cosine decay to peak * min_lr_ratio at max_steps."""
    floor = config.learning_rate * config.min_lr_ratio
    if extension is not None and step >= extension.step:
        progress = (step - extension.step) / max(1, config.max_steps - extension.step)
        return floor + (extension.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return floor + (config.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def verify_checkpoint(path: Path) -> str | None:
    """None when every file listed in trainer_state.json is present with its recorded sha256, else why not."""
    state_path = path / TRAINER_STATE_NAME
    if not state_path.is_file():
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        state = json.loads(state_path.read_text())
        hashes = state["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{TRAINER_STATE_NAME} is unreadable"
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != expected:
            return f"{name} is corrupt (sha256 mismatch)"
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """True for allocation failures on any device, also when a loader worker hit one or was killed for it."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("can't allocate memory", "out of memory", "not enough memory",
                                      "killed by signal: Killed", "Cannot allocate memory"))


class TrainingSession:
    """Owns the Accelerator, the output folder and the step loop of one training run."""

    def __init__(self, config: LoopConfig, run_settings: dict[str, Any], project_name: str, monitor: str,
                 out_of_memory_advice: str = "lower --batch-size, or use --gradient-accumulation-steps to keep "
                                             "the effective batch") -> None:
        """`monitor`: the validation metric (lower is better) that picks the best model for --keep-best."""
        config.check()
        check_output_dir(config, run_settings)
        self.config = config
        self.run_settings = run_settings
        self.project_name = project_name
        self.monitor = monitor
        self.best: dict[str, Any] | None = None  # {"step", "metrics"} of the best validation so far
        self.out_of_memory_advice = out_of_memory_advice
        self.output_dir = Path(config.output_dir).resolve()
        saved = self.output_dir / TRAIN_CONFIG_NAME
        # the max_steps of the run being resumed, for checkpoints older than the schedule record
        self.previous_max_steps = read_json(saved).get("max_steps") if config.resume and saved.is_file() else None
        self.accelerator = make_accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=_project_configuration(self.output_dir),
        )
        from accelerate.utils import set_seed

        set_seed(config.seed)  # the same on every process, so every replica starts identical
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.auxiliary: tuple[torch.nn.Module, torch.optim.Optimizer, float] | None = None
        self.skipped_steps = 0
        self.problems: set[str] = set()  # unreadable images met so far (replaced by the next readable row)
        self.problem_count = 0
        self.extension: ScheduleExtension | None = None
        self.started_fresh = True  # False once resumed from a checkpoint
        self._created: list[Path] = []
        self._output_existed = self.output_dir.exists()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap `model` for the current device and processes, and build its AdamW optimizer."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.config.learning_rate,
                                      weight_decay=self.config.weight_decay, betas=(0.9, 0.99))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return self.model, self.optimizer

    def prepare_auxiliary(self, model: torch.nn.Module, learning_rate: float,
                          betas: tuple[float, float] = (0.5, 0.9)) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap a second trained model (a discriminator, say) and build its AdamW optimizer. Both are
        in every checkpoint, so exact resume covers them; call before `restore()`. Train it from the
        `auxiliary_step` callback of `run()`; its rate follows the main schedule scaled to `learning_rate`."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=self.config.weight_decay,
                                      betas=betas)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.auxiliary = (model, optimizer, learning_rate)
        return model, optimizer

    def auxiliary_learning_rate(self, step: int) -> float:
        """The auxiliary optimizer's rate at `step`: the main schedule's shape at its own peak."""
        return self.learning_rate(step) * self.auxiliary[2] / self.config.learning_rate

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def learning_rate(self, step: int) -> float:
        return learning_rate_at(self.config, step, self.extension)

    # -------------------------------------------------------------------------------------------
    # Corrupt images met by the loaders
    # -------------------------------------------------------------------------------------------

    def report_problems(self, problems: list[str]) -> None:
        """Count unreadable images (each replaced by the next readable row) and warn once per image."""
        for problem in problems:
            if problem in self.problems:
                continue
            self.problems.add(problem)
            self.problem_count += 1
            print(f"warning: {problem}; using the next readable row instead ({self.problem_count} so far; "
                  "--strict-images stops instead)", file=sys.stderr, flush=True)

    # -------------------------------------------------------------------------------------------
    # Checkpoints
    # -------------------------------------------------------------------------------------------

    def restore(self) -> int:
        """With --resume: load the newest good checkpoint and return its step; else 0.

        Checkpoints that are incomplete or corrupt are reported and renamed `corrupt_step_N` (kept,
        never deleted), so they neither shadow nor rotate out the checkpoints written from now on.
        """
        if not self.config.resume:
            return 0
        rejected: list[Path] = []
        loaded_step, attempted_load, state = None, False, {}
        for step, path in list_checkpoints(self.output_dir):
            problem = verify_checkpoint(path)
            if problem is None:
                state = json.loads((path / TRAINER_STATE_NAME).read_text())
                written_by = int(state.get("num_processes", 1))
                if written_by != self.accelerator.num_processes:
                    raise UserError(f"{path} was written by {written_by} process(es), this run has "
                                    f"{self.accelerator.num_processes}: the data order and RNG streams would differ; "
                                    f"resume with {written_by} process(es)")
                attempted_load = True
                try:
                    self.accelerator.load_state(str(path))
                except Exception as error:  # verified but does not load: try the previous one
                    problem = f"it does not load ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            if problem is None:
                loaded_step = step
                self.print(f"resumed from {path} (step {step})")
                break
            self.print(f"warning: skipping checkpoint {path}: {problem}; trying the previous one")
            rejected.append(path)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            for path in rejected:
                os.replace(path, path.with_name(f"corrupt_{path.name}"))
        self.accelerator.wait_for_everyone()
        if loaded_step is not None:
            self._restore_trainer_state(loaded_step, state)
            return loaded_step
        if attempted_load:  # a failed load may have half-restored the model: starting over from it is unsafe
            raise UserError(f"no checkpoint in {self.output_dir / CHECKPOINTS} could be loaded; "
                            "start a new --output-dir (or pass --overwrite instead of --resume)")
        self.print(f"no usable checkpoint in {self.output_dir / CHECKPOINTS}; starting from step 0")
        return 0

    def _restore_trainer_state(self, step: int, state: dict[str, Any]) -> None:
        self.started_fresh = False
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.problems = set(state.get("corrupt_images", []))
        self.best = state.get("best")
        self.problem_count = int(state.get("corrupt_image_count", len(self.problems)))
        if state.get("extension"):
            self.extension = ScheduleExtension(**state["extension"])
        previous_max = state.get("max_steps", self.previous_max_steps)
        if previous_max is not None and previous_max != self.config.max_steps and step >= self.config.warmup_steps:
            old = dataclasses.replace(self.config, max_steps=previous_max)
            self.extension = ScheduleExtension(step, learning_rate_at(old, step, self.extension))
            self.print(f"max_steps {previous_max} -> {self.config.max_steps}: the learning rate continues from "
                       f"{self.extension.learning_rate:.3g} at step {step}")

    def save_checkpoint(self, step: int) -> Path:
        """Save the full training state (every process writes its RNG state), then rename into place."""
        from accelerate.utils import gather_object

        final = self.output_dir / CHECKPOINTS / f"step_{step:08d}"
        staging = self.output_dir / CHECKPOINTS / f".step_{step:08d}.tmp"
        problems = sorted(set(gather_object(sorted(self.problems))))  # every process meets other images
        problem_count = max(len(problems), self.problem_count)
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            hashes = {file.name: file_sha256(file) for file in sorted(staging.iterdir()) if file.is_file()}
            for file in staging.iterdir():
                if file.is_file():
                    fsync_file(file)
            write_json_atomic(staging / TRAINER_STATE_NAME,
                              {"step": step, "max_steps": self.config.max_steps, "skipped_steps": self.skipped_steps,
                               "extension": dataclasses.asdict(self.extension) if self.extension else None,
                               "corrupt_image_count": problem_count, "best": self.best,
                               "corrupt_images": problems[:MAX_LISTED_PROBLEMS],
                               "num_processes": self.accelerator.num_processes, "sha256": hashes})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for _, old in list_checkpoints(self.output_dir)[self.config.keep_checkpoints:]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    # -------------------------------------------------------------------------------------------
    # The output folder: written only once the run starts; undone when it fails before a checkpoint
    # -------------------------------------------------------------------------------------------

    def _begin(self) -> None:
        if self.is_main:
            if not self._output_existed:
                self._created.append(self.output_dir)
            if self.config.overwrite:
                replaced = self.output_dir / REPLACED
                shutil.rmtree(replaced, ignore_errors=True)
                for name in RUN_FILES:
                    if (self.output_dir / name).exists():
                        replaced.mkdir(parents=True, exist_ok=True)
                        os.replace(self.output_dir / name, replaced / name)
            for name in (CHECKPOINTS, "logs", "samples", BEST):
                if not (self.output_dir / name).exists():
                    self._created.append(self.output_dir / name)
            if not (self.output_dir / TRAIN_CONFIG_NAME).exists():
                self._created.append(self.output_dir / TRAIN_CONFIG_NAME)
            (self.output_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.output_dir / TRAIN_CONFIG_NAME, self.run_settings)
        self.accelerator.wait_for_everyone()
        if self.config.report_to != "none":
            self.accelerator.init_trackers(self.project_name, config=_flat_for_tracker(self.run_settings))

    def _first_step_done(self) -> None:
        """The new run works: what --overwrite moved aside can go."""
        if self.is_main:
            shutil.rmtree(self.output_dir / REPLACED, ignore_errors=True)

    def _undo_begin(self) -> None:
        """Remove what this run wrote and put back what --overwrite moved aside (main process)."""
        if not self.is_main:
            return
        with contextlib.suppress(Exception):
            self.accelerator.end_training()
        for path in reversed(self._created):
            if path == self.output_dir:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir():
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

    # -------------------------------------------------------------------------------------------
    # The loop
    # -------------------------------------------------------------------------------------------

    def run(self, start_step: int, compute_loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
            evaluate: Callable[[int], dict[str, float]],
            after_step: Callable[[int], None] | None = None,
            auxiliary_step: Callable[[int], dict[str, float]] | None = None) -> dict[str, float]:
        """Train from `start_step` to max_steps and return the validation metrics of the saved model.

        `compute_loss(micro_batch)` returns this process's loss for micro-batch `micro_batch`
        (= step * accumulation + micro) and a dict of scalars for the bar and the logs.
        `auxiliary_step(step)` runs after each optimizer step of the main model (e.g. a discriminator
        update on the same batch, with the model from `prepare_auxiliary`) and returns scalars to log.
        `after_step(done)` runs after every step and its checkpoint (use `due()` for a cadence); it
        only writes files such as sample grids, and an error in it is reported, never fatal.
        """
        self._begin()
        try:
            metrics = self._loop(start_step, compute_loss, evaluate, after_step, auxiliary_step)
        except BaseException as error:
            if self.started_fresh and not list_checkpoints(self.output_dir):
                self._undo_begin()
            if is_out_of_memory(error):
                raise UserError(f"out of memory with --batch-size {self.config.batch_size} "
                                f"({one_line(str(error))[:160]}); {self.out_of_memory_advice}") from None
            raise
        return metrics

    def _loop(self, start_step, compute_loss, evaluate, after_step, auxiliary_step) -> dict[str, float]:
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        accumulation = config.gradient_accumulation_steps
        metrics: dict[str, float] = {}
        seconds_to_first_step = None
        bar = tqdm(total=config.max_steps, initial=start_step, desc="training", dynamic_ncols=True,
                   disable=not (self.is_main and config.progress))
        started = time.perf_counter()
        self.model.train()
        for step in range(start_step, config.max_steps):
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(step)
            buffers = ([buffer.clone() for buffer in self.model.buffers()] if config.skip_nonfinite else None)
            losses, logs = [], {}
            for micro in range(accumulation):
                syncing = micro == accumulation - 1
                with contextlib.nullcontext() if syncing else accelerator.no_sync(self.model):
                    loss, logs = compute_loss(step * accumulation + micro)
                    accelerator.backward(loss / accumulation)
                losses.append(loss.detach().float())
            loss_value = torch.stack(losses).mean()
            finite = accelerator.reduce(torch.isfinite(loss_value).float().to(self.device), reduction="sum")
            if finite.item() < accelerator.num_processes:
                self.optimizer.zero_grad(set_to_none=True)
                if not config.skip_nonfinite:
                    bar.close()
                    good = list_checkpoints(self.output_dir)
                    kept = f"the last good checkpoint is {good[0][1]}" if good else "no checkpoint was written yet"
                    raise TrainingStopped(f"the loss became {loss_value.item()} at step {step + 1}; {kept}; --resume "
                                          "with --skip-nonfinite to skip such steps, or start a new --output-dir "
                                          "with a lower --learning-rate")
                with torch.no_grad():
                    for buffer, saved in zip(self.model.buffers(), buffers):
                        buffer.copy_(saved)  # the EMA codebook saw the bad batch: undo that too
                self.skipped_steps += 1
                self.print(f"warning: skipped step {step + 1}: loss {loss_value.item()} ({self.skipped_steps} skipped)")
            else:
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if auxiliary_step is not None:
                    for group in self.auxiliary[1].param_groups:
                        group["lr"] = self.auxiliary_learning_rate(step)
                    logs = {**logs, **auxiliary_step(step)}
            done = step + 1
            if step == start_step:
                self._first_step_done()
                seconds_to_first_step = _seconds_since_process_start()
            bar.update(1)
            bar.set_postfix({"loss": f"{loss_value.item():.4f}", **{k: f"{v:.3g}" for k, v in logs.items()}},
                            refresh=False)
            if done % config.log_every == 0:
                accelerator.log({"train/loss": loss_value.item(), "train/lr": self.learning_rate(step),
                                 "train/skipped_steps": self.skipped_steps,
                                 "train/corrupt_images": self.problem_count,
                                 **{f"train/{k}": v for k, v in logs.items()}}, step=done)
            if self.due(done, config.eval_every):
                metrics = evaluate(done)
                accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=done)
                if self.is_main:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                self._track_best(done, metrics)
            self.model.train()
            if self.due(done, config.save_every):
                self.save_checkpoint(done)
            if after_step is not None:
                # after the checkpoint, so a resumed run skips it: it must leave the RNG streams as it found them
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    try:
                        after_step(done)
                    except Exception as error:  # a sample grid must never cost the run
                        self.print(f"warning: writing samples after step {done} failed: {one_line(str(error))}")
                self.model.train()
        bar.close()
        if start_step >= config.max_steps:
            metrics = evaluate(config.max_steps)
        metrics = self._reported(metrics)
        metrics["train_seconds"] = time.perf_counter() - started
        if seconds_to_first_step is not None:
            metrics["seconds_to_first_step"] = seconds_to_first_step
        metrics["corrupt_images"] = self.problem_count
        metrics["replica_max_abs_difference"] = self.replica_difference()
        return metrics

    def _track_best(self, step: int, metrics: dict[str, float]) -> None:
        """Keep the model of the best validation so far in output/best (for --keep-best)."""
        value = metrics.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if self.best is not None and value >= self.best["metrics"][self.monitor]:
            return
        self.best = {"step": step, "metrics": dict(metrics)}
        if self.is_main:
            self.unwrapped_model.save_pretrained(self.output_dir / BEST)
        self.accelerator.wait_for_everyone()

    def _reported(self, last: dict[str, float]) -> dict[str, float]:
        """The metrics of the saved model: the best validation step's with --keep-best, else the last."""
        best = self.best
        if best is None:
            return dict(last)
        if not self.config.keep_best:
            return {**last, "best_step": best["step"], f"best_{self.monitor}": best["metrics"][self.monitor]}
        return {**best["metrics"], "best_step": best["step"], f"last_{self.monitor}": last.get(self.monitor)}

    def due(self, done: int, every: int) -> bool:
        """True every `every` steps and at the last step."""
        return done % every == 0 or done == self.config.max_steps

    def replica_difference(self) -> float:
        """Largest absolute difference between this run's replicas, over every parameter and buffer
        (the EMA codebook included); 0.0 when the processes hold identical models."""
        from accelerate.utils import broadcast

        state = [tensor.detach().float().flatten() for tensor in self.unwrapped_model.state_dict().values()]
        mine = torch.cat(state) if state else torch.zeros(1, device=self.device)
        reference = broadcast(mine.clone(), from_process=0)
        difference = (mine - reference).abs().max()
        return self.accelerator.reduce(difference, reduction="sum").item()  # rank 0 adds 0

    def finish(self, extra_files: dict[str, dict] | None = None) -> None:
        """Save the trained model as a pretrained folder in --output-dir (main process): the best
        validation step's with --keep-best, else the last."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            best = self.output_dir / BEST
            if self.config.keep_best and self.best is not None and (best / WEIGHTS_NAME).is_file():
                for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first: a reader never sees a config without them
                    temporary = self.output_dir / f".{name}.tmp-{os.getpid()}"
                    shutil.copyfile(best / name, temporary)
                    fsync_file(temporary)
                    os.replace(temporary, self.output_dir / name)
            else:
                self.unwrapped_model.save_pretrained(self.output_dir)
            for name, values in (extra_files or {}).items():
                write_json_atomic(self.output_dir / name, values)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def _project_configuration(output_dir: Path):
    from accelerate.utils import ProjectConfiguration

    return ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))


def _seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def _flat_for_tracker(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: (value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in settings.items()}


def run_settings(train_config: Any, model_config: Any) -> dict[str, Any]:
    """The settings of a run as one flat JSON-ready dict (train_config.json); model keys get `model.`."""
    return {**config_to_dict(train_config),
            **{f"model.{key}": value for key, value in config_to_dict(model_config).items()}}
