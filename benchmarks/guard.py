"""How many draws the exactness guard re-decides in float64, per arch, filter and precision, at trained scale.

    python benchmarks/guard.py                          # every arch with a cached sampler, 8x8, 64 samples
    python benchmarks/guard.py --archs gated --side 16  # one arch, a larger grid

Each arch is built at the default width (64 channels) with a few layers (`registry.trained_scale`), its
weights scaled until its logits spread like a trained prior's (standard deviation 6, as
tests/test_exactness.py does). For each filter the cached sampler draws `--samples` grids in float32
and in float64; the table gives the share of draws whose uniform fell within the guard's bound of a
boundary (each then decided again from float64 logits of the canonical computation), and the
seconds taken.
"""
from __future__ import annotations

import argparse
import time

import torch

from stage2_prior import ARCHS, Prior, PriorConfig
from stage2_prior.registry import trained_scale
from stage2_prior.testing import trained_scale_prior

FILTERS = {"none": dict(), "temperature 0.8 + top-k 40": dict(temperature=0.8, top_k=40), "top-p 0.9": dict(top_p=0.9),
           "greedy": dict(strategy="greedy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached = [arch for arch in ARCHS
              if "cached" in Prior.from_config(PriorConfig.build(**trained_scale(arch, side=2))).sampling_methods]
    parser.add_argument("--archs", nargs="+", default=cached, choices=cached)
    parser.add_argument("--side", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.samples} samples of "
          f"{args.side}x{args.side}")
    print("| arch | filter | float32: re-decided | float32 s | float64: re-decided | float64 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arch in args.archs:
        prior = trained_scale_prior(args.side, **trained_scale(arch))
        for name, options in FILTERS.items():
            cells = []
            for precision in ("float32", "float64"):
                started = time.perf_counter()
                _, stats = prior.sample(args.samples, seed=5, precision=precision, return_stats=True, **options)
                seconds = time.perf_counter() - started
                cells.append(f"{stats.recomputed / stats.draws:.2%} ({stats.recomputed}) | {seconds:.2f}")
            print(f"| {arch} | {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
