"""Exact parallel (Jacobi) decoding on trained priors: sequential network passes to the fixed point, and wall
time against the cached sampler.

    python benchmarks/parallel_decoding.py --priors runs/qs/prior runs/bench/transformer8 --samples 256
    python benchmarks/parallel_decoding.py --priors runs/bench/transformer8 --windows 1 2 4 8 16 32 64
    python benchmarks/parallel_decoding.py --device cuda --priors ... --batches 1 16 64 256   # on a GPU

For each prior folder: `--samples` samples (labels 0, 1, 2, ... for a conditional prior) drawn with
method "jacobi" in batches of the largest `--batches`, giving each sample's passes to its fixed point
(`SamplingStats.sequential_passes`: median, worst, and as a share of the draws, which is what the cached
sampler needs); every Jacobi draw is checked against the cached sampler's. Then the wall time of one
batch of each size, cached and Jacobi (fastest of `--repeats`). With `--windows`, windowed Jacobi for
each window size on priors whose arch has a windowed step: passes and wall time at batch 1.

The trained priors of docs/benchmarks.md (COMMON: --dropout 0.25 --warmup-steps 50):

    python -m pipelines.quickstart --output-dir runs/quickstart          # runs/quickstart/prior, codes
    python -m stage2_prior.train --codes runs/quickstart/codes --output-dir runs/bench/pixelsnail8 --arch pixelsnail \
        --num-layers 12 --attention-every 4 --max-steps 800 COMMON
    python -m stage2_prior.train --codes runs/quickstart/codes --output-dir runs/bench/transformer8 --arch transformer \
        --num-layers 6 --num-heads 4 --max-steps 800 COMMON
    python -m stage1_vqvae.train --output-dir runs/bench/tokenizer64 --image-size 64 --codebook-size 256 --max-steps 1000
    python -m stage1_vqvae.export --tokenizer runs/bench/tokenizer64 --output runs/bench/codes16
    python -m stage2_prior.train --codes runs/bench/codes16 --output-dir runs/bench/gated16 --num-layers 12 \
        --max-steps 600 COMMON
    python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
        from natural_photos import write_crops; write_crops(Path('runs/bench/crops'))"
    python -m stage1_vqvae.export --tokenizer pixels:256 --dataset runs/bench/crops --image-size 32 \
        --output runs/bench/pixels_train
    python -m stage2_prior.train --codes runs/bench/pixels_train --output-dir runs/bench/pixels32 \
        --hidden-channels 48 --num-layers 8 --max-steps 600 --eval-every 200 --save-every 200 --batch-size 32 COMMON
    # the measured pixel prior is that run's step-400 model (runs/bench/pixels32/best/step_00000400): the run was
    # stopped after it for time
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from stage2_prior import Prior
from stage2_prior.decoding import PRECISIONS


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device: torch.device, repeats: int) -> tuple[float, object]:
    """(seconds of the fastest of `repeats` calls after a warm-up, the last result)."""
    result = function()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        result = function()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best, result


def labels_for(prior: Prior, count: int, offset: int = 0) -> torch.Tensor | None:
    classes = prior.config.num_classes
    return None if classes is None else (torch.arange(offset, offset + count) % classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--priors", nargs="+", required=True, help="trained prior folders")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--windows", type=int, nargs="*", default=[], help="window sizes to try (archs with windows)")
    parser.add_argument("--precision", default="float64", choices=list(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, precision {args.precision}")
    passes_rows, time_rows, window_rows = [], [], []
    for folder in args.priors:
        prior = Prior.from_pretrained(folder).to(device)
        config = prior.config
        draws = config.num_positions * config.depth
        name = f"{Path(folder).name} ({config.arch}, {config.latent_shape[0]}x{config.latent_shape[1]}"
        name += f"x{config.depth})" if config.depth > 1 else ")"
        chunk = max(args.batches)
        passes = []
        for start in range(0, args.samples, chunk):
            count = min(chunk, args.samples - start)
            labels = labels_for(prior, count, start)
            codes, stats = prior.sample(count, labels=labels, seed=0, sample_offset=start, method="jacobi",
                                        precision=args.precision, return_stats=True)
            assert torch.equal(codes, prior.sample(count, labels=labels, seed=0, sample_offset=start,
                                                   precision=args.precision)), "Jacobi and cached codes differ"
            passes += stats.sequential_passes.tolist()
        median, worst = statistics.median(passes), max(passes)
        passes_rows.append(f"| {name} | {draws} | {median:g} ({median / draws:.1%}) | {worst} ({worst / draws:.1%}) |")
        print(passes_rows[-1], flush=True)
        for batch in args.batches:
            labels = labels_for(prior, batch)
            cached, _ = timed(lambda: prior.sample(batch, labels=labels, seed=0, precision=args.precision), device,
                              args.repeats)
            jacobi, _ = timed(lambda: prior.sample(batch, labels=labels, seed=0, precision=args.precision,
                                                   method="jacobi"), device, args.repeats)
            time_rows.append(f"| {name} | {batch} | {cached:.3f} | {jacobi:.3f} | {cached / jacobi:.2f}x |")
            print(time_rows[-1], flush=True)
        state = prior.state_class()
        for window in args.windows if state is not None and state.has_window() else []:
            labels = labels_for(prior, 1)
            seconds, (codes, stats) = timed(lambda: prior.sample(1, labels=labels, seed=0, precision=args.precision,
                                                                 method="jacobi", window=window, return_stats=True),
                                            device, args.repeats)
            count = int(stats.sequential_passes[0])
            window_rows.append(f"| {name} | {window} | {count} ({count / draws:.1%}) | {seconds:.3f} |")
            print(window_rows[-1], flush=True)
    print(f"\nPasses to the fixed point over {args.samples} samples (the cached sampler needs one per draw):\n")
    print("| prior | draws | median passes | worst |\n| --- | --- | --- | --- |")
    print("\n".join(passes_rows))
    print("\nWall time of one batch (s):\n\n| prior | batch | cached | jacobi | jacobi speed-up |\n| --- | --- | --- | --- | --- |")
    print("\n".join(time_rows))
    if window_rows:
        print("\nWindowed Jacobi at batch 1:\n\n| prior | window | passes | s |\n| --- | --- | --- | --- |")
        print("\n".join(window_rows))


if __name__ == "__main__":
    main()
