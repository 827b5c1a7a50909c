"""FID of a pipeline's samples against a dataset split, as one JSON line:
`python -m pipelines.evaluate --pipeline DIR --dataset digits --split test --num-images 1000`.

The reference images are read at the tokenizer's size and channel count, as the generated ones
come out. Both sets go through the FID Inception network of `stage1_vqvae.fid` (weights from
--inception-weights or $TORCH_HOME/hub/checkpoints; nothing is downloaded). Image k of the samples
is a function of (--seed, k), as with `pipelines.generate`, so the number is reproducible. FID is
biased upwards for small sets (Chong & Forsyth 2020): compare numbers taken with the same
--num-images and the same reference split.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from pipelines.pipeline import Pipeline
from shared.config import parse_args
from shared.data import (first_image_channels, load_split, open_source, resolve_num_workers, sequential_batches,
                         warn_substituted)
from shared.errors import UserError, run_cli
from stage1_vqvae.evaluate import add_fid_arguments, add_source_arguments, data_config_for
from stage1_vqvae.fid import FrechetDistance


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="FID of a pipeline's samples against a dataset split.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="a pipeline folder (Pipeline.save_pretrained)")
    add_source_arguments(parser, default_split="test")
    parser.add_argument("--num-images", type=int, default=1000, help="samples to generate (at least 2)")
    add_fid_arguments(parser)
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="one class for every sample, or one per sample (default: classes drawn from the seed)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--guidance-scale", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="samples and reference images per batch")
    parser.add_argument("--strict-images", action="store_true",
                        help="stop at an unreadable reference image; without it such an image is replaced by the next "
                             "readable row (which then counts twice) and the replacements are counted")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def evaluate(argv: Sequence[str] | None = None) -> dict:
    """Parse flags, generate, compare; returns (and prints) the result."""
    args = parse_args(parser(), argv)
    if args.num_images < 2:
        raise UserError(f"--num-images must be at least 2 (FID compares covariances), got {args.num_images}")
    # every check that can refuse the run comes before the first sample: pipeline, data, weights
    pipeline = Pipeline.from_pretrained(args.pipeline)
    tokenizer = pipeline.tokenizer
    data_config = data_config_for(args, tokenizer, args.strict_images)
    source = open_source(data_config)
    channels = first_image_channels(source, args.split, data_config.channels,
                                    fix=f"this pipeline makes {tokenizer.config.in_channels}-channel images")
    labels = args.labels[0] if args.labels and len(args.labels) == 1 else args.labels
    pipeline.resolve_labels(args.num_images, labels, args.seed)  # checks --labels
    fid = FrechetDistance(args.inception_weights, pipeline.device)
    dataset = load_split(data_config, source=source, channels=channels)
    started = time.perf_counter()
    problems: list[str] = []
    num_workers = resolve_num_workers(args.num_workers)
    for batch in sequential_batches(dataset, range(len(dataset)), args.batch_size, num_workers):
        problems.extend(batch.problems)
        fid.add(batch.images(pipeline.device), real=True)
    for images, _ in pipeline.iter_generate(args.num_images, labels=labels, temperature=args.temperature,
                                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                            batch_size=args.batch_size, progress=args.progress,
                                            guidance_scale=args.guidance_scale):
        fid.add(images.mul(2).sub(1), real=False)  # (b, C, H, W) [0, 1] -> [-1, 1]
    warn_substituted(problems)
    result = {"pipeline": str(args.pipeline), "dataset": args.dataset, "split": args.split, "fid": fid.compute(),
              "num_images": args.num_images, "num_reference_images": fid.num_real, "corrupt_images": len(problems),
              "seed": args.seed, "seconds": time.perf_counter() - started}
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
