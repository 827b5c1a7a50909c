"""Streamed training data (`--streaming`, tar shards): memory against the number of shards, and speed
against loader workers.

    python benchmarks/streaming.py --output-dir runs/streaming --shards 10 100 --workers 0 2 4

Writes WebDataset-style shards of `--per-shard` 32x32 RGB PNGs each (smooth random content, a `.cls`
label), then, each in a fresh process, reads the training batches `Stream.training_batches` yields
(64 images each, a shuffle buffer of 1,000, decoded and augmented as training gets them):
- memory: one whole pass over 10 and over 100 shards (2 workers); peak RSS of the main process
  (VmHWM) and the peak PSS of its process tree (workers included, shared pages counted once);
- speed: `--batches` batches from the 100-shard set with 0, 2 and 4 workers, in images per second
  (the first batch, which starts the workers, is not timed).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from data_at_scale import REPO, run_measured

BATCH = 64


def write_shards(folder: Path, shards: int, per_shard: int) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        path = folder / f"train-{shard:06d}.tar"
        if path.is_file():
            continue
        with tarfile.open(path.with_suffix(".tmp"), "w") as archive:
            for item in range(per_shard):
                number = shard * per_shard + item
                rng = np.random.default_rng(number)
                image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                for suffix, data in (("png", buffer.getvalue()), ("cls", str(number % 10).encode())):
                    info = tarfile.TarInfo(f"{number:09d}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        path.with_suffix(".tmp").rename(path)
    return str(folder / f"train-{{000000..{shards - 1:06d}}}.tar")


def read(pattern: str, workers: int, batches: int | None) -> None:
    """The measured process: read `batches` training batches (None: one pass) and print what it took."""
    sys.path.insert(0, str(REPO))
    from shared.data import Augmentation, DataConfig
    from shared.data.streaming import Stream, StreamingConfig

    stream = Stream(DataConfig(dataset=pattern, image_size=32),
                    StreamingConfig(streaming=True, validation_dataset=pattern, validation_images=64))
    per_pass = None
    if batches is None:  # one pass: the shards' sample count
        per_pass = sum(1 for _ in stream.stream)
        batches = per_pass // BATCH
    loader = stream.training_batches(3, Augmentation(seed=0, flip=True), BATCH, 0, 1, 0, workers, False)
    next(loader)  # starts the workers
    started = time.perf_counter()
    for _ in range(batches - 1):
        next(loader)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": (batches - 1) * BATCH, "seconds": seconds, "per_pass": per_pass}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/streaming")
    parser.add_argument("--shards", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--read", default=None, help=argparse.SUPPRESS)  # the measured process
    parser.add_argument("--read-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--read-batches", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read is not None:
        return read(args.read, args.read_workers, args.read_batches)
    output = Path(args.output_dir)
    patterns = {count: write_shards(output / f"shards_{count}", count, args.per_shard) for count in args.shards}
    script = str(Path(__file__).resolve())
    print("| shards | images read | peak RSS, main (MiB) | peak PSS, tree (MiB) | images/s |")
    print("| --- | --- | --- | --- | --- |")
    for count, pattern in patterns.items():
        measured = run_measured([sys.executable, script, "--read", pattern, "--read-workers", "2"])
        result = json.loads(measured["stdout"].strip().splitlines()[-1])
        print(f"| {count} | {result['images']:,} | {measured['rss_mib']:.0f} | {measured['tree_pss_mib']:.0f} | "
              f"{result['images'] / result['seconds']:.0f} |", flush=True)
    largest = patterns[max(patterns)]
    print(f"\n{args.batches} batches of {BATCH} from {max(patterns)} shards:\n\n| workers | images/s | peak PSS, tree (MiB) |")
    print("| --- | --- | --- |")
    for workers in args.workers:
        measured = run_measured([sys.executable, script, "--read", largest, "--read-workers", str(workers),
                                 "--read-batches", str(args.batches)])
        result = json.loads(measured["stdout"].strip().splitlines()[-1])
        print(f"| {workers} | {result['images'] / result['seconds']:.0f} | {measured['tree_pss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
