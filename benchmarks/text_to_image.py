"""Text to image on the built-in shapes: caption accuracy of samples by the shapes checker, on seen and on
held-out compositions, for each text encoder and guidance scale, at equal training CPU time.

    python benchmarks/text_to_image.py --output-dir runs/text --cpu-seconds 300
    python benchmarks/text_to_image.py --output-dir runs/text --archs transformer maskgit --guidance 0 1 3
    (an existing <output>/tokenizer and <output>/codes are reused: e.g. the text quickstart's; so is an existing
    <output>/<arch>_<encoder> prior, which is then only measured, and <output>/features)
    python benchmarks/text_to_image.py --output-dir runs/text_data --train-images 60000 --cpu-seconds 2400
    (priors trained on 60,000 generated images: the built-in 6,000 and more from the same generator)

One VQ-VAE tokenizer on shapes (32x32 RGB, 256 codes, 8x8 grid) and its captioned export of the train
split; then for each arch (and text encoder), a prior trained for `--cpu-seconds` of CPU time (two short
runs measure the cost of a step), with caption dropout 0.1 for guidance. Prompts: the captions of the
first `--prompts` rows of the `test` split (seen compositions) and of the `heldout` split (each names a
blue triangle or a green circle, which no training caption does), `--samples` images each, at every
guidance scale. The checker (`shared.data.shapes.caption_matches`) scores each image: one object, or two
and their relation. FID, precision and recall (`pipelines.evaluate`, `--fid-images` samples prompted with the
test split's captions, against its 600 images) read the features of a classifier trained on shapes' `objects`
label (`pipelines.features`, <output>/features). Binding (`pipelines.captions.binding_gains`): how much more likely
each autoregressive prior finds the codes of test's two-thing images under their own captions than under the same
words bound otherwise (colours, shapes, sizes exchanged; the relation reversed). Everything goes to
<output>/results.json; the tables are printed as markdown, and
<output>/<arch>_guidance<g>.png shows a few prompts with their samples.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_module, steps_for_cpu_seconds  # noqa: E402

from pipelines import Pipeline  # noqa: E402
from pipelines.captions import binding_gains, caption_accuracy, refusals, save_prompt_grid  # noqa: E402
from shared.data.images import resize_and_centre_crop  # noqa: E402
from shared.data.sources import png_bytes  # noqa: E402
from shared.data.shapes import MISMATCHES, SPLIT_SIZES, SWAPS, parse_caption, shapes_split  # noqa: E402
from stage1_vqvae import load_tokenizer  # noqa: E402
from stage2_prior import ARCHS, Prior  # noqa: E402
from stage2_prior.registry import recipe_flags  # noqa: E402

TOKENIZER = ["--dataset", "shapes", "--codebook-size", "256", "--max-steps", "1000"]
COMMON = ["--dropout", "0.1", "--caption-dropout", "0.1", "--warmup-steps", "50", "--sample-every", "1000000"]
KINDS = ("single", "relation", "single_heldout", "relation_heldout")


def write_train_images(output: Path, count: int) -> str:
    """`count` training images and captions of the shapes generator as a save_to_disk dataset; its path."""
    folder = output / f"shapes_train_{count}"
    datasets.disable_progress_bars()
    if not (folder / "dataset_dict.json").exists():
        images, captions = shapes_split("train", count)
        encoded = [{"bytes": png_bytes(pixels), "path": None} for pixels in images]
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        table = datasets.Dataset.from_dict({"image": encoded, "text": captions}, features=features)
        staging = output / f".shapes_train_{count}.partial"  # renamed when whole: a killed run leaves no half set
        shutil.rmtree(staging, ignore_errors=True)
        datasets.DatasetDict({"train": table}).save_to_disk(str(staging))
        staging.rename(folder)
    return str(folder)


def shapes_batch(tokenizer, splits: tuple[str, ...], count: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` images of each split at the tokenizer's size (N, 3, H, W) in [-1, 1], and their captions."""
    images, captions = [], []
    for split in splits:
        pixels, texts = shapes_split(split, count)
        images += [resize_and_centre_crop(Image.fromarray(image), tokenizer.config.image_size) for image in pixels]
        captions += texts
    return torch.from_numpy(np.stack(images)).float().div(127.5).sub(1), captions


def relation_codes_of_test(tokenizer, count: int) -> tuple[torch.Tensor, list[str]]:
    """The codes of the two-thing images among the first `count` of `test`, and their captions (binding gains)."""
    batch, captions = shapes_batch(tokenizer, ("test",), count)
    rows = [row for row, caption in enumerate(captions) if parse_caption(caption)[1] is not None]
    with torch.no_grad():
        return tokenizer.encode(batch[rows]), [captions[row] for row in rows]


def reconstruction_accuracy(tokenizer, count: int) -> dict[str, float]:
    """The checker's accuracy on the tokenizer's reconstructions of the first `count` test and held-out images:
    what a prior could reach at best through this tokenizer."""
    batch, captions = shapes_batch(tokenizer, ("test", "heldout"), count)  # (N, 3, H, W) in [-1, 1]
    with torch.no_grad():
        decoded = tokenizer.decode(tokenizer.encode(batch))  # (N, 3, H, W) in [-1, 1]
    pixels = decoded.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return caption_accuracy(pixels, captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--cpu-seconds", type=float, default=300.0, help="training CPU time of each prior")
    parser.add_argument("--steps", type=int, default=None,
                        help="train each prior this many steps instead (no calibration): to repeat an earlier run's "
                             "steps when the machine is shared, where CPU time per step is inflated")
    parser.add_argument("--archs", nargs="+", default=["transformer"], help="text-conditioned archs to compare")
    parser.add_argument("--text-encoders", nargs="+", default=["transformer", "bpe"],
                        help="each arch runs with those of these it takes")
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--prompts", type=int, default=100, help="prompts from each of test and heldout")
    parser.add_argument("--samples", type=int, default=2, help="images per prompt")
    parser.add_argument("--tokenizer-steps", type=int, default=None)
    parser.add_argument("--train-images", type=int, default=None,
                        help="export this many generated training images instead of the built-in 6,000 (the same "
                             "generator and seed: the first 6,000 are the built-in ones)")
    parser.add_argument("--fid-images", type=int, default=600,
                        help="samples for FID against the test split, prompted with its captions (0: no FID)")
    parser.add_argument("--feature-steps", type=int, default=1500, help="training steps of the FID feature network")
    parser.add_argument("--prior-flags", default="", help='more flags for every prior, e.g. "--hidden-channels 128"')
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer_flags = TOKENIZER + (["--max-steps", str(args.tokenizer_steps)] if args.tokenizer_steps else [])
    tokenizer, codes = output / "tokenizer", output / "codes"
    if not (tokenizer / "model.safetensors").exists():
        tokenizer_metrics, _ = run_module("stage1_vqvae.train", "--output-dir", str(tokenizer), "--overwrite",
                                          *tokenizer_flags, "--no-progress")
    else:
        tokenizer_metrics = json.loads((tokenizer / "metrics.json").read_text())
    if (codes / "codes.json").exists():
        exported = json.loads((codes / "codes.json").read_text())["num_rows"]
        if exported != (args.train_images or SPLIT_SIZES["train"]):
            raise SystemExit(f"{codes} holds {exported} training images, not the {args.train_images or 'built-in'} "
                             "asked for: use another --output-dir, or --train-images as before")
    else:
        source = "shapes" if args.train_images is None else write_train_images(output, args.train_images)
        run_module("stage1_vqvae.export", "--tokenizer", str(tokenizer), "--dataset", source, "--output", str(codes),
                   "--no-progress")
    features = output / "features"
    if args.fid_images and not (features / "model.safetensors").exists():
        run_module("pipelines.features", "--dataset", "shapes", "--label-column", "objects", "--image-size", "32",
                   "--output-dir", str(features), "--overwrite", "--max-steps", str(args.feature_steps),
                   "--no-progress")
    earlier = json.loads((output / "results.json").read_text()) if (output / "results.json").exists() else {}
    prompts = [caption for split in ("test", "heldout") for caption in shapes_split(split, args.prompts)[1]]
    prompts = [prompt for prompt in prompts for _ in range(args.samples)]
    pairs = [(arch, encoder) for arch in args.archs for encoder in args.text_encoders
             if encoder in ARCHS[arch].text_encoders]  # MaskGIT and VAR read captions by cross-attention only
    retrained = [pair for pair in pairs if not (output / "_".join(pair) / "model.safetensors").exists()]
    # earlier rows stay unless this run measures them again (a pair and guidance) or retrains their prior
    kept = [run for run in earlier.get("runs", []) if (run["arch"], run["text_encoder"]) not in retrained
            and not ((run["arch"], run["text_encoder"]) in pairs and run["guidance"] in args.guidance)]
    results = {"tokenizer": {key: tokenizer_metrics.get(key) for key in ("psnr", "codebook_usage")}, "runs": kept}
    loaded_tokenizer = load_tokenizer(tokenizer)
    results["tokenizer"]["caption_accuracy"] = reconstruction_accuracy(loaded_tokenizer, args.prompts)
    relation_codes, relation_captions = relation_codes_of_test(loaded_tokenizer, args.prompts)
    for arch, encoder in pairs:
        name = f"{arch}_{encoder}"
        flags = ["--codes", str(codes), *recipe_flags(arch), "--text-encoder", encoder, *COMMON,
                 *shlex.split(args.prior_flags)]
        training = {"cpu_seconds": None if args.steps else args.cpu_seconds, "prior_flags": args.prior_flags,
                    "train_images": args.train_images or SPLIT_SIZES["train"]}
        if (arch, encoder) not in retrained:  # trained by an earlier run of this benchmark: reused as it was
            metrics = json.loads((output / name / "metrics.json").read_text())
            steps = json.loads((output / name / "train_config.json").read_text())["max_steps"]
            before = next((run for run in earlier.get("runs", [])
                           if (run["arch"], run["text_encoder"]) == (arch, encoder)), {})
            seconds = before.get("train_cpu_seconds", float("nan"))
            training = {key: before.get(key) for key in training}
        else:
            steps = args.steps or steps_for_cpu_seconds("stage2_prior.train", flags, output / f"calibrate_{name}",
                                                        args.cpu_seconds)
            metrics, seconds = run_module("stage2_prior.train", *flags, "--output-dir", str(output / name),
                                          "--overwrite", "--max-steps", str(steps), "--eval-every",
                                          str(max(1, steps // 4)), "--save-every", str(steps), "--no-progress")
        pipeline = Pipeline(loaded_tokenizer, Prior.from_pretrained(output / name), check_provenance=True)
        binding = (binding_gains(pipeline.prior, relation_codes, relation_captions)
                   if ARCHS[arch].family != "masked" else None)  # a masked prior has no exact log_prob
        if args.fid_images:  # a fresh copy: the prior may have been retrained since the last one
            shutil.rmtree(output / f"{name}_pipeline", ignore_errors=True)
            pipeline.save_pretrained(output / f"{name}_pipeline")
        for guidance in args.guidance:
            samples = pipeline.generate(len(prompts), prompt=prompts, seed=0, guidance_scale=guidance,
                                        output_type="pt", progress=False)
            images = samples.images.mul(255).round().byte().permute(0, 2, 3, 1).numpy()
            accuracy = caption_accuracy(images, prompts)
            picked = [index for index in range(0, len(prompts), max(1, len(prompts) // 8 // args.samples) * args.samples)][:8]
            rows = [index + offset for index in picked for offset in range(args.samples)]
            save_prompt_grid(samples.images[rows], [prompts[index] for index in rows], args.samples,
                             output / f"{name}_guidance{guidance:g}.png")
            quality = {}
            if args.fid_images:  # FID, precision and recall against the test split, prompted with its captions
                quality, _ = run_module("pipelines.evaluate", "--pipeline", str(output / f"{name}_pipeline"),
                                        "--dataset", "shapes", "--split", "test", "--features", str(features),
                                        "--num-images", str(args.fid_images), "--guidance-scale", str(guidance),
                                        "--no-progress")
            results["runs"].append({"arch": arch, "text_encoder": encoder, **training, "prompts": len(prompts),
                                    "steps": steps, "train_cpu_seconds":
                                    seconds, "bits_per_code": metrics.get("bits_per_code",
                                                                          metrics.get("masked_bits_per_code")),
                                    "guidance": guidance, "accuracy": accuracy,
                                    "refusals": refusals(images, prompts), "binding": binding,
                                    **{key: quality.get(key) for key in ("fid", "noise_floor_fid", "precision",
                                                                         "recall")}})
            print(f"{name} guidance {guidance:g}: {accuracy}", file=sys.stderr)
        (output / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Tokenizer reconstructions of {args.prompts} test and {args.prompts} held-out images: "
          f"{results['tokenizer']['caption_accuracy']}\n")
    print("| arch | text encoder | steps (CPU s) | bits/code | guidance | all | one object | relation | one object, "
          "held out | relation, held out | FID (floor) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in results["runs"]:
        scores = run["accuracy"]
        cells = " | ".join(f"{scores[kind]:.1%} ({scores['n_' + kind]})" if kind in scores else "-" for kind in KINDS)
        print(f"| {run['arch']} | {run['text_encoder']} | {run['steps']} ({run['train_cpu_seconds']:.0f}) | "
              f"{run['bits_per_code']:.2f} | {run['guidance']:g} | {scores['all']:.1%} | {cells} | "
              + (f"{run['fid']:.2f} ({run['noise_floor_fid']:.2f}) |" if run.get("fid") is not None else "- |"))
    print("\nSamples of seen relations the checker refused, by the first reason that applies:\n")
    print(f"| arch | text encoder | guidance | samples | {' | '.join(MISMATCHES)} |")
    print("| --- | --- | --- | --- |" + " --- |" * len(MISMATCHES))
    for run in results["runs"]:
        if "refusals" in run and "n_relation" in run["accuracy"]:
            count = run["accuracy"]["n_relation"]
            reasons = run["refusals"].get("relation", dict.fromkeys(MISMATCHES, 0))
            print(f"| {run['arch']} | {run['text_encoder']} | {run['guidance']:g} | {count} | "
                  f"{' | '.join(f'{reasons[reason] / count:.1%}' for reason in MISMATCHES)} |")

    print("\nBinding (`pipelines.captions.binding_gains`): the log-likelihood gain in nats of the two-thing codes of "
          "test under their own captions over the same words bound otherwise, and how often the caption wins:\n")
    print(f"| arch | text encoder | steps | {' | '.join(SWAPS)} |")
    print("| --- | --- | --- |" + " --- |" * len(SWAPS))
    printed = set()
    for run in results["runs"]:
        prior = (run["arch"], run["text_encoder"], run["steps"])
        if run.get("binding") is not None and prior not in printed:  # one prior's, whatever the guidance
            printed.add(prior)
            gains = run["binding"]
            print(f"| {' | '.join(map(str, prior))} | " + " | ".join(
                f"{gains[swap]:.1f} ({gains[swap + '_wins']:.0%}, {gains['n_' + swap]})" if swap in gains else "-"
                for swap in SWAPS) + " |")

if __name__ == "__main__":
    main()
