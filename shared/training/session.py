"""`TrainingSession`: the Accelerator, the output folder and the step loop of one training run.

Exactness: the data order is a pure function of (seed, step) (see `shared.data.StepOrder`), the
learning rate a pure function of the step and the schedule recorded in the checkpoint, and a
checkpoint holds the model (with its buffers, e.g. the EMA codebook), the optimizer and every
process's RNG state. So a run resumed from the checkpoint of step s repeats the uninterrupted run
from step s on, bit for bit (CPU).

Nothing is written before `run()` starts, so every check that can refuse a run comes first. A run
that fails before its first checkpoint (out of memory at the first step, say) removes what it wrote,
and puts back what `--overwrite` had moved aside.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import PartialState
from accelerate.utils import ProjectConfiguration, broadcast, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from shared.config import read_json, write_json_atomic
from shared.errors import TrainingStopped, UserError, is_out_of_memory, one_line
from shared.hub import push_folder, training_command, upload_warning
from shared.runtime import make_accelerator
from shared.training.best import BestModel
from shared.training.checkpoints import list_checkpoints, load_newest_checkpoint, read_trainer_state, write_checkpoint
from shared.training.config import (CHECKPOINTS, MAX_LISTED_PROBLEMS, METRICS_NAME, TRAIN_CONFIG_NAME, LoopConfig, ScheduleExtension,
                                    learning_rate_at)
from shared.training.folder import RunFolder, check_output_dir
from shared.training.sharding import Sharding


class TrainingSession:
    """Owns the Accelerator, the output folder and the step loop of one training run."""

    def __init__(self, config: LoopConfig, run_settings: dict[str, Any], project_name: str, monitor: str | None,
                 out_of_memory_advice: str = "lower --batch-size, or use --gradient-accumulation-steps to keep "
                                             "the effective batch", higher_is_better: bool = False) -> None:
        """`monitor`: the validation metric that picks the model kept with --keep-best (lower is better
        unless `higher_is_better`); None keeps the last model."""
        config.check()
        check_output_dir(config, run_settings)
        if config.push_to_hub is not None and PartialState().is_main_process:
            warning = upload_warning()
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.config = config
        self.run_settings = run_settings
        self.project_name = project_name
        self.out_of_memory_advice = out_of_memory_advice
        self.output_dir = Path(config.output_dir).resolve()
        self.best = BestModel(self.output_dir, monitor, higher_is_better) if monitor is not None else None
        saved = self.output_dir / TRAIN_CONFIG_NAME
        # the max_steps of the run being resumed, for checkpoints older than the schedule record
        self.previous_max_steps = read_json(saved).get("max_steps") if config.resume and saved.is_file() else None
        self.accelerator = make_accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")))
        set_seed(config.seed)  # the same on every process, so every replica starts identical
        self.sharding = (Sharding(self.device, self.accelerator.num_processes, config.mixed_precision, self.is_main)
                         if config.fsdp else None)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.auxiliary: tuple[torch.nn.Module, torch.optim.Optimizer, float] | None = None
        self.skipped_steps = 0
        self.problems: set[str] = set()  # unreadable images met so far (replaced by the next readable row)
        self.problem_count = 0
        self.extension: ScheduleExtension | None = None
        self.started_fresh = True  # False once resumed from a checkpoint
        self.folder = RunFolder(self.output_dir, config.overwrite)

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
        self.model, self.optimizer = self._wrap(model, self.config.learning_rate, (0.9, 0.99))
        return self.model, self.optimizer

    def prepare_auxiliary(self, model: torch.nn.Module, learning_rate: float,
                          betas: tuple[float, float] = (0.5, 0.9)) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap a second trained model (a discriminator, say) and build its AdamW optimizer. Both are
        in every checkpoint, so exact resume covers them; call before `restore()`. Train it from the
        `auxiliary_step` callback of `run()`; its rate follows the main schedule scaled to `learning_rate`."""
        model, optimizer = self._wrap(model, learning_rate, betas)
        self.auxiliary = (model, optimizer, learning_rate)
        return model, optimizer

    def _wrap(self, model: torch.nn.Module, learning_rate: float, betas: tuple[float, float]):
        """`model` sharded (--fsdp) or prepared by Accelerate, with its AdamW built over what it trains."""
        def adamw(parameters):
            return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=self.config.weight_decay, betas=betas)

        if self.sharding is not None:  # the optimizer must see the shards, so it is built after sharding
            return self.sharding.prepare(model, adamw)
        return self.accelerator.prepare(model, adamw(model.parameters()))

    def auxiliary_learning_rate(self, step: int) -> float:
        """The auxiliary optimizer's rate at `step`: the main schedule's shape at its own peak."""
        return self.learning_rate(step) * self.auxiliary[2] / self.config.learning_rate

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def learning_rate(self, step: int) -> float:
        return learning_rate_at(self.config, step, self.extension)

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
    # Checkpoints (shared.training.checkpoints) and the best model (shared.training.best)
    # -------------------------------------------------------------------------------------------

    def restore(self) -> int:
        """With --resume: load the newest good checkpoint and return its step; else 0."""
        if not self.config.resume:
            return 0
        step, state = load_newest_checkpoint(self.accelerator, self.output_dir, self.print, self.sharding)
        if step is None:
            self.print(f"no usable checkpoint in {self.output_dir / CHECKPOINTS}; starting from step 0")
            return 0
        self.started_fresh = False
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.problems = set(state.get("corrupt_images", []))
        self.problem_count = int(state.get("corrupt_image_count", len(self.problems)))
        if state.get("extension"):
            self.extension = ScheduleExtension(**state["extension"])
        previous_max = state.get("max_steps", self.previous_max_steps)
        if previous_max is not None and previous_max != self.config.max_steps and step >= self.config.warmup_steps:
            old = dataclasses.replace(self.config, max_steps=previous_max)
            self.extension = ScheduleExtension(step, learning_rate_at(old, step, self.extension))
            self.print(f"max_steps {previous_max} -> {self.config.max_steps}: the learning rate continues from "
                       f"{self.extension.learning_rate:.3g} at step {step}")
        if self.best is not None:
            record = [None]
            if self.is_main:
                warning = self.best.restore(state.get("best"), step)
                if warning:
                    self.print(warning)
                record = [self.best.record]
            broadcast_object_list(record)  # every process reports the same best metrics
            self.best.record = record[0]
        return step

    def save_checkpoint(self, step: int) -> Path:
        """Save the full training state (every process writes its RNG state), then rename into place."""
        problems = sorted(set(gather_object(sorted(self.problems))))  # every process meets other images
        state = {"step": step, "max_steps": self.config.max_steps, "skipped_steps": self.skipped_steps,
                 "extension": dataclasses.asdict(self.extension) if self.extension else None,
                 "corrupt_image_count": max(len(problems), self.problem_count),
                 "best": self.best.record if self.best is not None else None,
                 "corrupt_images": problems[:MAX_LISTED_PROBLEMS], "num_processes": self.accelerator.num_processes}
        final = write_checkpoint(self.accelerator, self.output_dir, step, state, self.config.keep_checkpoints,
                                 self.sharding)
        if self.is_main and self.best is not None:  # best models no kept checkpoint refers to can go
            self.best.prune({(read_trainer_state(path).get("best") or {}).get("step")
                             for _, path in list_checkpoints(self.output_dir)})
        return final

    def _track_best(self, step: int, metrics: dict[str, float]) -> None:
        """Keep the model of the best validation so far (for --keep-best)."""
        if self.best is None or not self.best.improves(metrics):
            return
        with self.model_to_save() as model:
            if self.is_main:
                self.best.save(step, metrics, model)
            else:
                self.best.record = {"step": step, "metrics": dict(metrics)}
        self.accelerator.wait_for_everyone()

    def model_to_save(self) -> contextlib.AbstractContextManager:
        """The trained model whole, for save_pretrained (with --fsdp: gathered to the main process, None on the
        others). Every process must enter it together."""
        return self.sharding.saving() if self.sharding is not None else contextlib.nullcontext(self.unwrapped_model)

    def gathered(self) -> contextlib.AbstractContextManager:
        """With --fsdp, the models gathered whole on every process (validation and samples call more than
        forward); else nothing to do."""
        return self.sharding.gathered() if self.sharding is not None else contextlib.nullcontext()

    def _reported(self, last: dict[str, float]) -> dict[str, float]:
        """The metrics of the saved model: the best validation step's with --keep-best, else the last."""
        record = self.best.record if self.best is not None else None
        if record is None:
            return dict(last)
        monitor = self.best.monitor
        if not self.config.keep_best:
            return {**last, "best_step": record["step"], f"best_{monitor}": record["metrics"][monitor]}
        return {**record["metrics"], "best_step": record["step"], f"last_{monitor}": last.get(monitor)}

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
        if self.is_main:
            self.folder.begin(self.run_settings)
        self.accelerator.wait_for_everyone()
        if self.config.report_to != "none":
            self.accelerator.init_trackers(self.project_name, config=_flat_for_tracker(self.run_settings))
        try:
            metrics = self._loop(start_step, compute_loss, evaluate, after_step, auxiliary_step)
        except BaseException as error:
            if self.started_fresh and not list_checkpoints(self.output_dir) and self.is_main:
                with contextlib.suppress(Exception):
                    self.accelerator.end_training()
                self.folder.undo()
            if is_out_of_memory(error):
                raise UserError(f"out of memory with --batch-size {self.config.batch_size} "
                                f"({one_line(str(error))[:160]}); {self.out_of_memory_advice}") from None
            raise
        return metrics

    def _loop(self, start_step, compute_loss, evaluate, after_step, auxiliary_step) -> dict[str, float]:
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
                with (self.sharding.accumulating(self.model, syncing) if self.sharding is not None
                      else contextlib.nullcontext() if syncing else accelerator.no_sync(self.model)):
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
                if self.is_main:
                    self.folder.first_step_done()
                seconds_to_first_step = time.time() - psutil.Process().create_time()
            bar.update(1)
            bar.set_postfix({"loss": f"{loss_value.item():.4f}", **{k: f"{v:.3g}" for k, v in logs.items()}},
                            refresh=False)
            if done % config.log_every == 0:
                accelerator.log({"train/loss": loss_value.item(), "train/lr": self.learning_rate(step),
                                 "train/skipped_steps": self.skipped_steps,
                                 "train/corrupt_images": self.problem_count,
                                 **{f"train/{k}": v for k, v in logs.items()}}, step=done)
            if self.due(done, config.eval_every):
                with self.gathered():
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
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), self.gathered():
                    try:
                        after_step(done)
                    except Exception as error:  # a sample grid must never cost the run
                        self.print(f"warning: writing samples after step {done} failed: {one_line(str(error))}")
                self.model.train()
        bar.close()
        if start_step >= config.max_steps:
            with self.gathered():
                metrics = evaluate(config.max_steps)
        metrics = self._reported(metrics)
        metrics["train_seconds"] = time.perf_counter() - started
        if seconds_to_first_step is not None:
            metrics["seconds_to_first_step"] = seconds_to_first_step
        metrics["corrupt_images"] = self.problem_count
        metrics["replica_max_abs_difference"] = self.replica_difference()
        return metrics

    def due(self, done: int, every: int) -> bool:
        """True every `every` steps and at the last step."""
        return done % every == 0 or done == self.config.max_steps

    def replica_difference(self) -> float:
        """Largest absolute difference between this run's replicas, over every parameter and buffer
        (the EMA codebook included); 0.0 when the processes hold identical models."""
        tensors = (self.unwrapped_model.state_dict().values() if self.sharding is None
                   else self.unwrapped_model.buffers())  # sharded parameters are not replicas
        state = [tensor.detach().float().flatten() for tensor in tensors]
        mine = torch.cat(state) if state else torch.zeros(1, device=self.device)
        reference = broadcast(mine.clone(), from_process=0)
        difference = (mine - reference).abs().max()
        return self.accelerator.reduce(difference, reduction="sum").item()  # rank 0 adds 0

    def finish(self, extra_files: dict[str, dict] | None = None) -> None:
        """Save the trained model as a pretrained folder in --output-dir (main process): the best
        validation step's with --keep-best (checked against its record), else the last."""
        self.accelerator.wait_for_everyone()
        record = self.best.record if self.best is not None else None
        keep_best = self.config.keep_best and record is not None
        with contextlib.nullcontext() if keep_best else self.model_to_save() as last:
            if self.is_main:
                self._write_output(record if keep_best else None, last, extra_files)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def _write_output(self, record: dict[str, Any] | None, last: torch.nn.Module | None,
                      extra_files: dict[str, dict] | None) -> None:
        """The output folder's model: the best step's folder of `record`, else `last`; then `extra_files`."""
        if record is not None:
            self.best.copy_into(self.output_dir, record)
        else:
            last.save_pretrained(self.output_dir)
        for name, values in (extra_files or {}).items():
            write_json_atomic(self.output_dir / name, values)

    def finish_run(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """`finish` with the metrics in metrics.json, and the run's summary as one JSON line on stdout (main
        process): what every training command ends with. With --push-to-hub, then the upload (UploadFailed
        says how to retry; the saved model stays)."""
        self.finish({METRICS_NAME: metrics})
        if self.is_main:
            print(json.dumps({"output_dir": str(self.output_dir), **metrics}), flush=True)
            if self.config.push_to_hub is not None:
                url = push_folder(self.output_dir, self.config.push_to_hub, command=training_command())
                self.print(f"uploaded {self.output_dir} to {url}")
        return metrics


def _flat_for_tracker(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: (value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in settings.items()}
