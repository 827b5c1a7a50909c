"""The prior archs on the same codes at equal CPU time: bits per code, receptive field, sampling speed.

    python benchmarks/priors.py --codes runs/codes16 --validation-codes runs/codes16_test \\
        --cpu-seconds 600 --output-dir runs/prior_compare

For each arch: a short run measures the CPU seconds of one training step, then a run of
`--cpu-seconds / step` steps trains it (the best validation step is kept, as the train command
does). CPU time, not wall time, is the budget: what each arch gets does not depend on what else the
machine runs. Then: how many earlier positions the last position of the grid depends on (by
gradient), and the time to sample 16 grids cached and naive (naive estimated from timed forwards).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_module, steps_for_cpu_seconds  # noqa: E402

from stage2_prior import ARCHS, Prior  # noqa: E402
from stage2_prior.registry import recipe_flags  # noqa: E402



def train_command(arch: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    command = ["--codes", args.codes, "--sample-every", str(10 ** 9), *recipe_flags(arch), *args.train_flags, *extra]
    return command + (["--validation-codes", args.validation_codes] if args.validation_codes else [])


def receptive_field(prior) -> int:
    """Earlier positions whose codes change the last position's logits (gradient through the embedding)."""
    height, width = prior.config.latent_shape
    codes = torch.randint(0, prior.config.vocab_size, (1, height, width))
    labels = torch.zeros(1, dtype=torch.long) if prior.config.num_classes else None
    embedded = prior.embed(codes[..., None]).detach().requires_grad_(True)
    prior.embed = lambda _: embedded
    try:
        prior.eval()(codes, labels)[0, :, height - 1, width - 1].sum().backward()
    finally:
        del prior.embed
    return int((embedded.grad[0].abs().sum(0).flatten()[:-1] > 0).sum())


def sampling_seconds(prior, method: str, batch: int = 16) -> tuple[float, bool]:
    labels = 0 if prior.config.num_classes else None
    if method == "naive":
        codes = torch.zeros(batch, *prior.code_shape, dtype=torch.long)
        double = prior.double()
        with torch.inference_mode():
            double(codes, labels)
            started = time.perf_counter()
            double(codes, labels)
            forward = time.perf_counter() - started
        prior.float()
        return forward * prior.config.num_positions, True  # estimated: one full forward per code
    prior.sample(1, labels=labels, seed=0)  # warm-up
    started = time.perf_counter()
    prior.sample(batch, labels=labels, seed=0)
    return time.perf_counter() - started, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", required=True)
    parser.add_argument("--validation-codes", default=None)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--cpu-seconds", type=float, default=600.0, help="training CPU time per arch")
    raster = [arch for arch, spec in ARCHS.items() if spec.reads == "grid" and spec.family == "autoregressive"]
    parser.add_argument("--archs", nargs="+", default=raster, choices=raster,
                        help="raster archs (VAR and MaskGIT: benchmarks/families.py)")
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                        help="flags passed to every training run (e.g. --batch-size 32)")
    args = parser.parse_args()
    output = Path(args.output_dir)
    rows = []
    for arch in args.archs:
        steps = steps_for_cpu_seconds("stage2_prior.train", train_command(arch, args, []),
                                      output / f"{arch}_calibration", args.cpu_seconds, args.calibration_steps)
        metrics, cpu = run_module("stage2_prior.train", *train_command(arch, args, [
            "--output-dir", str(output / arch), "--overwrite", "--max-steps", str(steps), "--eval-every",
            str(max(1, steps // 8)), "--save-every", str(steps), "--no-progress"]))
        prior = Prior.from_pretrained(output / arch)
        parameters = sum(parameter.numel() for parameter in prior.parameters())
        cached = sampling_seconds(prior, "cached")[0] if "cached" in prior.sampling_methods else None
        naive, _ = sampling_seconds(prior, "naive")
        rows.append((arch, parameters, steps, cpu, metrics["bits_per_code"], metrics["best_step"],
                     metrics.get("last_bits_per_code"), receptive_field(prior), prior.config.num_positions - 1,
                     cached, naive))
        print(f"{arch}: {metrics['bits_per_code']:.3f} bits/code after {steps} steps ({cpu:.0f} CPU s)", flush=True)
    print("\n| arch | parameters | steps | CPU s | best bits/code (step) | last bits/code | receptive field | "
          "sample 16: cached s | naive s (est) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch, parameters, steps, cpu, bits, best_step, last, field, total, cached, naive in rows:
        print(f"| {arch} | {parameters / 1e6:.2f}M | {steps} | {cpu:.0f} | {bits:.3f} ({best_step}) | "
              f"{last:.3f} | {field}/{total} | {'-' if cached is None else f'{cached:.2f}'} | {naive:.0f} |")


if __name__ == "__main__":
    main()
