"""The whole chain on the built-in digits, in one command:
`python -m pipelines.quickstart --output-dir runs/quickstart`.

Trains the tokenizer, exports the codes, trains a class-conditional prior, saves a pipeline, and
writes samples.png (one row per digit) and reconstructions.png. About 4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipelines.pipeline import Pipeline
from shared.config import parse_args
from shared.data import DataConfig, load_split, save_image_grid
from shared.errors import UserError, run_cli
from stage1_vqvae.export import export
from stage1_vqvae.pixels import load_tokenizer
from stage1_vqvae.train import train as train_tokenizer
from stage2_prior.prior import Prior
from stage2_prior.train import train as train_prior

PARTS = ("tokenizer", "codes", "prior", "pipeline", "samples.png", "reconstructions.png")
# (tokenizer flags, prior flags): the full recipe, and a seconds-long one for tests.
RECIPES = {
    "full": (["--max-steps", "1000", "--codebook-size", "256"],
             ["--max-steps", "800", "--num-layers", "10", "--dropout", "0.25", "--warmup-steps", "50",
              "--eval-every", "400", "--save-every", "400", "--sample-every", "400"]),
    "fast": (["--max-steps", "30", "--image-size", "16", "--hidden-channels", "16", "--latent-channels", "8",
              "--num-res-blocks", "1", "--codebook-size", "32", "--eval-every", "30", "--save-every", "30"],
             ["--max-steps", "20", "--hidden-channels", "16", "--num-layers", "4", "--eval-every", "20",
              "--save-every", "20", "--sample-every", "20"]),
}
SAMPLES_PER_CLASS = 10


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="tiny models and a few steps (for tests)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing quickstart folder")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def quickstart(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(parser(), argv)
    output = Path(args.output_dir).resolve()
    if output.exists() and any(output.iterdir()):
        if not args.overwrite:
            raise UserError(f"{output} is not empty; pass --overwrite to replace it or choose another --output-dir")
        for part in PARTS:
            target = output / part
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    started = time.perf_counter()
    tokenizer_flags, prior_flags = RECIPES["fast" if args.fast else "full"]
    common = ["--seed", str(args.seed)] + ([] if args.progress else ["--no-progress"])

    print("[1/4] training the tokenizer", file=sys.stderr)
    tokenizer_metrics = train_tokenizer(["--output-dir", str(output / "tokenizer"), *tokenizer_flags, *common])
    print("[2/4] exporting the codes", file=sys.stderr)
    export(["--tokenizer", str(output / "tokenizer"), "--output", str(output / "codes"),
            *([] if args.progress else ["--no-progress"])])
    print("[3/4] training the class-conditional prior", file=sys.stderr)
    prior_metrics = train_prior(["--codes", str(output / "codes"), "--output-dir", str(output / "prior"),
                                 *prior_flags, *common])
    print("[4/4] saving the pipeline and drawing samples", file=sys.stderr)
    pipeline = Pipeline(load_tokenizer(output / "tokenizer"), Prior.from_pretrained(output / "prior"))
    pipeline.save_pretrained(output / "pipeline")
    labels = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)  # one row per digit
    samples = pipeline.generate(len(labels), labels=labels.tolist(), seed=args.seed, output_type="pt",
                                progress=args.progress)
    save_image_grid(samples.images.mul(2).sub(1), output / "samples.png", nrow=SAMPLES_PER_CLASS)
    test_set = load_split(DataConfig(dataset="digits", split="test", image_size=pipeline.tokenizer.config.image_size))
    originals = torch.stack([test_set[index][0] for index in range(SAMPLES_PER_CLASS * 2)])
    reconstructions = pipeline.reconstruct(originals).cpu()
    row_shape = (2, SAMPLES_PER_CLASS, *originals.shape[1:])  # a row of originals, then their reconstructions
    pairs = torch.stack([originals.view(row_shape), reconstructions.view(row_shape)], 1)
    save_image_grid(pairs.flatten(0, 2), output / "reconstructions.png", nrow=SAMPLES_PER_CLASS)

    summary = {
        "output_dir": str(output), "seconds": time.perf_counter() - started,
        "tokenizer": {"psnr_db": tokenizer_metrics["psnr"], "codebook_usage_percent": tokenizer_metrics["codebook_usage"],
                      "perplexity": tokenizer_metrics["perplexity"]},
        "prior": {"bits_per_code": prior_metrics["bits_per_code"],
                  "unigram_entropy_bits": prior_metrics["unigram_entropy_bits"],
                  "top1_accuracy": prior_metrics["top1_accuracy"]},
        "files": {part: str(output / part) for part in PARTS},
    }
    print(f"\nDone in {summary['seconds']:.0f} s. Pipeline: {output / 'pipeline'}\n"
          f"  samples: {output / 'samples.png'} (one row per digit 0-9)\n"
          f"  reconstructions: {output / 'reconstructions.png'} (originals above reconstructions)\n"
          f"  tokenizer: PSNR {tokenizer_metrics['psnr']:.1f} dB, "
          f"codebook usage {tokenizer_metrics['codebook_usage']:.1f}%\n"
          f"  prior: {prior_metrics['bits_per_code']:.2f} bits per code "
          f"(unigram entropy {prior_metrics['unigram_entropy_bits']:.2f})", file=sys.stderr)
    print(json.dumps(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(quickstart, argv)


if __name__ == "__main__":
    sys.exit(main())
