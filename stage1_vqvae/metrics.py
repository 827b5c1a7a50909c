"""Reconstruction metrics over a whole split, exact under several processes (sums are reduced)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from shared.data import CachedImages, ImageDataset, sequential_batches, shard_range
from shared.errors import UserError

if TYPE_CHECKING:  # fid imports torchmetrics' image package, which training never needs
    from stage1_vqvae.fid import FrechetDistance


# SSIM as Wang et al. 2004 (sec. III.C) define it: an 11x11 Gaussian window of sigma 1.5, averaged
# over the positions where the whole window lies inside the image (scikit-image and the authors'
# MATLAB code do the same). torchmetrics >= 1.5 averages over reflection-padded borders too, which
# pulls small images far from the published numbers, so its full SSIM map is cropped here.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # 2 * int(3.5 * sigma + 0.5) + 1: the window torchmetrics and scikit-image derive from sigma
MAX_PSNR = 100.0  # dB, reported for identical images (their PSNR is infinite); keeps the JSON finite


def psnr_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (B,), on the [0, 1] scale (data range 1); inputs (B, C, H, W) in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    psnr = peak_signal_noise_ratio(_unit_scale(reconstruction), _unit_scale(target), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))  # (B,)
    return psnr.clamp_max(MAX_PSNR)


def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image (B,), on the [0, 1] scale (data range 1), averaged over channels and the
    positions a whole 11x11 window covers; inputs (B, C, H, W) in [-1, 1], at least 11 px a side."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if min(target.shape[2:]) < SSIM_WINDOW:
        raise UserError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its Gaussian window), "
                        f"got {tuple(target.shape[2:])}")
    _, ssim_map = structural_similarity_index_measure(
        _unit_scale(reconstruction), _unit_scale(target), gaussian_kernel=True, sigma=SSIM_SIGMA,
        kernel_size=SSIM_WINDOW, data_range=1.0, reduction="none", return_full_image=True)  # (B, C, H, W)
    border = SSIM_WINDOW // 2
    return ssim_map[..., border:-border, border:-border].flatten(1).mean(1)  # (B,)


def _unit_scale(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in float32 (half precision would lose the small differences SSIM measures)."""
    return images.float().add(1).div(2)


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
                           report_problems: Callable[[list[str]], None] = lambda problems: None,
                           fid: FrechetDistance | None = None) -> dict[str, float]:
    """Mean per-image PSNR (and SSIM, LPIPS), codebook usage and perplexity over the whole split,
    and with `fid` the rFID: the FID of the reconstructions against the originals.

    Each process handles its contiguous shard, read through `num_workers` loader workers;
    `reduce_sum` adds the partial sums across processes (torchmetrics reduces the FID statistics).
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
        if fid is not None:
            fid.add(images, real=True)
            fid.add(output.reconstruction, real=False)
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
    if fid is not None:
        metrics["rfid"] = fid.compute()
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
    if getattr(model, "shared_codebook", False):  # one codebook behind every level (multi-scale): count them together
        return {"all levels": sum(out.values())}
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
