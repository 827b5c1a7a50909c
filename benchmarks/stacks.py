"""Autoregression inside a position: pixel-space models and residual quantization.

    python benchmarks/stacks.py pixels --output-dir runs/pixels [--steps 1500]
    python benchmarks/stacks.py rvq --output-dir runs/rvq [--steps 1000]

`pixels`: bits per dimension of a Gated PixelCNN over raw pixels, on the digits at 2, 4 and 256
levels (8x8 and 16x16 images), with the 256-way (K-way) softmax of PixelCNN and with the discretized
logistic mixture of PixelCNN++ (10 components; not for 2 levels); then 32x32 RGB crops of
scikit-image's photographs (the crops of `natural_photos.py`). Train on the train split, bits/dim on
the test split. Then cached vs naive sampling time of the RGB model.

`rvq`: the default tokenizer with residual VQ at depth 1, 2 and 4 (`--quantizer rvq
--num-quantizers D`): held-out PSNR against the bits each image costs (h * w * D * log2 codebook),
and the bits per code of a prior over the (h, w, D) stacks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_module  # noqa: E402

PRIOR = ["--num-layers", "8", "--hidden-channels", "60", "--dropout", "0.1", "--batch-size", "32",
         "--sample-every", str(10 ** 9), "--no-progress", "--overwrite"]


def export(output: Path, tokenizer: str, dataset: str, split: str, image_size: int) -> Path:
    folder = output / f"{Path(tokenizer).name if '/' in tokenizer else tokenizer.replace(':', '')}_{split}_{image_size}"
    if not (folder / "codes.json").is_file():
        run_module("stage1_vqvae.export", "--tokenizer", tokenizer, "--dataset", dataset, "--split", split,
                   "--image-size", str(image_size), "--output", str(folder), "--no-progress", "--overwrite")
    return folder


def pixel_prior(output: Path, name: str, train: Path, test: Path, steps: int, head: list[str]) -> tuple[dict, float]:
    return run_module("stage2_prior.train", "--codes", str(train), "--validation-codes", str(test), "--output-dir",
                      str(output / name), "--max-steps", str(steps), "--eval-every", str(max(1, steps // 5)),
                      "--save-every", str(steps), *PRIOR, *head)


def pixels(args: argparse.Namespace) -> None:
    output = Path(args.output_dir)
    rows = []
    for side in (8, 16) if args.digits else ():
        for levels in (2, 4, 256):
            train = export(output, f"pixels:{levels}", "digits", "train", side)
            test = export(output, f"pixels:{levels}", "digits", "test", side)
            heads = [("softmax", [])] + ([] if levels == 2 else [("mixture", ["--head", "logistic_mixture",
                                                                             "--mixtures", "10"])])
            for head, flags in heads:
                metrics, cpu = pixel_prior(output, f"digits{side}_{levels}_{head}", train, test, args.steps, flags)
                rows.append((f"digits {side}x{side}", levels, head, metrics["bits_per_dim"], cpu))
                print(rows[-1], flush=True)
    if args.photos:
        # validation/ (crops of the training photographs) picks the best step; test/ (other photographs) scores it
        crops = Path(args.photos)
        train, validation, test = (export(output, "pixels:256", str(crops), split, 32)
                                   for split in ("train", "validation", "test"))
        heads = {"softmax": [], "mixture": ["--head", "logistic_mixture", "--mixtures", "10"]}
        for head in args.photo_heads:
            _, cpu = pixel_prior(output, f"photos_{head}", train, validation, args.steps,
                                 ["--no-conditional", *heads[head]])
            rows.append(("photo crops 32x32 RGB", 256, head, held_out_bits_per_dim(output / f"photos_{head}", test), cpu))
            print(rows[-1], flush=True)
        if "mixture" in args.photo_heads:
            sampling_speed(output / "photos_mixture")
    print("\n| data | levels | head | bits/dim (test) | CPU s |")
    print("| --- | --- | --- | --- | --- |")
    for data, levels, head, bits, cpu in rows:
        print(f"| {data} | {levels} | {'softmax' if head == 'softmax' else 'logistic mixture (10)'} | {bits:.3f} | "
              f"{cpu:.0f} |")


def held_out_bits_per_dim(prior_dir: Path, codes_dir: Path) -> float:
    import torch

    from shared.codes import open_codes
    from stage2_prior import Prior
    from stage2_prior.train import prior_metrics

    prior = Prior.from_pretrained(prior_dir)
    codes, _ = open_codes(codes_dir)
    return prior_metrics(prior, codes, prior.config.num_classes is not None, torch.device("cpu"))["bits_per_code"]


def sampling_speed(prior_dir: Path) -> None:
    import torch

    from stage2_prior import Prior

    prior = Prior.from_pretrained(prior_dir)
    labels = 0 if prior.config.num_classes else None
    prior.sample(1, labels=labels, seed=0)  # warm-up
    for batch in (1, 16):
        started = time.perf_counter()
        prior.sample(batch, labels=labels, seed=0)
        cached = time.perf_counter() - started
        codes = torch.zeros(batch, *prior.code_shape, dtype=torch.long)
        double = prior.double()
        with torch.inference_mode():
            started = time.perf_counter()
            double(codes, labels)
            naive = (time.perf_counter() - started) * prior.config.num_positions * prior.config.depth
        prior.float()
        print(f"| RGB 32x32 pixel prior, batch {batch} | naive {naive:.0f} s (est) | cached {cached:.1f} s | "
              f"{naive / cached:.0f}x |", flush=True)


def rvq(args: argparse.Namespace) -> None:
    output = Path(args.output_dir)
    rows = []
    for depth in (1, 2, 4):
        tokenizer = output / f"rvq{depth}"
        metrics, _ = run_module("stage1_vqvae.train", "--output-dir", str(tokenizer), "--overwrite", "--quantizer",
                                "rvq", "--num-quantizers", str(depth), "--codebook-size", "256", "--max-steps",
                                str(args.steps), "--no-progress")
        train = export(output, str(tokenizer), "digits", "train", 32)
        test = export(output, str(tokenizer), "digits", "test", 32)
        prior, _ = run_module("stage2_prior.train", "--codes", str(train), "--validation-codes", str(test),
                              "--output-dir", str(output / f"prior{depth}"), "--max-steps", str(args.steps),
                              "--eval-every", str(max(1, args.steps // 5)), *PRIOR)
        bits_per_image = 8 * 8 * depth * math.log2(256)
        rows.append((depth, metrics["psnr"], bits_per_image, prior["bits_per_code"],
                     prior["bits_per_code"] * 8 * 8 * depth))
        print(json.dumps({"depth": depth, "psnr": metrics["psnr"], "bits_per_code": prior["bits_per_code"]}), flush=True)
    print("\n| RQ depth | held-out PSNR (dB) | code bits per image | prior bits/code | prior bits per image |")
    print("| --- | --- | --- | --- | --- |")
    for depth, psnr, budget, bits, per_image in rows:
        print(f"| {depth} | {psnr:.2f} | {budget:.0f} | {bits:.3f} | {per_image:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pixel_parser = commands.add_parser("pixels")
    pixel_parser.add_argument("--output-dir", required=True)
    pixel_parser.add_argument("--steps", type=int, default=1500)
    pixel_parser.add_argument("--photos", default=None,
                              help="the crops folder of natural_photos.py (train/, validation/, test/)")
    pixel_parser.add_argument("--photo-heads", nargs="+", default=["softmax", "mixture"], choices=["softmax", "mixture"],
                              help="the output heads of the photo rows (the mixture run also times sampling)")
    pixel_parser.add_argument("--digits", action=argparse.BooleanOptionalAction, default=True,
                              help="the digits rows (--no-digits: the photo rows only)")
    rvq_parser = commands.add_parser("rvq")
    rvq_parser.add_argument("--output-dir", required=True)
    rvq_parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    pixels(args) if args.command == "pixels" else rvq(args)


if __name__ == "__main__":
    main()
