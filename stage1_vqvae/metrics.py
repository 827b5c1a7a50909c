"""Reconstruction metrics over a whole split, exact under several processes (sums are reduced)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shared.data import CachedImages, ImageDataset, sequential_batches, shard_range


def psnr_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (B,), on the [0, 1] scale (data range 1); inputs in [-1, 1]."""
    mse = (reconstruction.float() - target.float()).div(2).pow(2).flatten(1).mean(1)  # (B,)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) of each image (B,), on the [0, 1] scale."""
    x, y = reconstruction.float().add(1).div(2), target.float().add(1).div(2)
    channels = x.shape[1]
    coords = torch.arange(11, dtype=torch.float32, device=x.device) - 5
    gauss = torch.exp(-coords.pow(2) / (2 * 1.5 ** 2))
    gauss = gauss / gauss.sum()
    window = (gauss[:, None] * gauss[None, :]).expand(channels, 1, 11, 11).contiguous()  # (C, 1, 11, 11)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, window, padding=5, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)  # (B,)


def codebook_statistics(code_counts: torch.Tensor) -> dict[str, float]:
    """Usage (% of codes used at least once) and perplexity (exp of the code entropy, in codes)."""
    counts = code_counts.double()
    probabilities = counts / counts.sum().clamp_min(1)
    entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
    return {"codebook_usage": 100.0 * (counts > 0).double().mean().item(), "perplexity": math.exp(entropy.item())}


@torch.no_grad()
def reconstruction_metrics(model, dataset: ImageDataset | CachedImages, batch_size: int, device: torch.device,
                           rank: int = 0, world_size: int = 1,
                           reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                           perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                           with_ssim: bool = False, num_workers: int = 0,
                           report_problems: Callable[[list[str]], None] = lambda problems: None) -> dict[str, float]:
    """Mean per-image PSNR (and SSIM, LPIPS), codebook usage and perplexity over the whole split.

    Each process handles its contiguous shard, read through `num_workers` loader workers;
    `reduce_sum` adds the partial sums across processes.
    """
    was_training = model.training
    model.eval()
    # sums: count, psnr, ssim, lpips, squared error
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    code_counts = None  # {level: (codebooks, codebook_size)}: every residual depth has its own codebook
    rows = shard_range(len(dataset), rank, world_size)
    for batch in sequential_batches(dataset, rows, batch_size, num_workers, pin_memory=device.type == "cuda"):
        report_problems(batch.problems)
        images = batch.images(device)
        output = model(images)
        totals[0] += len(images)
        totals[1] += psnr_per_image(output.reconstruction, images).double().sum()
        if with_ssim:
            totals[2] += ssim_per_image(output.reconstruction, images).double().sum()
        if perceptual is not None:
            totals[3] += perceptual(output.reconstruction.float(), images).double() * len(images)
        totals[4] += (output.reconstruction.float() - images).pow(2).mean(dim=(1, 2, 3)).double().sum()
        batch_counts = count_codes(model, output.codes)
        code_counts = batch_counts if code_counts is None else {
            name: code_counts[name] + counts for name, counts in batch_counts.items()}
    model.train(was_training)
    if code_counts is None:  # this process had no rows: add zeros of the right shapes
        code_counts = count_codes(model, None)
    totals = reduce_sum(totals)
    code_counts = {name: reduce_sum(counts) for name, counts in code_counts.items()}
    count = totals[0].clamp_min(1)
    metrics = {"psnr": (totals[1] / count).item(), "mse": (totals[4] / count).item()}
    if with_ssim:
        metrics["ssim"] = (totals[2] / count).item()
    if perceptual is not None:
        metrics["lpips"] = (totals[3] / count).item()
    return {**metrics, **usage_statistics(code_counts)}


def count_codes(model, codes) -> dict[str, torch.Tensor]:
    """Per level, how often each code of each codebook occurs: (codebooks, codebook_size) float64."""
    size = model.codebook_size
    out = {}
    depth = model.codebooks_per_position
    for name in model.level_names:
        if codes is None:
            out[name] = torch.zeros(depth, size, dtype=torch.float64, device=next(iter(model.buffers())).device)
            continue
        grid = codes[name] if isinstance(codes, dict) else codes
        grid = grid.reshape(-1, depth) if depth > 1 else grid.reshape(-1, 1)
        out[name] = torch.stack([torch.bincount(grid[:, index], minlength=size) for index in range(depth)]).double()
    return out


def usage_statistics(code_counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """codebook_usage and perplexity averaged over every codebook; per level too when there are several."""
    per_codebook = [codebook_statistics(counts) for level in code_counts.values() for counts in level]
    metrics = {"codebook_usage": sum(s["codebook_usage"] for s in per_codebook) / len(per_codebook),
               "perplexity": sum(s["perplexity"] for s in per_codebook) / len(per_codebook)}
    if len(code_counts) > 1:
        for name, level in code_counts.items():
            stats = [codebook_statistics(counts) for counts in level]
            metrics[f"codebook_usage_{name}"] = sum(s["codebook_usage"] for s in stats) / len(stats)
    return metrics
