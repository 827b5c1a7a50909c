"""Memory and speed of the data path as the dataset grows.

    python benchmarks/data_at_scale.py images --output-dir runs/data_scale            # 5,000 and 50,000 JPEGs
    python benchmarks/data_at_scale.py codes --output-dir runs/codes_scale --rows 200000

`images`: writes image folders of N JPEGs (128x128 sources, smooth random content), trains the
default tokenizer at 64x64 for a fixed number of steps on each (a fresh process each), and reports
the peak memory of the training process tree and the time from process start to the first finished
step. Then it times the loader alone (images/s with 0, 1, 2 workers) beside the model's training
step. Peak RSS is the kernel's high-water mark of the main process (VmHWM); "tree PSS" adds the
loader workers, counting pages they share with the main process once (proportional set size).

`codes`: writes a codes dataset of N random 32x32 int16 grids in the export format and trains a
small prior on it for a few steps, reporting the peak RSS of that process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _write_jpegs(job: tuple[str, int, int]) -> None:
    from PIL import Image

    folder, start, stop = job
    for index in range(start, stop):
        rng = np.random.default_rng(index)
        small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)  # smooth content compresses like photos
        image = Image.fromarray(small).resize((128, 128), Image.BICUBIC)
        image.save(Path(folder) / f"c{index % 10}" / f"{index:06d}.jpg", quality=90)


def write_folder(root: Path, count: int) -> Path:
    if (root / "done").is_file():
        return root
    for label in range(10):
        (root / "train" / f"c{label}").mkdir(parents=True, exist_ok=True)
    chunks = [(str(root / "train"), start, min(start + 1000, count)) for start in range(0, count, 1000)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_jpegs, chunks)
    (root / "done").write_text(str(count))
    return root


def run_measured(command: list[str]) -> dict:
    """Run a command; sample the PSS of its process tree every 0.1 s; return its peak figures."""
    import psutil

    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # RSS counts the pages of a memory-mapped file that were read (the kernel can drop them at any
    # time); RssAnon is the process's own memory, what a widened in-memory copy would add to.
    peak = {"tree_pss_mib": 0.0, "rss_mib": 0.0, "anon_mib": 0.0}

    def sample() -> None:
        parent = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                pss = sum(member.memory_full_info().pss for member in tree)
                with open(f"/proc/{process.pid}/status") as status:
                    fields = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("VmHWM", "RssAnon"))}
                peak["tree_pss_mib"] = max(peak["tree_pss_mib"], pss / 2 ** 20)
                peak["rss_mib"] = max(peak["rss_mib"], int(fields["VmHWM"]) / 1024)
                peak["anon_mib"] = max(peak["anon_mib"], int(fields["RssAnon"]) / 1024)
            except (psutil.Error, OSError, KeyError):
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {**peak, "stdout": out}


def images(args: argparse.Namespace) -> None:
    output = Path(args.output_dir)
    rows = []
    for count in args.sizes:
        folder = write_folder(output / f"jpeg_{count}", count)
        for cache in args.cache:
            run_dir = output / f"run_{count}_{cache}"
            command = [sys.executable, "-m", "stage1_vqvae.train", "--dataset", str(folder), "--image-size", "64",
                       "--max-steps", str(args.steps), "--eval-every", str(args.steps), "--save-every",
                       str(args.steps), "--cache-images", cache, "--output-dir", str(run_dir), "--overwrite",
                       "--no-progress"]
            measured = run_measured(command)
            metrics = json.loads(measured["stdout"].strip().splitlines()[-1])
            rows.append((count, cache, measured["rss_mib"], measured["tree_pss_mib"], metrics["seconds_to_first_step"],
                         args.steps * 64 / metrics["train_seconds"]))
            print(f"{count} images, cache {cache}: peak RSS {measured['rss_mib']:.0f} MiB, tree PSS "
                  f"{measured['tree_pss_mib']:.0f} MiB, first step after {metrics['seconds_to_first_step']:.1f} s",
                  flush=True)
    print("\n| images | --cache-images | peak RSS (MiB) | peak tree PSS (MiB) | s to first step | train images/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for count, cache, rss, pss, first, speed in rows:
        print(f"| {count:,} | {cache} | {rss:.0f} | {pss:.0f} | {first:.1f} | {speed:.0f} |")
    loader_throughput(output / f"jpeg_{max(args.sizes)}", args.loader_batches)


def loader_throughput(folder: Path, num_batches: int) -> None:
    """Images/s of the training loader alone (decode, resize, crop to 64x64) and of the model's step."""
    import torch

    from shared.data import Augmentation, DataConfig, StepOrder, load_train_and_validation, training_batches
    from stage1_vqvae import VQVAE, VQVAEConfig
    from stage1_vqvae.losses import reconstruction_loss

    config = DataConfig(dataset=str(folder), image_size=64)
    train_set, _ = load_train_and_validation(config, augmentation=Augmentation())
    print("\n| what | images/s |")
    print("| --- | --- |")
    for workers in (0, 1, 2):
        batches = training_batches(train_set, StepOrder(len(train_set), 64, 0), 0, workers, pin_memory=False)
        next(batches)  # workers started, first batch decoded
        started = time.perf_counter()
        for _ in range(num_batches):
            next(batches)
        print(f"| loader, {workers} worker(s) | {num_batches * 64 / (time.perf_counter() - started):.0f} |", flush=True)
        del batches
    model = VQVAE(VQVAEConfig(in_channels=3, image_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(64, 3, 64, 64) * 2 - 1

    def step() -> None:
        output = model(images)
        loss = reconstruction_loss("mse", output.reconstruction, images) + output.quantizer_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    started = time.perf_counter()
    for _ in range(5):
        step()
    print(f"| model training step (batch 64, 64x64, torch threads {torch.get_num_threads()}) | "
          f"{5 * 64 / (time.perf_counter() - started):.0f} |")


def codes(args: argparse.Namespace) -> None:
    import datasets

    from shared.codes import CODES_FORMAT_VERSION, CODES_META_NAME, CodesMetadata, LevelInfo
    from shared.config import write_json_atomic

    output = Path(args.output_dir)
    folder = output / f"codes_{args.rows}"
    if not (folder / CODES_META_NAME).is_file():
        side, vocab = 32, 1024

        def rows():
            rng = np.random.default_rng(0)
            for start in range(0, args.rows, 10000):
                block = rng.integers(0, vocab, (min(10000, args.rows - start), side, side), dtype=np.int16)
                for offset, grid in enumerate(block):
                    yield {"codes": grid, "source_index": start + offset, "label": (start + offset) % 10}

        features = datasets.Features({"codes": datasets.Array2D((side, side), "int16"),
                                      "source_index": datasets.Value("int64"),
                                      "label": datasets.ClassLabel(names=[str(k) for k in range(10)])})
        table = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(output / "cache"))
        table.save_to_disk(str(folder))
        level = LevelInfo(name="codes", column="codes", vocab_size=vocab, latent_shape=(side, side), depth=1,
                          dtype="int16")
        metadata = CodesMetadata(format_version=CODES_FORMAT_VERSION, format="arrow", levels=(level,),
                                 num_rows=args.rows, has_labels=True, label_names=[str(k) for k in range(10)],
                                 tokenizer_class="VQVAE", tokenizer_config={}, tokenizer_sha256="0" * 64,
                                 tokenizer_path="", source={"dataset": "generated"})
        write_json_atomic(folder / CODES_META_NAME, metadata.to_json())
    size_mib = sum(path.stat().st_size for path in folder.glob("*.arrow")) / 2 ** 20
    command = [sys.executable, "-m", "stage2_prior.train", "--codes", str(folder), "--output-dir",
               str(output / "prior"), "--overwrite", "--max-steps", "20", "--eval-every", "20", "--save-every", "20",
               "--hidden-channels", "16", "--num-layers", "2", "--batch-size", "32", "--validation-fraction", "0.005",
               "--no-progress"]
    measured = run_measured(command)
    widened = args.rows * 32 * 32 * 8 / 2 ** 20
    print("| codes rows | on disk (MiB) | int64 in RAM would be (MiB) | stage-2 peak RSS (MiB) | "
          "of which anonymous (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {args.rows:,} | {size_mib:.0f} | {widened:.0f} | {measured['rss_mib']:.0f} | "
          f"{measured['anon_mib']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    image_parser = commands.add_parser("images")
    image_parser.add_argument("--output-dir", required=True)
    image_parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    image_parser.add_argument("--steps", type=int, default=40)
    image_parser.add_argument("--cache", nargs="+", default=["auto", "never"], choices=["auto", "never", "always"])
    image_parser.add_argument("--loader-batches", type=int, default=30)
    codes_parser = commands.add_parser("codes")
    codes_parser.add_argument("--output-dir", required=True)
    codes_parser.add_argument("--rows", type=int, default=200000)
    args = parser.parse_args()
    images(args) if args.command == "images" else codes(args)


if __name__ == "__main__":
    main()
