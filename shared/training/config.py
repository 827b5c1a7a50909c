"""Settings of the one training loop: `LoopConfig` (flags every training command shares), the learning-rate
schedule, the output folder's names, and which settings `--resume` may change."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from shared.config import config_to_dict, option
from shared.data import check_num_workers
from shared.errors import UserError
from shared.hub import check_repo_id
from shared.pretrained import CONFIG_NAME, WEIGHTS_NAME

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
    "strict_images", "keep_best", "push_to_hub"})
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
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state across the processes (PyTorch "
                               "FSDP2); checkpoints become sharded; launch with torchrun or accelerate launch")
    push_to_hub: str | None = option(None, "at the end, upload the trained model and a model card to this Hub "
                                           "repo (org/name); it is saved locally first")

    def check(self) -> None:
        """UserError for settings no run can use."""
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
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub)
        if self.fsdp and self.mixed_precision == "fp16":
            raise UserError("--fsdp trains in float32 or bf16 (fp16 would need a sharded gradient scaler): pass "
                            "--mixed-precision bf16 or no")


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


def run_settings(train_config: Any, model_config: Any) -> dict[str, Any]:
    """The settings of a run as one flat JSON-ready dict (train_config.json); model keys get `model.`."""
    return {**config_to_dict(train_config),
            **{f"model.{key}": value for key, value in config_to_dict(model_config).items()}}
