"""The pictures in docs/: written from trained runs, so that each shows what a command produces.

    python benchmarks/figures.py occlusion --prior runs/pixels/digits16_256_softmax --output docs/images/occlusion.png
    python benchmarks/figures.py pipeline --pipeline runs/quickstart2/pipeline --output docs/images/vqvae2_samples.png
    python benchmarks/figures.py reconstructions --tokenizers runs/photos/vqvae runs/photos/vqgan ... \\
        --dataset runs/photos/crops --output docs/images/photo_reconstructions.png

occlusion: held-out digits with their bottom half removed, completed by a pixel-space prior
(`Pipeline.complete` keeps every known pixel): rows of originals, occluded inputs, then three
completions each, as in the PixelCNN article's occlusion figure.
pipeline: one row per digit of class-conditional samples.
reconstructions: held-out crops (top row), then one row per tokenizer.
"""
from __future__ import annotations

import argparse

import torch


def occlusion(args: argparse.Namespace) -> None:
    from pipelines import Pipeline
    from shared.data import DataConfig, load_split, save_image_grid
    from stage1_vqvae import load_tokenizer
    from stage2_prior import Prior

    prior = Prior.from_pretrained(args.prior)
    side = prior.config.latent_shape[0]
    tokenizer = load_tokenizer(f"pixels:{prior.config.vocab_size}", channels=1, image_size=side)
    pipeline = Pipeline(tokenizer, prior)
    test = load_split(DataConfig(dataset="digits", image_size=side), "test")
    picks = [next(i for i in range(len(test)) if test.labels[i] == digit) for digit in range(args.columns)]
    originals = torch.stack([test[i][0] for i in picks])  # (n, 1, S, S) in [-1, 1]
    labels = torch.tensor([int(test.labels[i]) for i in picks])
    known = torch.zeros(len(picks), side, side, dtype=torch.bool)
    known[:, :side // 2] = True  # the top half is kept
    occluded = torch.where(known[:, None], originals, torch.full_like(originals, -1.0))
    rows = [originals.add(1).div(2), occluded.add(1).div(2)]
    for seed in range(3):
        rows.append(pipeline.complete(originals, known, labels=labels if prior.config.num_classes else None,
                                      seed=seed).images)
    save_image_grid(torch.cat(rows).mul(2).sub(1), args.output, nrow=len(picks))


def samples(args: argparse.Namespace) -> None:
    from pipelines import Pipeline
    from shared.data import save_image_grid

    pipeline = Pipeline.from_pretrained(args.pipeline, device="cpu")
    labels = torch.arange(10).repeat_interleave(args.columns)
    out = pipeline.generate(len(labels), labels=labels.tolist(), seed=0, output_type="pt", progress=False)
    save_image_grid(out.images.mul(2).sub(1), args.output, nrow=args.columns)


def reconstructions(args: argparse.Namespace) -> None:
    from shared.data import DataConfig, load_split, save_image_grid
    from stage1_vqvae import load_tokenizer

    test = load_split(DataConfig(dataset=args.dataset, image_size=32), "test")
    images = torch.stack([test[i][0] for i in range(len(test))])  # (N, C, H, W)
    # columns spread over the crops ranked by contrast, from flat to busy (evenly spaced crops of a
    # large flat photograph would all look alike)
    ranked = images.flatten(1).std(1).argsort()
    originals = images[ranked[torch.linspace(0, len(test) - 1, args.columns).long()]]
    rows = [originals]
    with torch.no_grad():
        for folder in args.tokenizers:
            rows.append(load_tokenizer(folder).eval()(originals).reconstruction)
    save_image_grid(torch.cat(rows), args.output, nrow=args.columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("occlusion")
    one.add_argument("--prior", required=True)
    one.add_argument("--columns", type=int, default=10)
    one.add_argument("--output", required=True)
    two = commands.add_parser("pipeline")
    two.add_argument("--pipeline", required=True)
    two.add_argument("--columns", type=int, default=10)
    two.add_argument("--output", required=True)
    three = commands.add_parser("reconstructions")
    three.add_argument("--tokenizers", nargs="+", required=True)
    three.add_argument("--dataset", required=True)
    three.add_argument("--columns", type=int, default=12)
    three.add_argument("--output", required=True)
    args = parser.parse_args()
    {"occlusion": occlusion, "pipeline": samples, "reconstructions": reconstructions}[args.command](args)


if __name__ == "__main__":
    main()
