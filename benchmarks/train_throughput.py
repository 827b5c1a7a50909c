"""Images per second of one tokenizer training step (forward, backward, AdamW), fp32 vs bf16.

    python benchmarks/train_throughput.py                    # CPU here; on a GPU, fp32 and bf16
"""
from __future__ import annotations

import argparse
import time

import torch

from stage1_vqvae import VQVAE, VQVAEConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    print(f"device: {device}, batch {args.batch_size}, {args.channels}x{args.image_size}x{args.image_size}")
    print("| precision | images/s | ms/step |")
    print("| --- | --- | --- |")
    for precision in precisions:
        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig(in_channels=args.channels, image_size=args.image_size)).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        images = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, device=device) * 2 - 1
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def step() -> None:
            with autocast:
                output = model(images)
                loss = torch.nn.functional.mse_loss(output.reconstruction.float(), images) + output.quantizer_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        print(f"| {precision} | {args.batch_size / seconds:.0f} | {seconds * 1000:.1f} |")


if __name__ == "__main__":
    main()
