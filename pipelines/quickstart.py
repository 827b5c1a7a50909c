"""The whole chain on the built-in digits, in one command:
`python -m pipelines.quickstart --output-dir runs/quickstart`.

Trains the tokenizer, exports the codes, trains a class-conditional prior, saves a pipeline, and
writes samples.png (one row per digit) and reconstructions.png. About 4 minutes on 2 CPU cores.

`--levels 2` runs VQ-VAE-2 instead: a two-level tokenizer (top 4x4 and bottom 8x8 codes for 32x32
digits), a PixelSNAIL prior over the top codes and a Gated PixelCNN over the bottom codes
conditioned on the top, chained in one pipeline.

`--family var`: VAR, a multi-scale tokenizer (scales 1 2 3 4 6 8 of an 8x8 latent) and a next-scale
prior, 6 network passes per image. `--family maskgit`: the VQ-VAE tokenizer and a MaskGIT prior that
fills the 8x8 grid in 8 rounds.

`--dataset shapes`: text to image. A tokenizer of the captioned shapes (RGB), and a transformer prior
conditioned on the captions (a text encoder read by cross-attention, caption dropout for guidance);
samples.png shows prompts beside their samples, seen and held-out compositions, and the summary gives
their caption accuracy by the shapes checker.
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

from pipelines.captions import caption_accuracy, save_prompt_grid
from pipelines.pipeline import Pipeline
from shared.config import parse_args
from shared.data import DataConfig, load_split, save_image_grid
from shared.errors import UserError, run_cli
from stage1_vqvae.export import export
from stage1_vqvae.tokenizer import load_tokenizer
from stage1_vqvae.train import train as train_tokenizer
from stage2_prior.prior import Prior
from stage2_prior.train import train as train_prior

PARTS = ("tokenizer", "codes", "prior", "prior_top", "prior_bottom", "pipeline", "samples.png", "reconstructions.png")
# The full recipes and seconds-long ones for tests: tokenizer flags, then (folder, prior flags) per level.
PRIOR_FULL = ["--max-steps", "800", "--num-layers", "10", "--dropout", "0.25", "--warmup-steps", "50",
              "--eval-every", "200", "--save-every", "400", "--sample-every", "400"]
PRIOR_FAST = ["--max-steps", "20", "--hidden-channels", "16", "--num-layers", "4", "--eval-every", "20",
              "--save-every", "20", "--sample-every", "20"]
TOKENIZER_FAST = ["--max-steps", "30", "--image-size", "16", "--hidden-channels", "16", "--latent-channels", "8",
                  "--num-res-blocks", "1", "--codebook-size", "32", "--eval-every", "30", "--save-every", "30"]
# VAR and MaskGIT: 64 channels (a VAR step covers 130 codes and costs about three MaskGIT steps), steps that
# keep each quickstart near 10 minutes on 2 CPU cores (docs/benchmarks.md)
TRANSFORMER_FULL = ["--num-layers", "6", "--num-heads", "4", "--dropout", "0.1", "--label-dropout", "0.1",
                    "--warmup-steps", "50", "--eval-every", "250", "--save-every", "500", "--sample-every", "500"]
TRANSFORMER_FAST = ["--hidden-channels", "16", "--num-layers", "2", "--num-heads", "2", "--max-steps", "20",
                    "--label-dropout", "0.1", "--eval-every", "20", "--save-every", "20", "--sample-every", "20"]
RECIPES = {
    ("var", "full"): (["--quantizer", "multiscale", "--scales", "1", "2", "3", "4", "6", "8", "--max-steps", "800",
                       "--codebook-size", "256"], [("prior", ["--arch", "var", "--max-steps", "700",
                                                              *TRANSFORMER_FULL])]),
    ("var", "fast"): (["--quantizer", "multiscale", "--scales", "1", "2", "4", *TOKENIZER_FAST],
                      [("prior", ["--arch", "var", *TRANSFORMER_FAST])]),
    ("maskgit", "full"): (["--max-steps", "1000", "--codebook-size", "256"],
                          [("prior", ["--arch", "maskgit", "--max-steps", "1500", *TRANSFORMER_FULL])]),
    ("maskgit", "fast"): (TOKENIZER_FAST, [("prior", ["--arch", "maskgit", *TRANSFORMER_FAST])]),
    (1, "full"): (["--max-steps", "1000", "--codebook-size", "256"], [("prior", PRIOR_FULL)]),
    (1, "fast"): (TOKENIZER_FAST, [("prior", PRIOR_FAST)]),
    (2, "full"): (["--levels", "2", "--max-steps", "1000", "--codebook-size", "256"],
                  # the top grid has 16 positions: a smaller PixelSNAIL, fewer steps, more dropout
                  [("prior_top", ["--level", "top", "--arch", "pixelsnail", "--num-layers", "6", "--attention-every",
                                  "2", "--max-steps", "400", "--dropout", "0.3", "--warmup-steps", "50",
                                  "--eval-every", "100", "--save-every", "400", "--sample-every", "400"]),
                   ("prior_bottom", ["--level", "bottom", "--condition-level", "top", *PRIOR_FULL])]),
    (2, "fast"): (["--levels", "2", *TOKENIZER_FAST],
                  [("prior_top", ["--level", "top", "--arch", "pixelsnail", "--attention-every", "2", *PRIOR_FAST]),
                   ("prior_bottom", ["--level", "bottom", "--condition-level", "top", *PRIOR_FAST])]),
}
SAMPLES_PER_CLASS = 10
# Text to image on shapes: 32x32 RGB, the same tokenizer recipe; a transformer with a text encoder
TEXT_PRIOR_FULL = ["--arch", "transformer", "--num-layers", "6", "--num-heads", "4", "--dropout", "0.1",
                   "--caption-dropout", "0.1", "--max-steps", "1200", "--warmup-steps", "50", "--eval-every", "300",
                   "--save-every", "600", "--sample-every", "600"]
TEXT_PRIOR_FAST = ["--arch", "transformer", "--hidden-channels", "16", "--num-layers", "2", "--num-heads", "2",
                   "--text-layers", "1", "--caption-dropout", "0.1", "--max-steps", "20", "--eval-every", "20",
                   "--save-every", "20", "--sample-every", "20"]
# (about 10 minutes on 2 CPU cores; a run of 1,000 tokenizer and 1,500 prior steps took 16: docs/benchmarks.md)
RECIPES[("shapes", "full")] = (["--dataset", "shapes", "--max-steps", "600", "--codebook-size", "256"],
                               [("prior", TEXT_PRIOR_FULL)])
RECIPES[("shapes", "fast")] = (["--dataset", "shapes", *TOKENIZER_FAST], [("prior", TEXT_PRIOR_FAST)])
# the picture's prompts: one object and relations, seen and held-out (blue triangles, green circles) compositions
PROMPTS = ("a large red circle", "a small yellow square", "a large green triangle", "a small blue circle",
           "a large blue triangle", "a small green circle",
           "a small red square left of a large yellow circle", "a large blue square above a small red triangle",
           "a large green circle right of a small yellow square")
SAMPLES_PER_PROMPT = 8
# The picture's guidance scale on text: 1 drew the most captions right after 9,444 steps (docs/benchmarks.md, Binding);
# after the quickstart's 1,200 steps 0 (36%) and 1 (31%) beat 3 (24%).
GUIDANCE = 1.0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--levels", type=int, default=1, choices=[1, 2],
                        help="1: VQ-VAE + Gated PixelCNN; 2: VQ-VAE-2 with a PixelSNAIL top prior and a bottom prior "
                             "conditioned on the top codes")
    parser.add_argument("--dataset", default="digits", choices=["digits", "shapes"],
                        help="digits: class-conditional; shapes: text-conditional (prompts), raster family only")
    parser.add_argument("--family", default="raster", choices=["raster", "var", "maskgit"],
                        help="raster: priors drawing one code at a time (--levels); var: a multi-scale tokenizer and "
                             "next-scale prediction; maskgit: masked decoding in rounds")
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
    if args.family != "raster" and args.levels != 1:
        raise UserError(f"--levels 2 is VQ-VAE-2's raster chain; --family {args.family} has one level: drop --levels")
    if args.dataset == "shapes" and (args.family != "raster" or args.levels != 1):
        raise UserError("--dataset shapes trains one text-conditioned transformer: drop --family and --levels")
    started = time.perf_counter()
    family = "shapes" if args.dataset == "shapes" else args.levels if args.family == "raster" else args.family
    tokenizer_flags, prior_recipes = RECIPES[(family, "fast" if args.fast else "full")]
    common = ["--seed", str(args.seed)] + ([] if args.progress else ["--no-progress"])
    steps = 3 + len(prior_recipes)

    print(f"[1/{steps}] training the tokenizer", file=sys.stderr)
    tokenizer_metrics = train_tokenizer(["--output-dir", str(output / "tokenizer"), *tokenizer_flags, *common])
    print(f"[2/{steps}] exporting the codes", file=sys.stderr)
    export(["--tokenizer", str(output / "tokenizer"), "--output", str(output / "codes"), "--dataset", args.dataset,
            *([] if args.progress else ["--no-progress"])])
    prior_metrics = {}
    for index, (folder, flags) in enumerate(prior_recipes):
        what = "text" if args.dataset == "shapes" else "class"
        print(f"[{3 + index}/{steps}] training the {what}-conditional prior {folder}", file=sys.stderr)
        prior_metrics[folder] = train_prior(["--codes", str(output / "codes"), "--output-dir", str(output / folder),
                                             *flags, *common])
    print(f"[{steps}/{steps}] saving the pipeline and drawing samples", file=sys.stderr)
    pipeline = Pipeline(load_tokenizer(output / "tokenizer"),
                        [Prior.from_pretrained(output / folder) for folder, _ in prior_recipes])
    pipeline.save_pretrained(output / "pipeline")
    accuracy = None
    if args.dataset == "shapes":  # a row per prompt, its caption accuracy by the shapes checker
        prompts = [prompt for prompt in PROMPTS for _ in range(SAMPLES_PER_PROMPT)]
        samples = pipeline.generate(len(prompts), prompt=prompts, seed=args.seed, output_type="pt",
                                    guidance_scale=GUIDANCE, progress=args.progress)
        save_prompt_grid(samples.images, prompts, SAMPLES_PER_PROMPT, output / "samples.png")
        images = samples.images.mul(255).round().byte().permute(0, 2, 3, 1).numpy()
        accuracy = caption_accuracy(images, prompts)
    else:
        labels = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)  # one row per digit
        samples = pipeline.generate(len(labels), labels=labels.tolist(), seed=args.seed, output_type="pt",
                                    progress=args.progress)
        save_image_grid(samples.images.mul(2).sub(1), output / "samples.png", nrow=SAMPLES_PER_CLASS)
    held_out = "heldout" if args.dataset == "shapes" else "test"
    test_set = load_split(DataConfig(dataset=args.dataset, split=held_out,
                                     image_size=pipeline.tokenizer.config.image_size))
    originals = torch.stack([test_set[index][0] for index in range(SAMPLES_PER_CLASS * 2)])
    reconstructions = pipeline.reconstruct(originals).cpu()
    row_shape = (2, SAMPLES_PER_CLASS, *originals.shape[1:])  # a row of originals, then their reconstructions
    pairs = torch.stack([originals.view(row_shape), reconstructions.view(row_shape)], 1)
    save_image_grid(pairs.flatten(0, 2), output / "reconstructions.png", nrow=SAMPLES_PER_CLASS)

    summary = {
        "output_dir": str(output), "dataset": args.dataset, "family": args.family, "levels": args.levels,
        "seconds": time.perf_counter() - started,
        "tokenizer": {"psnr_db": tokenizer_metrics["psnr"], "codebook_usage_percent": tokenizer_metrics["codebook_usage"],
                      "perplexity": tokenizer_metrics["perplexity"]},
        "priors": {folder: {**{name: metrics[name] for name in ("bits_per_code", "masked_bits_per_code") if name in metrics},
                            "unigram_entropy_bits": metrics["unigram_entropy_bits"],
                            "top1_accuracy": metrics.get("top1_accuracy"), "best_step": metrics.get("best_step")}
                   for folder, metrics in prior_metrics.items()},
        "files": {part: str(output / part) for part in PARTS if (output / part).exists()},
    }
    if len(prior_metrics) == 1:
        summary["prior"] = next(iter(summary["priors"].values()))
    if accuracy is not None:
        summary["caption_accuracy"] = accuracy
    prior_lines = "\n".join(f"  {folder}: {describe_prior(metrics)}" for folder, metrics in prior_metrics.items())
    rows = "one row per digit 0-9" if accuracy is None else (
        f"one row per prompt, guidance {GUIDANCE:g}; caption accuracy {accuracy['all']:.0%}")
    print(f"\nDone in {summary['seconds']:.0f} s. Pipeline: {output / 'pipeline'}\n"
          f"  samples: {output / 'samples.png'} ({rows})\n"
          f"  reconstructions: {output / 'reconstructions.png'} (originals above reconstructions)\n"
          f"  tokenizer: PSNR {tokenizer_metrics['psnr']:.1f} dB, "
          f"codebook usage {tokenizer_metrics['codebook_usage']:.1f}%\n{prior_lines}", file=sys.stderr)
    print(json.dumps(summary))
    return summary


def describe_prior(metrics: dict) -> str:
    if "bits_per_code" in metrics:
        return f"{metrics['bits_per_code']:.2f} bits per code (unigram entropy {metrics['unigram_entropy_bits']:.2f})"
    return (f"{metrics['masked_bits_per_code']:.2f} bits per hidden code (masked prediction; unigram entropy "
            f"{metrics['unigram_entropy_bits']:.2f})")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(quickstart, argv)


if __name__ == "__main__":
    sys.exit(main())
