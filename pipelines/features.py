"""Train a feature network for sample quality on a dataset's train split:
`python -m pipelines.features --dataset digits --output-dir runs/digit-features`.

A small classifier (`pipelines.feature_network.FeatureNetwork`), trained with the shared loop (seeded,
checkpoints, exact --resume, the best validation step kept); its penultimate activations are the features
`pipelines.evaluate --features FOLDER` compares, and its predictions the class accuracy of
class-conditional samples. It prints and records (metrics.json) its held-out accuracy.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipelines.feature_network import FeatureNetwork, FeatureNetworkConfig
from shared.config import build_parser, config_from_args, parse_args
from shared.data import (CachedImages, DataConfig, StepOrder, first_image_channels, load_train_and_validation,
                         open_source, resolve_num_workers, sequential_batches, should_cache, training_batches)
from shared.errors import UserError, run_cli
from shared.runtime import local_process_count
from shared.training import LoopConfig, TrainingSession, check_output_dir, run_settings


@dataclasses.dataclass(frozen=True)
class FeaturesTrainConfig(LoopConfig, DataConfig):
    """A feature network's training run (train_config.json)."""

    width: int = 16
    max_steps: int = 400
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    eval_every: int = 100
    save_every: int = 200


def parser():
    return build_parser("Train a feature network (a small classifier) for FID and class accuracy.",
                        FeaturesTrainConfig)


def accuracy_and_loss(network: FeatureNetwork, data, device: torch.device, num_workers: int) -> dict[str, float]:
    network.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for batch in sequential_batches(data, range(len(data)), 256, num_workers):
            logits = network(batch.images(device))
            labels = batch.labels.to(device)
            correct += int((logits.argmax(1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    return {"accuracy": correct / count, "error_rate": 1 - correct / count, "loss": loss / count}


def train(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(parser(), argv)
    config = config_from_args(FeaturesTrainConfig, args)
    config.check()
    config.check_data_flags()
    check_output_dir(config)
    source = open_source(config)
    if source.label_names is None and source.label_column is None:
        raise UserError(f"{config.dataset} has no labels, and a feature network is a classifier: pass a labelled "
                        "dataset (class subfolders, or --label-column; for shapes, --label-column objects)")
    channels = first_image_channels(source, config.split, config.channels)
    train_set, validation_set = load_train_and_validation(config, source, channels)
    if not train_set.has_labels:
        raise UserError(f"no row of {config.dataset} [{config.split}] has a label; pass a labelled split")
    num_classes = len(source.label_names) if source.label_names else int(train_set.labels.max()) + 1
    model_config = FeatureNetworkConfig(in_channels=channels, image_size=config.image_size, num_classes=num_classes,
                                        width=config.width, dataset=config.dataset)
    session = TrainingSession(config, run_settings(config, model_config), "features", monitor="error_rate")
    network, _ = session.prepare(FeatureNetwork(model_config))
    workers = resolve_num_workers(config.num_workers, local_process_count())
    train_data = CachedImages(train_set, workers) if should_cache(train_set, config.cache_images) else train_set
    validation_data = (CachedImages(validation_set, workers) if should_cache(validation_set, config.cache_images)
                       else validation_set)
    start = session.restore()
    order = StepOrder(len(train_set), config.batch_size, config.seed, session.accelerator.process_index,
                      session.accelerator.num_processes)
    batches = training_batches(train_data, order, start * config.gradient_accumulation_steps, workers,
                               pin_memory=session.device.type == "cuda")

    def compute_loss(micro_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = next(batches)
        logits = network(batch.images(session.device))
        return F.cross_entropy(logits, batch.labels.to(session.device)), {}

    def evaluate(step: int) -> dict[str, float]:
        return accuracy_and_loss(session.unwrapped_model, validation_data, session.device, workers)

    metrics = session.run(start, compute_loss, evaluate)
    metrics["held_out_accuracy"] = metrics["accuracy"]
    if session.is_main:
        print(f"held-out accuracy {metrics['accuracy']:.2%} (step {metrics.get('best_step')})", file=sys.stderr)
    return session.finish_run(metrics)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
