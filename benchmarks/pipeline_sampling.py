"""Cached vs naive sampling of a whole pipeline (a chain of priors, then decoding).

    python benchmarks/pipeline_sampling.py --pipeline runs/quickstart2/pipeline

Times `Pipeline.generate` with each method after a warm-up call, and checks that both methods give
the same images for the same seed.
"""
from __future__ import annotations

import argparse
import time

import torch

from pipelines import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--label", type=int, default=3)
    args = parser.parse_args()
    pipeline = Pipeline.from_pretrained(args.pipeline, device="cpu")
    labels = args.label if pipeline.priors[0].config.num_classes else None

    def generate(batch: int, method: str, seed: int = 0) -> torch.Tensor:
        return pipeline.generate(batch, labels=labels, seed=seed, method=method, output_type="pt",
                                 progress=False).images

    print("| method | batch | seconds |")
    print("| --- | --- | --- |")
    for method in ("cached", "naive"):
        for batch in args.batches:
            generate(batch, method)  # warm-up: float64 copies, tolerance probes
            started = time.perf_counter()
            generate(batch, method)
            print(f"| {method} | {batch} | {time.perf_counter() - started:.2f} |", flush=True)
    print("identical images, cached vs naive:", torch.equal(generate(4, "cached", 7), generate(4, "naive", 7)))


if __name__ == "__main__":
    main()
