"""The families side by side: raster priors, MaskGIT on the same codes and VAR on its own tokenizer, at equal
training CPU time, on the digits and on 32x32 photo crops.

    python benchmarks/families.py --output-dir runs/families --cpu-seconds 300
    python benchmarks/families.py --output-dir runs/families --datasets digits --priors gated var maskgit

Per dataset: a VQ-VAE tokenizer (the codes of the raster priors and of MaskGIT) and a multi-scale one
(VAR's; the same flags, `--quantizer multiscale --scales 1 2 3 4 6 8`), each trained the same steps; a
feature network (`python -m pipelines.features`: digit classes, or for the crops the photograph a crop
comes from); then every prior, with its arch's benchmark recipe (64 channels; `--label-dropout 0.1`
for the guidance sweep), trained for `--cpu-seconds` of CPU time (two short runs measure the cost of a
step). Each is saved as a pipeline and scored by `pipelines.evaluate`: FID with its noise floor,
precision and recall, class accuracy, over `--num-images` samples against the held-out split.
Sequential network passes per image come from `SamplingStats`; wall time per image (decoding included)
at batch 1 and 64 is the fastest of two runs, on whatever else the machine runs (read it as a ratio).
A guidance sweep (scales 0, 1.5, 3; constant and linear) on VAR, MaskGIT and the transformer follows.
Everything goes to <output>/results.json; the tables are printed as markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_module, steps_for_cpu_seconds  # noqa: E402
from natural_photos import write_crops  # noqa: E402

from pipelines import Pipeline  # noqa: E402
from pipelines.evaluate import evaluate  # noqa: E402
from shared.data import save_image_grid  # noqa: E402
from stage1_vqvae import load_tokenizer  # noqa: E402
from stage2_prior import Prior  # noqa: E402
from stage2_prior.registry import recipe_flags  # noqa: E402

SCALES = ["1", "2", "3", "4", "6", "8"]
# dataset -> (dataset flags, tokenizer flags, reference split for FID)
DATASETS = {
    "digits": ([], ["--codebook-size", "256", "--max-steps", "1000"], "test"),
    # not --preset photos: its cosine-similarity codes of 8 dimensions cannot code VAR's residuals
    "photos": (["--dataset", "{crops}"], ["--codebook-size", "1024", "--max-steps", "1500"], "validation"),
}
PRIORS = ("gated", "pixelsnail", "transformer", "maskgit", "var")
COMMON = ["--dropout", "0.1", "--label-dropout", "0.1", "--warmup-steps", "50", "--sample-every", "1000000"]
SWEEP = [("constant", 1.5), ("constant", 3.0), ("linear", 1.5), ("linear", 3.0)]


def timed_per_image(pipeline: Pipeline, count: int, batch: int, labels: list[int] | None) -> float:
    """Seconds per image of `pipeline.generate`, the faster of two runs."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        pipeline.generate(count, labels=None if labels is None else labels[:count], seed=0, batch_size=batch,
                          progress=False, output_type="pt")
        best = min(best, time.perf_counter() - started)
    return best / count


def prepare(output: Path, dataset: str, tokenizer_steps: int | None,
            feature_steps: int | None) -> tuple[list[str], dict[str, Path], Path]:
    """The dataset flags, the two tokenizers' codes folders and the feature network of `dataset`."""
    data_flags, tokenizer_flags, _ = DATASETS[dataset]
    if tokenizer_steps is not None:
        tokenizer_flags = [*tokenizer_flags, "--max-steps", str(tokenizer_steps), "--eval-every", str(tokenizer_steps)]
    crops = output / "crops"
    if dataset == "photos" and not (crops / "validation").exists():
        write_crops(crops, by_photo=True)
    data_flags = [flag.format(crops=crops) for flag in data_flags]
    codes = {}
    for kind, extra in (("grid", []), ("pyramid", ["--quantizer", "multiscale", "--scales", *SCALES])):
        tokenizer, codes[kind] = output / f"tokenizer_{kind}", output / f"codes_{kind}"
        if not (tokenizer / "model.safetensors").exists():
            run_module("stage1_vqvae.train", "--output-dir", str(tokenizer), "--overwrite", *data_flags,
                       *tokenizer_flags, *extra, "--no-progress")
        if not (codes[kind] / "codes.json").exists():
            run_module("stage1_vqvae.export", "--tokenizer", str(tokenizer), *data_flags, "--output", str(codes[kind]),
                       "--no-progress")
    features = output / "features"
    if not (features / "model.safetensors").exists():
        steps = [] if feature_steps is None else ["--max-steps", str(feature_steps), "--eval-every", str(feature_steps)]
        run_module("pipelines.features", *data_flags, "--output-dir", str(features), "--overwrite", *steps,
                   "--no-progress")
    return data_flags, codes, features


def measure(output: Path, dataset: str, arch: str, args, data_flags, codes, features) -> dict:
    """Train `arch` for the CPU budget (once), then score and time its pipeline."""
    kind = "pyramid" if arch == "var" else "grid"
    folder = output / arch
    flags = ["--codes", str(codes[kind]), *recipe_flags(arch), *COMMON]
    if not (folder / "model.safetensors").exists():
        steps = steps_for_cpu_seconds("stage2_prior.train", flags, output / "calibration", args.cpu_seconds)
        _, cpu = run_module("stage2_prior.train", *flags, "--output-dir", str(folder), "--overwrite", "--max-steps",
                            str(steps), "--eval-every", str(max(steps // 5, 1)), "--save-every", str(steps),
                            "--no-progress")
        (folder / "cpu_seconds.json").write_text(json.dumps({"steps": steps, "cpu_seconds": cpu}))
    budget = json.loads((folder / "cpu_seconds.json").read_text())
    pipeline_folder = output / f"pipeline_{arch}"
    if not pipeline_folder.exists():
        Pipeline(load_tokenizer(output / f"tokenizer_{kind}"), Prior.from_pretrained(folder)).save_pretrained(
            pipeline_folder)
    pipeline = Pipeline.from_pretrained(pipeline_folder, device="cpu")
    prior = pipeline.prior
    labels = None if prior.config.num_classes is None else [k % prior.config.num_classes for k in range(64)]
    with torch.inference_mode():
        _, stats = prior.sample(16, labels=None if labels is None else torch.tensor(labels[:16]), seed=0,
                                return_stats=True)
    reference = DATASETS[dataset][2]

    def score(schedule: str = "constant", scale: float = 0.0, count: int = args.num_images) -> dict:
        result = evaluate(["--pipeline", str(pipeline_folder), *data_flags, "--split", reference, "--num-images",
                           str(count), "--features", str(features), "--guidance-scale", str(scale),
                           "--guidance-schedule", schedule, "--num-workers", "0", "--no-progress"])
        return {key: result.get(key) for key in ("fid", "noise_floor_fid", "precision", "recall", "class_accuracy")}

    row = {"arch": arch, "tokenizer": kind, "train_steps": budget["steps"], "train_cpu_seconds": budget["cpu_seconds"],
           "sequential_passes_per_image": float(stats.sequential_passes.float().mean()),
           "positions": prior.config.num_positions, **score(),
           "seconds_per_image_batch_1": timed_per_image(pipeline, 4, 1, labels),
           "seconds_per_image_batch_64": timed_per_image(pipeline, 64, 64, labels)}
    if arch in args.sweep and prior.config.null_class is not None:
        row["sweep"] = [{"schedule": schedule, "scale": scale, **score(schedule, scale, args.sweep_images)}
                        for schedule, scale in SWEEP]
    columns = 10 if labels is None else min(10, prior.config.num_classes) * (10 // min(10, prior.config.num_classes))
    picture = pipeline.generate(columns, labels=None if labels is None else labels[:columns], seed=1,
                                output_type="pt", progress=False).images
    torch.save(picture, output / f"samples_{arch}.pt")  # one row of the dataset's picture (`save_picture`)
    print(json.dumps({"dataset": dataset, **row}), flush=True)
    return row


def save_picture(output: Path, archs: list[str], target: Path) -> None:
    """One row of samples per prior (labels 0, 1, 2, ... for conditional ones), top to bottom in `archs` order."""
    rows = [torch.load(output / f"samples_{arch}.pt") for arch in archs]
    save_image_grid(torch.cat(rows).mul(2).sub(1), target, nrow=len(rows[0]))


def table(dataset: str, rows: list[dict]) -> str:
    lines = [f"**{dataset}**", "", "| prior | codes | train steps (CPU s) | passes / image | FID (noise floor) | "
             "precision | recall | class accuracy | s / image at batch 1 | at batch 64 |", "|" + " --- |" * 10]
    for row in rows:
        accuracy = row["class_accuracy"]
        lines.append(f"| {row['arch']} | {row['tokenizer']} | {row['train_steps']} ({row['train_cpu_seconds']:.0f}) | "
                     f"{row['sequential_passes_per_image']:.0f} of {row['positions']} | {row['fid']:.2f} "
                     f"({row['noise_floor_fid']:.2f}) | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"{'-' if accuracy is None else f'{accuracy:.3f}'} | {row['seconds_per_image_batch_1']:.4f} | "
                     f"{row['seconds_per_image_batch_64']:.4f} |")
    sweeps = [row for row in rows if "sweep" in row]
    if sweeps:
        lines += ["", "| prior | guidance | FID | precision | recall | class accuracy |", "|" + " --- |" * 6]
        for row in sweeps:
            lines.append(f"| {row['arch']} | none | {row['fid']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                         f"{row['class_accuracy'] or 0:.3f} |")
            for entry in row["sweep"]:
                lines.append(f"| {row['arch']} | {entry['schedule']} {entry['scale']} | {entry['fid']:.2f} | "
                             f"{entry['precision']:.3f} | {entry['recall']:.3f} | {entry['class_accuracy'] or 0:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--priors", nargs="+", default=list(PRIORS), choices=list(PRIORS))
    parser.add_argument("--cpu-seconds", type=float, default=300.0, help="training CPU time per prior")
    parser.add_argument("--num-images", type=int, default=1000, help="samples per FID")
    parser.add_argument("--sweep", nargs="*", default=["var", "maskgit", "transformer"], help="archs swept over guidance")
    parser.add_argument("--sweep-images", type=int, default=500)
    parser.add_argument("--tokenizer-steps", type=int, default=None, help="override the tokenizers' steps (smoke tests)")
    parser.add_argument("--feature-steps", type=int, default=None, help="override the feature network's steps")
    args = parser.parse_args()
    results = {}
    for dataset in args.datasets:
        output = Path(args.output_dir) / dataset
        output.mkdir(parents=True, exist_ok=True)
        data_flags, codes, features = prepare(output, dataset, args.tokenizer_steps, args.feature_steps)
        results[dataset] = [measure(output, dataset, arch, args, data_flags, codes, features) for arch in args.priors]
        save_picture(output, args.priors, Path(args.output_dir) / f"{dataset}_samples.png")
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=1))
    for dataset, rows in results.items():
        print(table(dataset, rows) + "\n")


if __name__ == "__main__":
    main()
