"""The one Accelerate training loop both stages use: output folder, checkpoints, exact resume, logging.

Reading order: `config` (the loop's flags and schedule), `checkpoints` (crash-safe writes and the fall
back), `best` (the best model and its record), `folder` (the output folder), `session` (the loop).
"""
from shared.training.best import BestModel
from shared.training.checkpoints import list_checkpoints, verify_checkpoint
from shared.training.config import (BEST, CHECKPOINTS, METRICS_NAME, RESUMABLE_CHANGES, TRAIN_CONFIG_NAME,
                                    TRAINER_STATE_NAME, LoopConfig, ScheduleExtension, learning_rate_at, run_settings)
from shared.training.folder import check_output_dir
from shared.errors import is_out_of_memory
from shared.training.session import TrainingSession

__all__ = ["BEST", "BestModel", "CHECKPOINTS", "LoopConfig", "METRICS_NAME", "RESUMABLE_CHANGES", "ScheduleExtension",
           "TRAINER_STATE_NAME", "TRAIN_CONFIG_NAME", "TrainingSession", "check_output_dir", "is_out_of_memory",
           "learning_rate_at", "list_checkpoints", "run_settings", "verify_checkpoint"]
