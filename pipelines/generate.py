"""Sample images from a saved pipeline:
`python -m pipelines.generate --pipeline DIR --num-images 64 --output-dir DIR`.

A text-conditioned pipeline takes `--prompt "a small red circle"` (every image) or `--prompts-file F`
(one prompt per line, --num-images images of each). Writes image_00000.png ..., grid.png (the first 64),
prompts.json (the prompt of each image, with prompts) and codes.npy (N, h, w[, D]) (a tokenizer of several
levels, a chain or a pyramid: codes_<level>.npy per level). Under
`torchrun --nproc_per_node N -m pipelines.generate` / `accelerate launch -m` each process takes a
contiguous share of the images; image k always comes from (seed, k), so the files equal those of a
single-process run with the same seed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.parts import add_sampling_arguments, sampling_keywords
from pipelines.pipeline import Pipeline, convert_images
from shared.config import parse_args, write_json_atomic
from shared.data import save_image_grid, shard_range
from shared.errors import UserError, run_cli
from shared.runtime import make_accelerator

GRID_IMAGES = 64


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample images from a saved pipeline.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", required=True,
                        help="a pipeline folder (Pipeline.save_pretrained), or a Hub repo id (org/name)")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit of a Hub --pipeline")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="one class for every image, or one per image (conditional priors)")
    parser.add_argument("--prompt", default=None, help="the caption of every image (text-conditioned priors)")
    parser.add_argument("--prompts-file", default=None,
                        help="a text file of prompts, one per line: --num-images images of each, in order "
                             "(text-conditioned priors; prompts.json says which image has which)")
    add_sampling_arguments(parser)
    parser.add_argument("--num-beams", type=int, default=None,
                        help="decode the most likely grid beam search finds with this many beams instead of sampling "
                             "(scored by total log-probability; no --temperature, --top-k or --top-p)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def generate(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(parser(), argv)
    output = Path(args.output_dir)
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output-dir {output} is a file; pass a folder")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UserError(f"{output} is not empty; pass --overwrite or choose another --output-dir")
    prompts = read_prompts(args)
    num_images = args.num_images * (len(prompts) if args.prompts_file else 1)
    accelerator = make_accelerator()
    pipeline = Pipeline.from_pretrained(args.pipeline, device=accelerator.device, revision=args.revision)
    labels = args.labels[0] if args.labels and len(args.labels) == 1 else args.labels
    all_labels = pipeline.resolve_labels(num_images, labels, args.seed)  # checks labels on every process
    all_prompts = pipeline.resolve_prompts(num_images, None if prompts is None else
                                           [prompts[k // args.num_images] for k in range(num_images)]
                                           if args.prompts_file else prompts[0])
    # the options made and checked once, before the output folder is touched
    samplers = pipeline.samplers(None, args.num_beams, **sampling_keywords(args))
    mine = shard_range(num_images, accelerator.process_index, accelerator.num_processes)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        for stale in [*output.glob("image_*.png"), *output.glob(".codes*.part*.npy"), *output.glob("codes*.npy"),
                      output / "grid.png", output / "prompts.json"]:  # an earlier, larger run must leave no images behind
            stale.unlink(missing_ok=True)
        if all_prompts is not None:
            write_json_atomic(output / "prompts.json", all_prompts)
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    parts = []
    if len(mine):
        batches = pipeline.iter_generate(len(mine), labels=None if all_labels is None else all_labels[mine.start:mine.stop],
                                         seed=args.seed, batch_size=args.batch_size, first_index=mine.start,
                                         progress=args.progress and accelerator.is_main_process,
                                         samplers=samplers, num_beams=args.num_beams,
                                         prompt=None if all_prompts is None else all_prompts[mine.start:mine.stop])
        index = mine.start
        for images, codes in batches:
            for image in convert_images(images, "pil"):
                image.save(output / f"image_{index:05d}.png")
                index += 1
            parts.append(codes if isinstance(codes, dict) else {"codes": codes})
    shapes = pipeline.tokenizer.level_shapes
    for name, shape in shapes.items():  # each process writes its share of each level; the main one joins them
        share = np.concatenate([part[name].numpy() for part in parts]) if parts else np.empty((0, *shape), np.int64)
        np.save(output / f".{_codes_file(name, pipeline)}.part{accelerator.process_index}.npy", share)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        for name in shapes:
            file = _codes_file(name, pipeline)
            part_paths = [output / f".{file}.part{rank}.npy" for rank in range(accelerator.num_processes)]
            np.save(output / f"{file}.npy", np.concatenate([np.load(path) for path in part_paths]))
            for path in part_paths:
                path.unlink()
        first = [np.asarray(Image.open(output / f"image_{k:05d}.png")) for k in range(min(GRID_IMAGES, num_images))]
        grid = torch.from_numpy(np.stack(first)).float().div(127.5).sub(1)  # (n, H, W[, C]) in [-1, 1]
        grid = grid[:, None] if grid.ndim == 3 else grid.permute(0, 3, 1, 2)
        save_image_grid(grid, output / "grid.png", nrow=int(math.ceil(math.sqrt(len(first)))))
        summary = {"output_dir": str(output), "num_images": num_images, "seconds": seconds,
                   "images_per_second": num_images / max(seconds, 1e-9), "device": str(accelerator.device),
                   "processes": accelerator.num_processes}
        print(json.dumps(summary))
        return summary
    return {}


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt or --prompts-file (checked before anything is written), or None."""
    if args.prompt is not None and args.prompts_file is not None:
        raise UserError("pass --prompt or --prompts-file, not both")
    if args.prompt is not None:
        return [args.prompt]
    if args.prompts_file is None:
        return None
    path = Path(args.prompts_file)
    if not path.is_file():
        raise UserError(f"--prompts-file {path} does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompt; write one prompt per line")
    return prompts


def _codes_file(level: str, pipeline: Pipeline) -> str:
    return "codes" if len(pipeline.tokenizer.level_names) == 1 else f"codes_{level}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(generate, argv)


if __name__ == "__main__":
    sys.exit(main())
