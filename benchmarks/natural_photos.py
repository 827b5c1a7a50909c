"""Tokenizer quality on natural RGB photographs (no download needed).

scikit-learn ships two photographs (china.jpg, flower.jpg, 427x640). This script cuts them into
32x32 crops: train/ from china.jpg (and its mirror image), test/ from flower.jpg, so the held-out
PSNR measures generalisation to an unseen photograph. Then it trains and evaluates a tokenizer.

    python benchmarks/natural_photos.py --output-dir runs/photos [--max-steps 1500]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image


def write_crops(root: Path, stride: int = 16, size: int = 32) -> None:
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    for split, photos in (("train", [china, china[:, ::-1]]), ("test", [flower])):
        folder = root / split / "photo"
        folder.mkdir(parents=True, exist_ok=True)
        count = 0
        for pixels in photos:
            image = Image.fromarray(pixels.copy())
            for top in range(0, image.height - size + 1, stride):
                for left in range(0, image.width - size + 1, stride):
                    image.crop((left, top, left + size, top + size)).save(folder / f"{count:05d}.png")
                    count += 1
        print(f"{split}: {count} crops")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=1500)
    args = parser.parse_args()
    output = Path(args.output_dir)
    crops = output / "crops"
    if not crops.exists():
        write_crops(crops)
    from stage1_vqvae.evaluate import evaluate
    from stage1_vqvae.train import train

    train(["--dataset", str(crops), "--output-dir", str(output / "tokenizer"), "--max-steps", str(args.max_steps),
           "--overwrite", "--no-progress", "--codebook-size", "512", "--eval-every", str(args.max_steps)])
    result = evaluate(["--tokenizer", str(output / "tokenizer"), "--dataset", str(crops), "--split", "test"])
    print(json.dumps({"held_out_psnr": result["psnr"], "held_out_ssim": result["ssim"],
                      "codebook_usage": result["codebook_usage"]}))


if __name__ == "__main__":
    main()
