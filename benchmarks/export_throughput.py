"""Export throughput (images/s) and peak memory at several dataset sizes.

    python benchmarks/export_throughput.py --sizes 5000 50000 --work-dir /tmp/export-bench

Builds a save_to_disk dataset of N generated 32x32 grey images (streamed to disk, never held in
memory), a tokenizer with the default architecture, then runs `python -m stage1_vqvae.export` in a
child process and reports its wall time and peak resident memory (ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Runs the export in this child and prints the child's own peak resident memory (KiB) last.
CHILD = ("import resource, sys; from stage1_vqvae.export import main; code = main(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


def generated_dataset(path: Path, num_images: int, size: int = 32) -> None:
    import datasets

    def rows():
        rng = np.random.default_rng(0)
        for index in range(num_images):
            yy, xx = np.mgrid[0:size, 0:size]
            centre = rng.uniform(8, size - 8, 2)
            blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / rng.uniform(10, 60))
            yield {"image": (255 * blob).astype(np.uint8), "label": index % 10}

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    table = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(path.parent / "cache"))
    table.save_to_disk(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--work-dir", default="/tmp/vqprior-export-bench")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from stage1_vqvae import VQVAE, VQVAEConfig

    tokenizer_dir = work / "tokenizer"
    if not tokenizer_dir.exists():
        model = VQVAE(VQVAEConfig())
        model(torch.rand(64, 1, 32, 32) * 2 - 1)  # k-means init, so codes spread over the book
        model.save_pretrained(tokenizer_dir)
    print("| images | seconds | images/s | peak RSS (MiB) |")
    print("| --- | --- | --- | --- |")
    for size in args.sizes:
        dataset = work / f"images_{size}"
        if not dataset.exists():
            generated_dataset(dataset, size)
        output = work / f"codes_{size}"
        shutil.rmtree(output, ignore_errors=True)
        export_args = ["--tokenizer", str(tokenizer_dir), "--dataset", str(dataset), "--output", str(output),
                       "--batch-size", str(args.batch_size), "--no-progress"]
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", CHILD, *export_args], cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        lines = result.stdout.strip().splitlines()
        summary, peak_kib = json.loads(lines[-2]), int(lines[-1])
        print(f"| {size} | {seconds:.1f} | {summary['images_per_second']:.0f} | {peak_kib / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
