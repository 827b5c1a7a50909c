"""Naive vs cached sampling of the priors: seconds and speed-up.

    python benchmarks/sampling.py                                   # the default gated prior, grids 8/16/32, batches 1/16/64
    python benchmarks/sampling.py --archs transformer --grids 16 32 # any arch
    python benchmarks/sampling.py --precisions float64 float32      # the network's dtype while sampling
    python benchmarks/sampling.py --methods cached compiled graph   # the step through torch.compile / CUDA graphs

The naive sampler runs the whole network once per position (h * w forwards); where that would take
too long, its time is estimated from timed forward passes (marked "est"). The other methods draw
the same codes; their warm-up call (not timed) compiles. Models are freshly initialised (speed does
not depend on the weights). The speed-up is naive over the fastest method.
"""
from __future__ import annotations

import argparse
import time

import torch

from stage2_prior import ARCHS, Prior, PriorConfig
from stage2_prior.decoding import PRECISIONS


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(function, device: torch.device, repeats: int = 1) -> float:
    """Seconds of the fastest of `repeats` calls after a warm-up (the least disturbed by other load)."""
    function()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=["gated"], choices=list(ARCHS),
                        help="registered archs, each at the default width (64) with its recipe's depth")
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--precisions", nargs="+", default=["float64"], choices=list(PRECISIONS))
    parser.add_argument("--max-naive-seconds", type=float, default=20.0, help="estimate naive above this")
    parser.add_argument("--methods", nargs="+", default=["cached"], choices=["cached", "compiled", "graph"])
    parser.add_argument("--repeats", type=int, default=3, help="each method's time is the fastest of this many runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"| arch | grid | batch | precision | naive s | {' | '.join(f'{method} s' for method in args.methods)} "
          "| speed-up |")
    print("| --- " * (6 + len(args.methods)) + "|")
    for name in args.archs:
        for side in args.grids:
            torch.manual_seed(0)
            prior = Prior.from_config(PriorConfig(arch=name, vocab_size=512, latent_shape=(side, side),
                                                  hidden_channels=64, **ARCHS[name].recipe)).to(device).eval()
            for precision in args.precisions:
                dtype = getattr(torch, precision)
                for batch in args.batches:
                    times = [time_call(lambda: prior.sample(batch, seed=0, precision=precision, method=method),
                                       device, args.repeats) for method in args.methods]
                    codes = torch.zeros(batch, side, side, dtype=torch.long, device=device)
                    compute = prior.to(dtype)
                    with torch.inference_mode():
                        forward = time_call(lambda: compute(codes), device, repeats=3)
                    prior.float()
                    estimate = forward * side * side
                    if estimate <= args.max_naive_seconds:
                        naive = time_call(lambda: prior.sample(batch, seed=0, method="naive", precision=precision),
                                          device)
                        mark = ""
                    else:
                        naive, mark = estimate, " (est)"
                    print(f"| {name} | {side}x{side} | {batch} | {precision} | {naive:.2f}{mark} | "
                          f"{' | '.join(f'{seconds:.3f}' for seconds in times)} | {naive / min(times):.0f}x |",
                          flush=True)


if __name__ == "__main__":
    main()
