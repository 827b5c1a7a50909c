"""Tokenizers on natural photographs, at equal CPU time, measured on photographs never trained on.

    python benchmarks/natural_photos.py --output-dir runs/photos --cpu-seconds 600

scikit-image ships a dozen photographs (no download). 32x32 crops of six of them form train/
(astronaut, coffee, chelsea, rocket, hubble deep field, immunohistochemistry, stride 16, each with
its mirror image); every tenth crop position of those goes to validation/ instead (model selection
and the training curve), and non-overlapping crops of two other photographs form test/ (the stereo
motorcycle, the retina): held-out PSNR and SSIM measure generalisation to unseen photographs. Each
recipe trains for `--cpu-seconds` of CPU time (two short runs measure the cost of a step), then
`vqvae-evaluate` scores it on test/.
LPIPS needs the AlexNet trunk weights, which cannot be downloaded here; with them in
$TORCH_HOME/hub/checkpoints it is reported too.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_module, steps_for_cpu_seconds  # noqa: E402

TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
TEST_PHOTOS = ("stereo_motorcycle", "retina")
CROP, TRAIN_STRIDE, TEST_STRIDE = 32, 16, 32
VALIDATION_EVERY = 10  # every tenth crop position of the training photos validates
# name -> tokenizer flags; "default" is today's `vqvae-train` with a photo-sized codebook
RECIPES = {
    "vqvae (default)": ["--codebook-size", "512"],
    "vqvae, 1024 l2 codes of dim 8": ["--codebook-size", "1024", "--codebook-dim", "8", "--use-cosine-sim"],
    "vqvae, 1024 simvq codes": ["--quantizer", "simvq", "--codebook-size", "1024"],
    "vqgan, 1024 l2 codes of dim 8": ["--arch", "vqgan", "--hidden-channels", "32", "--num-res-blocks", "1",
                                      "--channel-mult", "1", "2", "2", "--codebook-size", "1024", "--codebook-dim", "8",
                                      "--use-cosine-sim"],
    "vqgan + discriminator": ["--arch", "vqgan", "--hidden-channels", "32", "--num-res-blocks", "1",
                              "--channel-mult", "1", "2", "2", "--codebook-size", "1024", "--codebook-dim", "8",
                              "--use-cosine-sim", "--discriminator-weight", "0.1", "--discriminator-layers", "2",
                              "--discriminator-start", "{half}"],  # {half}: half the steps
}  # `--preset photos` is "vqvae, 1024 l2 codes of dim 8" (stage1_vqvae/train.py PRESETS; docs/benchmarks.md says why)


def photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return image[0] if isinstance(image, tuple) else image  # the stereo pair: its left image


def write_crops(root: Path, by_photo: bool = False) -> None:
    """train/, validation/ and test/ crops under `root`, replacing whatever an earlier layout left there; in one
    class folder, or with `by_photo` one class per photograph (the labels of a feature network)."""
    shutil.rmtree(root, ignore_errors=True)
    counts = {"train": 0, "validation": 0, "test": 0}
    current = {"name": "photo"}

    def save(split: str, crop: Image.Image) -> None:
        folder = root / split / (current["name"] if by_photo else "photo")
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{counts[split]:06d}.png")
        counts[split] += 1

    for names, stride, held_out in ((TRAIN_PHOTOS, TRAIN_STRIDE, False), (TEST_PHOTOS, TEST_STRIDE, True)):
        for name in names:
            current["name"] = name
            pixels = photo(name)  # (H, W, 3) uint8
            source = Image.fromarray(pixels)
            positions = [(top, left) for top in range(0, pixels.shape[0] - CROP + 1, stride)
                         for left in range(0, pixels.shape[1] - CROP + 1, stride)]
            for index, (top, left) in enumerate(positions):
                crop = source.crop((left, top, left + CROP, top + CROP))
                if held_out:
                    save("test", crop)
                    continue
                # a crop and its mirror image share a split: neither orientation of a validation crop is trained on
                split = "validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
                save(split, crop)
                save(split, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    print(", ".join(f"{split}: {count} crops" for split, count in counts.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--cpu-seconds", type=float, default=600.0, help="training CPU time per recipe")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    output = Path(args.output_dir)
    crops = output / "crops"
    if not (crops / "validation").exists():
        write_crops(crops)
    rows = []
    for name in args.recipes:
        folder = output / name.split(" (")[0].replace(" ", "_").replace(",", "").replace("+", "plus")
        flags = ["--dataset", str(crops), *RECIPES[name]]
        steps = steps_for_cpu_seconds("stage1_vqvae.train", [flag.format(half=1) for flag in flags],
                                      output / "calibration", args.cpu_seconds)
        flags = [flag.format(half=steps // 2) for flag in flags]
        metrics, cpu = run_module("stage1_vqvae.train", *flags, "--output-dir", str(folder), "--overwrite",
                                  "--max-steps", str(steps), "--eval-every", str(max(1, steps // 4)), "--save-every",
                                  str(steps), "--no-progress")
        held_out, _ = run_module("stage1_vqvae.evaluate", "--tokenizer", str(folder), "--dataset", str(crops),
                                 "--split", "test")
        held_out["codebook_size"] = json.loads((folder / "config.json").read_text())["codebook_size"]
        rows.append((name, steps, cpu, held_out, metrics))
        print(json.dumps({"recipe": name, "steps": steps, "cpu_seconds": cpu, **held_out}), flush=True)
    print("\n| recipe | steps | CPU s | held-out PSNR (dB) | SSIM | LPIPS | codebook usage | rFID |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, steps, cpu, held_out, _ in rows:
        lpips = f"{held_out['lpips']:.3f}" if "lpips" in held_out else "n/a"
        rfid = f"{held_out['rfid']:.1f}" if "rfid" in held_out else "n/a"
        print(f"| {name} | {steps} | {cpu:.0f} | {held_out['psnr']:.2f} | {held_out['ssim']:.3f} | {lpips} | "
              f"{held_out['codebook_usage']:.1f}% of {held_out['codebook_size']} | {rfid} |")


if __name__ == "__main__":
    main()
