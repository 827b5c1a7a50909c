"""Naive vs cached sampling of the Gated PixelCNN prior: seconds and speed-up.

    python benchmarks/sampling.py                 # this machine's device, grids 8/16/32, batches 1/16/64
    python benchmarks/sampling.py --quick         # fewer rows

The naive sampler runs the whole network once per position (h * w forwards); where that would take
too long, its time is estimated from timed forward passes (marked "est").
"""
from __future__ import annotations

import argparse
import time

import torch

from stage2_prior import GatedPixelCNN, PriorConfig

CONFIGS = {
    "default (vocab 512, 64 ch, 15 layers)": dict(vocab_size=512, hidden_channels=64, num_layers=15),
    "small (vocab 256, 32 ch, 8 layers)": dict(vocab_size=256, hidden_channels=32, num_layers=8),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(function, device: torch.device, repeats: int = 1) -> float:
    function()  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-naive-seconds", type=float, default=20.0, help="estimate naive above this")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.grids, args.batches = [8, 16], [1, 16]
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| config | grid | batch | naive s | cached s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in CONFIGS.items():
        for side in args.grids:
            torch.manual_seed(0)
            prior = GatedPixelCNN(PriorConfig(latent_shape=(side, side), **values)).to(device).eval()
            for batch in args.batches:
                cached = time_call(lambda: prior.sample(batch, seed=0, method="cached"), device)
                codes = torch.zeros(batch, side, side, dtype=torch.long, device=device)
                with torch.inference_mode():
                    forward = time_call(lambda: prior(codes), device, repeats=3)
                estimate = forward * side * side
                if estimate <= args.max_naive_seconds:
                    naive, mark = time_call(lambda: prior.sample(batch, seed=0, method="naive"), device), ""
                else:
                    naive, mark = estimate, " (est)"
                print(f"| {name} | {side}x{side} | {batch} | {naive:.2f}{mark} | {cached:.3f} | {naive / cached:.0f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
