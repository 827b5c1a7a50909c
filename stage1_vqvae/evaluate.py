"""Reconstruction metrics of a trained tokenizer as one JSON line:
`python -m stage1_vqvae.evaluate --tokenizer DIR --dataset digits --split test`.

PSNR and SSIM (torchmetrics), codebook usage and perplexity always; LPIPS and rFID (the FID of the
reconstructions against the originals) when their weights are on this machine."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from shared.config import parse_args
from shared.data import (DataConfig, check_num_workers, first_image_channels, load_split, open_source,
                         resolve_num_workers, warn_substituted)
from shared.errors import UserError, run_cli
from stage1_vqvae.fid import FrechetDistance, inception_weights_file
from stage1_vqvae.losses import PerceptualLoss
from stage1_vqvae.metrics import SSIM_WINDOW, reconstruction_metrics
from stage1_vqvae.tokenizer import load_tokenizer


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer folder")
    add_source_arguments(parser, default_split="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--strict-images", action="store_true",
                        help="stop at an unreadable image; without it such an image is replaced by the next readable "
                             "row (which then counts twice) and the replacements are counted")
    parser.add_argument("--perceptual-net", default="alex", choices=["alex", "vgg", "squeeze"],
                        help="LPIPS backbone; LPIPS is reported when its weights are on this machine")
    add_fid_arguments(parser)
    parser.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                        help="report rFID when the Inception weights are found (--no-fid skips it: on a CPU it "
                             "costs about a second per image)")
    return parser


def add_fid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's FID Inception weights (weights-inception-2015-12-05-6726825d.pth); "
                             "default: that file in $TORCH_HOME/hub/checkpoints")


def add_source_arguments(parser: argparse.ArgumentParser, default_split: str) -> None:
    """The flags that pick images for evaluate and export (training takes them from DataConfig)."""
    parser.add_argument("--dataset", default="digits",
                        help="digits, shapes, an image folder, a save_to_disk folder or a Hub name")
    parser.add_argument("--split", default=default_split)
    parser.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--label-column", default=None, help="label column; 'none' turns labels off")
    parser.add_argument("--caption-column", default=None,
                        help="caption column of a datasets source or of an image folder's metadata.jsonl (default: "
                             "'text' when present); 'none' turns captions off")
    parser.add_argument("--strict-captions", action="store_true",
                        help="refuse rows with an empty or non-string caption instead of warning")
    parser.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset")
    parser.add_argument("--revision", default=None, help="revision of a Hub dataset")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader worker processes (default: the CPUs per process, at most 8)")


def data_config_for(args: argparse.Namespace, tokenizer, strict: bool) -> DataConfig:
    """The DataConfig that reads `args`' images at the tokenizer's size and channel count."""
    check_num_workers(args.num_workers)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    image_size = args.image_size or tokenizer.config.image_size
    tokenizer.check_images(torch.zeros(1, tokenizer.config.in_channels, image_size, image_size))
    return DataConfig(dataset=args.dataset, split=args.split, image_size=image_size,
                      channels=tokenizer.config.in_channels, image_column=args.image_column,
                      label_column=args.label_column, caption_column=args.caption_column,
                      strict_captions=args.strict_captions, dataset_config=args.dataset_config,
                      revision=args.revision, strict_images=strict)


def evaluate(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(parser(), argv)
    tokenizer = load_tokenizer(args.tokenizer)
    data_config = data_config_for(args, tokenizer, args.strict_images)
    source = open_source(data_config)
    channels = first_image_channels(source, args.split, data_config.channels,
                                    fix=f"this tokenizer takes {tokenizer.config.in_channels}-channel images")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fid = None
    if args.fid and (args.inception_weights is not None or inception_weights_file().is_file()):
        fid = FrechetDistance(args.inception_weights, device)  # a file that is there must work: no skipping
    elif args.fid:
        print(f"note: rFID skipped: its Inception weights {inception_weights_file().name} are not in "
              f"{inception_weights_file().parent}; copy them there or pass --inception-weights PATH", file=sys.stderr)
    try:
        perceptual = PerceptualLoss(args.perceptual_net)
    except UserError as missing:
        print(f"note: LPIPS skipped: {missing}", file=sys.stderr)
        perceptual = None
    with_ssim = data_config.image_size >= SSIM_WINDOW
    if not with_ssim:
        print(f"note: SSIM skipped: its {SSIM_WINDOW}x{SSIM_WINDOW} window does not fit {data_config.image_size}px "
              "images", file=sys.stderr)
    dataset = load_split(data_config, source=source, channels=channels)
    tokenizer.to(device)
    if perceptual is not None:
        perceptual.to(device)
    problems: list[str] = []
    num_workers = resolve_num_workers(args.num_workers)
    metrics = reconstruction_metrics(tokenizer, dataset, args.batch_size, device, perceptual=perceptual,
                                     with_ssim=with_ssim, num_workers=num_workers, report_problems=problems.extend,
                                     fid=fid)
    warn_substituted(problems)
    result = {"tokenizer": str(args.tokenizer), "dataset": args.dataset, "split": args.split,
              "num_images": len(dataset), "corrupt_images": len(problems), **metrics}
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
