"""Train a prior on a codes dataset:
`python -m stage2_prior.train --codes runs/codes --output-dir runs/prior [--arch pixelsnail]`.

On a two-level export pick the level, and for the bottom prior of VQ-VAE-2 the level it is
conditioned on: `--level top`, then `--level bottom --condition-level top`.

Same loop as stage 1 (shared.training): Accelerate, checkpoints, exact --resume, and the model of the
best validation step as the output (--keep-best, on by default). Validation reports bits per code
(mean NLL / ln 2; also bits per dimension for pixel codes) and top-1 accuracy next to the unigram
entropy of the validation codes. With a tokenizer (--tokenizer, or the one codes.json names), a
decoded sample grid is written to samples/ every --sample-every steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState

from shared.codes import CodesDataset, CodesMetadata, open_codes
from shared.config import add_field_argument, build_parser, config_from_args, parse_args, values_from_args
from shared.data import StepOrder, code_batches, held_out_indices, save_image_grid, shard_range
from shared.errors import UserError, run_cli
from shared.training import TrainingSession, check_output_dir, run_settings
from stage1_vqvae.metrics import codebook_statistics
from stage1_vqvae.tokenizer import load_tokenizer, tokenizer_class, tokenizer_for_codes
from stage2_prior.config import PriorConfig, Stage2TrainConfig, check_option_names, default_max_steps
from stage2_prior.prior import Prior
from stage2_prior.registry import ARCHS, arch_spec, option_owners
from stage2_prior.conditioning import encode_prompts
from stage2_prior.pretrained_text import check_encoder_folder, encoder_sha256
from stage2_prior.text import train_text_tokenizer

# PriorConfig fields that come from the codes, not from flags (the run's --level and --condition-level pick them)
FROM_CODES = frozenset({"vocab_size", "latent_shape", "num_classes", "depth", "condition_vocab_size",
                        "condition_shape", "tokenizer_sha256", "level", "condition_level", "scales", "text_tokenizer",
                        "text_encoder_sha256"})
SAMPLE_SEED = 1234
SAMPLES_PER_ROW = 8


def parser() -> argparse.ArgumentParser:
    parser = build_parser("Train a prior on a codes dataset (stage 2).", Stage2TrainConfig, PriorConfig,
                          skip=(FROM_CODES - {"level", "condition_level"}) | {"options"})
    parser._option_string_actions["--arch"].help = "the network: " + "; ".join(
        f"{name}: {spec.summary}" for name, spec in ARCHS.items()) + f" (default: {PriorConfig.arch})"
    added: set[str] = set()
    for spec in ARCHS.values():  # each arch's own options, one flag per name, its help naming the archs
        for field in dataclasses.fields(spec.options):
            if field.name not in added and field.metadata.get("flag", True):
                added.add(field.name)
                add_field_argument(parser, spec.options, field, f" [arch {', '.join(option_owners(field.name))}]")
    return parser


def arch_option_values(args: argparse.Namespace) -> dict:
    """The arch options given as flags, checked against the chosen arch: a flag of another arch names that arch."""
    arch = getattr(args, "arch", PriorConfig.arch)
    names = {field.name for spec in ARCHS.values() for field in dataclasses.fields(spec.options)}
    given = {name: getattr(args, name) for name in sorted(names) if hasattr(args, name)}
    known = {field.name for field in dataclasses.fields(arch_spec(arch).options)}
    check_option_names(arch, given, known, flags=True)
    return given


def view_for(codes: CodesDataset, config: Stage2TrainConfig, arch: str) -> CodesDataset:
    """What arch `arch` reads of an export: one level (and a condition level), or a pyramid's scales joined."""
    spec = arch_spec(arch)
    if spec.reads == "scales":
        if config.level is not None or config.condition_level is not None:
            raise UserError(f"arch {arch} models every scale of a pyramid at once: drop --level and --condition-level")
        return codes.pyramid_view()
    if codes.metadata.scales is not None:
        pyramid_archs = " or ".join(name for name, other in ARCHS.items() if other.reads == "scales")
        raise UserError(f"these codes are a multi-scale pyramid (scales {' '.join(map(str, codes.metadata.scales))}) "
                        f"and arch {arch} models one grid: use --arch {pyramid_archs}, or export a single-grid tokenizer")
    return codes.level_view(config.level, config.condition_level)


def load_codes(config: Stage2TrainConfig,
               arch: str = PriorConfig.arch) -> tuple[CodesDataset, CodesDataset, CodesMetadata]:
    """Training and validation codes (items: codes, label[, condition codes]) as `arch` reads them, and their
    metadata."""
    if not config.codes:
        raise UserError("--codes is required: a folder written by vqvae-export")
    codes, metadata = open_codes(config.codes)
    if config.condition_level is not None and config.condition_level == config.level:
        raise UserError(f"--condition-level {config.condition_level} is the level being modelled; condition the "
                        "bottom prior on the top level: --level bottom --condition-level top")
    codes = view_for(codes, config, arch)
    if config.validation_codes:
        validation, validation_meta = open_codes(config.validation_codes)
        if validation_meta.levels != metadata.levels:
            raise UserError(f"--validation-codes {config.validation_codes} do not match --codes (levels, vocabulary or "
                            "grid); export both with the same tokenizer")
        return codes, view_for(validation, config, arch), metadata
    kept, held_out = held_out_indices(len(codes), config.validation_fraction)
    return codes.subset(kept), codes.subset(held_out), metadata


def prior_config_for(args, train_config: Stage2TrainConfig, metadata: CodesMetadata,
                     train_codes: CodesDataset) -> PriorConfig:
    """The architecture from the flags, with the vocabulary, grids, classes and provenance from the codes."""
    pyramid = metadata.scales is not None and arch_spec(args.arch).reads == "scales"
    level = metadata.levels[-1] if pyramid else metadata.level(train_config.level)
    num_classes = None
    if train_config.conditional and metadata.has_labels:
        unlabelled = int((train_codes.labels < 0).sum())
        if unlabelled:
            raise UserError(f"{unlabelled} of the {len(train_codes)} training grids have no label; pass "
                            "--no-conditional for an unconditional prior, or export a fully labelled split")
        num_classes = metadata.num_classes or int(train_codes.labels.max()) + 1
    condition = metadata.level(train_config.condition_level) if train_config.condition_level else None
    values = values_from_args(PriorConfig, args, exclude=FROM_CODES)
    options = arch_option_values(args)
    if values.get("label_dropout", 0) > 0 and num_classes is None:
        raise UserError("--label-dropout trains an unconditional branch for classifier-free guidance and needs "
                        "labelled codes; drop it, or export a labelled split")
    shape = (1, sum(side * side for side in metadata.scales)) if pyramid else tuple(level.latent_shape)
    values.update(text_settings(args.arch if hasattr(args, "arch") else PriorConfig.arch, values, train_config,
                                train_codes))
    return PriorConfig(vocab_size=level.vocab_size, latent_shape=shape, depth=level.depth,
                       num_classes=num_classes,
                       condition_vocab_size=condition.vocab_size if condition else None,
                       condition_shape=condition.grid_shape if condition else None,
                       tokenizer_sha256=metadata.tokenizer_sha256, level=None if pyramid else level.name,
                       condition_level=condition.name if condition else None,
                       scales=tuple(metadata.scales) if pyramid else None, options=options, **values)


def text_settings(arch: str, values: dict, train_config: Stage2TrainConfig, train_codes: CodesDataset) -> dict:
    """The text encoder and caption tokenizer: a text-conditioned prior when the codes have captions and the arch
    reads text (--text-encoder none turns it off), its BPE trained on the training captions."""
    captions = train_codes.captions
    encoder = values.get("text_encoder", "transformer" if captions is not None and arch_spec(arch).text_encoders
                                         else None)
    if encoder is None:
        if captions is not None and "text_encoder" not in values:
            print(f"note: these codes have captions, and arch {arch} takes no text: the prior ignores them",
                  file=sys.stderr)
        return {"text_encoder": None}
    if captions is None:
        raise UserError(f"--text-encoder {encoder}: these codes have no captions; export a captioned source "
                        "(vqvae-export --caption-column ...), or drop --text-encoder")
    path = values.get("text_encoder_path")
    if path is not None:  # a pretrained encoder brings its own tokenizer
        check_encoder_folder(path)
        path = str(Path(path).expanduser().resolve())
        return {"text_encoder": encoder, "text_encoder_path": path, "text_encoder_sha256": encoder_sha256(path)}
    if train_config.text_vocab_size < 8:
        raise UserError(f"--text-vocab-size must be at least 8, got {train_config.text_vocab_size}")
    known = [caption for caption in captions if caption is not None]
    if not known:
        raise UserError("no training row has a caption; export a captioned source, or pass --text-encoder none")
    return {"text_encoder": encoder, "text_tokenizer": train_text_tokenizer(known, train_config.text_vocab_size)}


def with_captions(codes: CodesDataset, config: PriorConfig, strict: bool, what: str) -> CodesDataset:
    """The rows of `codes` that have a caption, with their token ids as the items' last element (rows without
    one are skipped with a warning, or refused with --strict-captions)."""
    if config.text_encoder is None:
        return codes
    if codes.captions is None:
        raise UserError(f"the {what} codes have no captions, and this prior is text-conditioned; export them from a "
                        "captioned source (or validate on a held-out fraction: drop --validation-codes)")
    missing = np.array([caption is None for caption in codes.captions], dtype=bool)
    if missing.any():
        if strict:
            raise UserError(f"{int(missing.sum())} of the {len(codes)} {what} rows have no caption; drop "
                            "--strict-captions to skip them, or export captions for every row")
        print(f"warning: {int(missing.sum())} of the {len(codes)} {what} rows have no caption and are skipped "
              "(--strict-captions refuses them)", file=sys.stderr)
        codes = codes.subset(np.flatnonzero(~missing))
    if not len(codes):
        raise UserError(f"no {what} row has a caption; export a captioned source, or pass --text-encoder none")
    return codes.with_text(encode_prompts(config, list(codes.captions)))


class TrainingObjective(torch.nn.Module):
    """The prior's mean negative log-likelihood as a module's forward, so that multi-process training
    (DDP) sees the call and all-reduces the gradients."""

    def __init__(self, prior: Prior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                condition: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
        return self.prior.training_loss(codes, labels, condition, prompt=text)

    def save_pretrained(self, directory) -> None:
        self.prior.save_pretrained(directory)


def train(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse flags, train, save; returns the validation metrics of the saved model."""
    args = parse_args(parser(), argv)
    train_config = config_from_args(Stage2TrainConfig, args)
    train_config.check()
    if train_config.sample_every < 1:
        raise UserError(f"--sample-every must be at least 1, got {train_config.sample_every}")
    check_output_dir(train_config)
    train_codes, validation_codes, metadata = load_codes(train_config, getattr(args, "arch", PriorConfig.arch))
    if train_config.max_steps is None:
        global_batch = train_config.batch_size * train_config.gradient_accumulation_steps * PartialState().num_processes
        train_config = dataclasses.replace(train_config, max_steps=default_max_steps(len(train_codes), global_batch))
    model_config = prior_config_for(args, train_config, metadata, train_codes)
    train_codes = with_captions(train_codes, model_config, train_config.strict_captions, "training")
    validation_codes = with_captions(validation_codes, model_config, train_config.strict_captions, "validation")
    tokenizer = load_tokenizer(train_config.tokenizer) if train_config.tokenizer else tokenizer_for_codes(metadata)
    if tokenizer is not None and train_config.tokenizer and tokenizer.weights_sha256() != metadata.tokenizer_sha256:
        raise UserError(f"--tokenizer {train_config.tokenizer} did not make these codes (its weights differ from the "
                        f"sha256 in codes.json, {metadata.tokenizer_sha256[:12]}...); pass the tokenizer that made them")

    session = TrainingSession(train_config, run_settings(train_config, model_config), "prior",
                              monitor=model_config.spec.model.validation_metric)
    accelerator = session.accelerator
    objective, _ = session.prepare(TrainingObjective(Prior.from_config(model_config)))
    if tokenizer is not None:
        tokenizer.to(session.device)
    start_step = session.restore()
    order = StepOrder(len(train_codes), train_config.batch_size, train_config.seed, accelerator.process_index,
                      accelerator.num_processes)
    conditional = model_config.num_classes is not None
    batches = code_batches(train_codes, order, start_step * train_config.gradient_accumulation_steps,
                           train_config.num_workers or 0, pin_memory=session.device.type == "cuda")

    def compute_loss(micro_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        codes, labels, condition, text = train_codes.parts(next(batches))
        codes = codes.to(session.device, non_blocking=True)  # (B, h, w[, D]) in the stored int type
        condition = condition.to(session.device) if condition is not None else None
        text = text.to(session.device) if text is not None else None  # (B, L) caption token ids
        loss = objective(codes, labels.to(session.device) if conditional else None, condition, text)
        return loss, {"bits": loss.item() / math.log(2)}

    def evaluate(step: int) -> dict[str, float]:
        metrics = prior_metrics(session.unwrapped_model.prior, validation_codes, conditional, session.device,
                                accelerator.process_index, accelerator.num_processes,
                                lambda t: accelerator.reduce(t, reduction="sum"))
        if tokenizer_class(metadata).codes_are_subpixels and "bits_per_code" in metrics:
            metrics["bits_per_dim"] = metrics["bits_per_code"]  # a code is one subpixel
        return metrics

    def save_samples(step: int) -> None:
        if tokenizer is None or not session.due(step, train_config.sample_every):
            return
        with session.model_to_save() as model:  # every process enters: with --fsdp it gathers the weights
            grid = (sample_grid(model.prior, tokenizer, SAMPLES_PER_ROW, validation_codes) if session.is_main
                    else None)
        if grid is not None:
            save_image_grid(grid, session.output_dir / "samples" / f"samples_{step:08d}.png", nrow=SAMPLES_PER_ROW)

    metrics = session.run(start_step, compute_loss, evaluate, after_step=save_samples)
    return session.finish_run(metrics)


@torch.no_grad()
def prior_metrics(model: Prior, codes: CodesDataset, conditional: bool, device: torch.device, rank: int = 0,
                  world_size: int = 1, reduce_sum=lambda t: t) -> dict[str, float]:
    """Bits per code (a masked prior: per hidden code, `masked_bits_per_code`), top-1 accuracy, and the unigram
    entropy of the codes (bits) over the whole split.
    A logistic-mixture head is scored by its own likelihood (no per-level table: K x M evaluations per
    subpixel made validating it slower than training) and reports no top-1 accuracy."""
    was_training = model.training
    model.eval()
    config = model.config
    mixture = config.head == "logistic_mixture"
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # codes, nll (nats), correct
    counts = torch.zeros(config.vocab_size, dtype=torch.float64, device=device)
    # batches whose logits stay near 128 MB (a 32x32 RGB pixel model has 3 x 256 logits per position)
    batch_size = max(1, min(256, 2 ** 25 // (config.vocab_size * config.num_positions * config.depth)))
    rows = shard_range(len(codes), rank, world_size)
    for start in range(rows.start, rows.stop, batch_size):
        indices = torch.arange(start, min(start + batch_size, rows.stop))
        grids, labels, condition, text = codes.parts(codes[indices])
        grids = grids.to(device)  # the stored int type; the model widens it in its embedding
        condition = condition.to(device) if condition is not None else None
        text = text.to(device) if text is not None else None
        labels = labels.to(device) if conditional else None
        targets = grids.long()
        if mixture:
            totals[1] += model.nll(grids, labels, condition, prompt=text).double() * targets.numel()  # mean per code
            totals[0] += targets.numel()
        else:  # masked priors score their hidden positions, at masks seeded by each row's index
            logits, weights = model.validation_scores(grids, labels, condition, indices, prompt=text)
            logits = logits.float()
            totals[1] += (F.cross_entropy(logits, targets, reduction="none") * weights).sum().double()
            totals[2] += ((logits.argmax(1) == targets) & weights).sum().double()
            totals[0] += weights.sum()
        counts += torch.bincount(targets.flatten(), minlength=config.vocab_size).double()
    model.train(was_training)
    totals, counts = reduce_sum(totals), reduce_sum(counts)
    unigram_bits = math.log2(codebook_statistics(counts)["perplexity"])
    bits = (totals[1] / totals[0]).item() / math.log(2)
    metrics = {model.validation_metric: bits, "unigram_entropy_bits": unigram_bits}
    if not mixture:
        metrics["top1_accuracy"] = (totals[2] / totals[0]).item()
    return metrics


def sample_grid(prior: Prior, tokenizer, per_row: int, validation: CodesDataset,
                seed: int = SAMPLE_SEED) -> torch.Tensor | None:
    """Decoded samples (N, C, H, W) in [-1, 1]: one row per class (at most 10) for a conditional prior.
    A level of a two-level tokenizer needs the other level to decode: a bottom prior is shown on the
    top codes of validation rows; a top prior alone gives no grid (None)."""
    num_classes = prior.config.num_classes
    labels = torch.arange(min(num_classes, 10)).repeat_interleave(per_row) if num_classes else None
    count = len(labels) if labels is not None else 4 * per_row
    condition = prompt = None
    rows = torch.arange(count) % len(validation)
    if prior.config.condition_level is not None:
        _, _, condition, _ = validation.parts(validation[rows])
    if prior.config.text_encoder is not None:  # the captions of validation rows, a row of samples each
        prompt = validation.parts(validation[torch.arange(count) // per_row % len(validation)])[3]
    if set(prior.level_names) | {prior.config.condition_level} - {None} != set(tokenizer.level_names):
        return None  # a top prior alone: nothing to decode
    levels = prior.split_levels(prior.sample(count, labels=labels, seed=seed, condition=condition, prompt=prompt))
    if condition is not None:
        levels[prior.config.condition_level] = condition
    device = next(iter(tokenizer.buffers())).device
    codes = {name: grid.to(device) for name, grid in levels.items()}
    codes = codes if len(codes) > 1 else next(iter(codes.values()))
    with torch.no_grad():
        return tokenizer.eval().decode(codes).cpu()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
