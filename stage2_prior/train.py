"""Train the prior on a codes dataset:
`python -m stage2_prior.train --codes runs/codes --output-dir runs/prior`.

Same loop as stage 1 (shared.training): Accelerate, checkpoints, exact --resume. Validation reports
bits per code (mean NLL / ln 2) and top-1 accuracy next to the unigram entropy of the validation
codes. With a tokenizer (--tokenizer, or the one codes.json names), a decoded sample grid is
written to samples/ every --sample-every steps.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.codes import CodesDataset, CodesMetadata, find_tokenizer, open_codes
from shared.config import build_parser, config_from_args, parse_args, values_from_args
from shared.data import StepOrder, code_batches, held_out_indices, save_image_grid, shard_range
from shared.errors import UserError, run_cli
from shared.training import TrainingSession, run_settings
from stage1_vqvae.metrics import codebook_statistics
from stage1_vqvae.model import VQVAE
from stage2_prior.config import PriorConfig, Stage2TrainConfig
from stage2_prior.prior import Prior

METRICS_NAME = "metrics.json"
FROM_CODES = frozenset({"vocab_size", "latent_shape", "num_classes", "depth", "condition_vocab_size",
                        "condition_shape"})
SAMPLE_SEED = 1234
SAMPLES_PER_ROW = 8


def parser():
    return build_parser("Train an autoregressive prior on a codes dataset (stage 2).", Stage2TrainConfig,
                        PriorConfig, skip=FROM_CODES)


def load_codes(config: Stage2TrainConfig) -> tuple[CodesDataset, CodesDataset, CodesMetadata, VQVAE | None]:
    """Training and validation codes, their metadata, and the tokenizer for sample grids (or None)."""
    if not config.codes:
        raise UserError("--codes is required: a folder written by vqvae-export")
    tokenizer_dir = Path(config.tokenizer) if config.tokenizer else None
    codes, metadata = open_codes(config.codes)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = VQVAE.from_pretrained(tokenizer_dir)
        if tokenizer.config.codebook_size != metadata.vocab_size or tokenizer.latent_shape != tuple(metadata.latent_shape):
            raise UserError(f"--tokenizer {tokenizer_dir} has codebook size {tokenizer.config.codebook_size} and latent "
                            f"shape {tokenizer.latent_shape}, the codes have {metadata.vocab_size} and "
                            f"{tuple(metadata.latent_shape)}; pass the tokenizer that made the codes")
    elif (found := find_tokenizer(metadata)) is not None:
        tokenizer = VQVAE.from_pretrained(found)
    if config.validation_codes:
        validation, validation_meta = open_codes(config.validation_codes)
        if (validation_meta.vocab_size, validation_meta.latent_shape) != (metadata.vocab_size, metadata.latent_shape):
            raise UserError(f"--validation-codes {config.validation_codes} do not match --codes (vocab size or grid); "
                            "export both with the same tokenizer")
        return codes, validation, metadata, tokenizer
    kept, held_out = held_out_indices(len(codes), config.validation_fraction)
    return codes.subset(torch.from_numpy(kept)), codes.subset(torch.from_numpy(held_out)), metadata, tokenizer


def train(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse flags, train, save; returns the final validation metrics."""
    args = parse_args(parser(), argv)
    train_config = config_from_args(Stage2TrainConfig, args)
    train_config.check()
    if train_config.sample_every < 1:
        raise UserError(f"--sample-every must be at least 1, got {train_config.sample_every}")
    train_codes, validation_codes, metadata, tokenizer = load_codes(train_config)
    num_classes = None
    if train_config.conditional and metadata.has_labels:
        unlabelled = int((train_codes.labels < 0).sum())
        if unlabelled:
            raise UserError(f"{unlabelled} of the {len(train_codes)} training grids have no label; pass "
                            "--no-conditional for an unconditional prior, or export a fully labelled split")
        num_classes = metadata.num_classes or int(train_codes.labels.max()) + 1
    model_values = values_from_args(PriorConfig, args, exclude=FROM_CODES)
    model_config = PriorConfig(vocab_size=metadata.vocab_size, latent_shape=tuple(metadata.latent_shape),
                               num_classes=num_classes, **model_values)

    session = TrainingSession(train_config, run_settings(train_config, model_config), "prior")
    accelerator = session.accelerator
    objective, _ = session.prepare(TrainingObjective(Prior.from_config(model_config)))
    if tokenizer is not None:
        tokenizer.to(session.device)
    start_step = session.restore()
    order = StepOrder(len(train_codes), train_config.batch_size, train_config.seed, accelerator.process_index,
                      accelerator.num_processes)
    conditional = num_classes is not None
    batches = code_batches(train_codes, order, start_step * train_config.gradient_accumulation_steps,
                           train_config.num_workers or 0, pin_memory=session.device.type == "cuda")

    def compute_loss(micro_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        codes, labels = next(batches)
        codes = codes.to(session.device, non_blocking=True)  # (B, h, w) in the stored int type
        loss = objective(codes, labels.to(session.device) if conditional else None)
        return loss, {"bits": loss.item() / math.log(2)}

    def evaluate(step: int) -> dict[str, float]:
        return prior_metrics(session.unwrapped_model.prior, validation_codes, conditional, session.device,
                             accelerator.process_index, accelerator.num_processes,
                             lambda t: accelerator.reduce(t, reduction="sum"))

    def save_samples(step: int) -> None:
        if tokenizer is None or not (session.is_main and session.due(step, train_config.sample_every)):
            return
        grid = sample_grid(session.unwrapped_model.prior, tokenizer, SAMPLES_PER_ROW)
        save_image_grid(grid, session.output_dir / "samples" / f"samples_{step:08d}.png", nrow=SAMPLES_PER_ROW)

    metrics = session.run(start_step, compute_loss, evaluate, after_step=save_samples)
    session.finish({METRICS_NAME: metrics})
    if session.is_main:
        print(json.dumps({"output_dir": str(session.output_dir), **metrics}))
    return metrics


class TrainingObjective(torch.nn.Module):
    """The prior's mean negative log-likelihood as a module's forward, so that multi-process training
    (DDP) sees the call and all-reduces the gradients."""

    def __init__(self, prior: Prior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.prior.nll(codes, labels, condition)

    def save_pretrained(self, directory) -> None:
        self.prior.save_pretrained(directory)


@torch.no_grad()
def prior_metrics(model: Prior, codes: CodesDataset, conditional: bool, device: torch.device, rank: int = 0,
                  world_size: int = 1, reduce_sum=lambda t: t, batch_size: int = 256) -> dict[str, float]:
    """Bits per code, top-1 accuracy, and the unigram entropy of the codes (bits) over the whole split."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # positions, nll (nats), correct
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float64, device=device)
    rows = shard_range(len(codes), rank, world_size)
    for start in range(rows.start, rows.stop, batch_size):
        grids, labels = codes[torch.arange(start, min(start + batch_size, rows.stop))]
        grids = grids.to(device)  # the stored int type; the model widens it in its embedding
        logits = model(grids, labels.to(device) if conditional else None).float()
        grids = grids.long()
        totals[0] += grids.numel()
        totals[1] += F.cross_entropy(logits, grids, reduction="sum").double()
        totals[2] += (logits.argmax(1) == grids).sum().double()
        counts += torch.bincount(grids.flatten(), minlength=model.config.vocab_size).double()
    model.train(was_training)
    totals, counts = reduce_sum(totals), reduce_sum(counts)
    unigram_bits = math.log2(codebook_statistics(counts)["perplexity"])
    bits = (totals[1] / totals[0]).item() / math.log(2)
    return {"bits_per_code": bits, "top1_accuracy": (totals[2] / totals[0]).item(), "unigram_entropy_bits": unigram_bits}


def sample_grid(prior: Prior, tokenizer: VQVAE, per_row: int, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """Decoded samples (N, C, H, W) in [-1, 1]: one row per class (at most 10) for a conditional prior."""
    num_classes = prior.config.num_classes
    if num_classes:
        labels = torch.arange(min(num_classes, 10)).repeat_interleave(per_row)
        codes = prior.sample(len(labels), labels=labels, seed=seed)
    else:
        codes = prior.sample(4 * per_row, seed=seed)
    with torch.no_grad():
        return tokenizer.eval().decode(codes.to(next(tokenizer.parameters()).device)).cpu()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
