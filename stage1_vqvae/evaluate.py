"""Reconstruction metrics of a trained tokenizer as one JSON line:
`python -m stage1_vqvae.evaluate --tokenizer DIR --dataset digits --split test`."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from shared.config import parse_args
from shared.data import DataConfig, load_split
from shared.errors import UserError, run_cli
from stage1_vqvae.losses import PerceptualLoss
from stage1_vqvae.metrics import reconstruction_metrics
from stage1_vqvae.model import VQVAE


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer folder")
    parser.add_argument("--dataset", default="digits", help="digits, an image folder, a save_to_disk folder or a Hub name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--perceptual-net", default="alex", choices=["alex", "vgg", "squeeze"],
                        help="LPIPS backbone; LPIPS is reported when its weights are on this machine")
    return parser


def evaluate(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(parser(), argv)
    tokenizer = VQVAE.from_pretrained(args.tokenizer)
    data_config = DataConfig(dataset=args.dataset, split=args.split,
                             image_size=args.image_size or tokenizer.config.image_size,
                             channels=tokenizer.config.in_channels, image_column=args.image_column,
                             label_column=args.label_column)
    dataset = load_split(data_config)
    tokenizer.check_images(torch.zeros(1, tokenizer.config.in_channels, data_config.image_size, data_config.image_size))
    try:
        perceptual = PerceptualLoss(args.perceptual_net)
    except UserError as missing:
        print(f"note: LPIPS skipped: {missing}", file=sys.stderr)
        perceptual = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer.to(device)
    if perceptual is not None:
        perceptual.to(device)
    metrics = reconstruction_metrics(tokenizer, dataset, args.batch_size, device, perceptual=perceptual,
                                     with_ssim=True)
    result = {"tokenizer": str(args.tokenizer), "dataset": args.dataset, "split": args.split,
              "num_images": len(dataset), **metrics}
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
