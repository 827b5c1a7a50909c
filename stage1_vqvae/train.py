"""Train the VQ-VAE tokenizer: `python -m stage1_vqvae.train --output-dir runs/tokenizer`.

Also runs under `accelerate launch -m stage1_vqvae.train ...` and `torchrun --nproc_per_node N -m ...`.
When it ends, --output-dir loads with `VQVAE.from_pretrained(output_dir)`.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import torch

from shared.config import build_parser, config_from_args, parse_args, values_from_args
from shared.data import CachedImages, StepOrder, load_train_and_validation, save_image_grid
from shared.errors import run_cli
from shared.runtime import is_launched_main
from shared.training import TrainingSession, run_settings
from stage1_vqvae.config import Stage1TrainConfig, VQVAEConfig
from stage1_vqvae.losses import PerceptualLoss, reconstruction_loss
from stage1_vqvae.metrics import reconstruction_metrics
from stage1_vqvae.model import VQVAE

METRICS_NAME = "metrics.json"
# Fields of VQVAEConfig that come from the data, not from their own flags.
DATA_DERIVED = frozenset({"in_channels", "image_size"})


def parser():
    # image_size is a data flag (declared first, so VQVAEConfig's duplicate gets none); in_channels comes from the data
    return build_parser("Train the VQ-VAE tokenizer (stage 1).", Stage1TrainConfig, VQVAEConfig,
                        skip=frozenset({"in_channels"}))


def train(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse flags, train, save; returns the final validation metrics."""
    args = parse_args(parser(), argv)
    train_config = config_from_args(Stage1TrainConfig, args)
    train_config.check()
    # Everything that can reject the input runs before anything is written.
    train_set, validation_set = load_train_and_validation(train_config)
    model_values = values_from_args(VQVAEConfig, args, exclude=DATA_DERIVED)
    model_config = VQVAEConfig(in_channels=train_set.channels, image_size=train_config.image_size, **model_values)
    perceptual = PerceptualLoss(train_config.perceptual_net) if train_config.perceptual_weight > 0 else None
    show = is_launched_main() and train_config.progress
    train_images = CachedImages(train_set, progress=show)
    validation_images = CachedImages(validation_set, progress=show)

    session = TrainingSession(train_config, run_settings(train_config, model_config), "vqvae")
    accelerator = session.accelerator
    model, _ = session.prepare(VQVAE(model_config))  # after Accelerator(): the codebook syncs across processes
    if perceptual is not None:
        perceptual.to(session.device)
    start_step = session.restore()
    order = StepOrder(len(train_images), train_config.batch_size, train_config.seed,
                      accelerator.process_index, accelerator.num_processes)

    def compute_loss(micro_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        images, _ = train_images.batch(order.indices(micro_batch))
        images = images.to(session.device)  # (B, C, H, W)
        output = model(images)
        loss = reconstruction_loss(train_config.reconstruction_loss, output.reconstruction, images)
        loss = loss + output.quantizer_loss
        if perceptual is not None:
            loss = loss + train_config.perceptual_weight * perceptual(output.reconstruction, images)
        usage = 100.0 * output.codes.unique().numel() / model_config.codebook_size
        return loss, {"usage": usage}

    def evaluate(step: int) -> dict[str, float]:
        return reconstruction_metrics(session.unwrapped_model, validation_images, 256, session.device,
                                      accelerator.process_index, accelerator.num_processes,
                                      reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"))

    def save_reconstructions(step: int) -> None:
        if not (session.is_main and session.due(step, train_config.eval_every)):
            return
        originals, _ = validation_images.batch(torch.arange(min(32, len(validation_images))))
        with torch.no_grad():
            unwrapped = session.unwrapped_model.eval()
            reconstructions = unwrapped(originals.to(session.device)).reconstruction.cpu()
        row_shape = (-1, 8, *originals.shape[1:])  # rows of 8: originals, then their reconstructions
        rows = torch.stack([originals.view(row_shape), reconstructions.view(row_shape)], 1)
        save_image_grid(rows.flatten(0, 2), session.output_dir / "samples" / f"reconstructions_{step:08d}.png", nrow=8)

    metrics = session.run(start_step, compute_loss, evaluate, after_step=save_reconstructions)
    session.finish({METRICS_NAME: metrics})
    if session.is_main:
        print(json.dumps({"output_dir": str(session.output_dir), **metrics}))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
