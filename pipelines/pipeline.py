"""`Pipeline`: a tokenizer and a prior that agree on codes, with one entry point, `generate()`.

    pipe = Pipeline.from_pretrained("runs/quickstart/pipeline")   # on the GPU when there is one
    out = pipe.generate(16, labels=3, seed=0)                      # out.images: 16 PIL images of a 3
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from shared.config import read_json, write_json_atomic
from shared.errors import UserError
from shared.pretrained import staged_folder
from stage1_vqvae.model import VQVAE
from stage2_prior.prior import Prior

PIPELINE_NAME = "pipeline.json"
PIPELINE_FORMAT_VERSION = 1
OUTPUT_TYPES = ("pil", "pt", "np")
# generate() decodes in padded chunks of this fixed size: convolution kernels may round differently
# for different batch sizes, and a fixed size keeps images bit-identical for any batch_size or split.
DECODE_CHUNK = 16


@dataclass
class GenerationOutput:
    images: Any  # list of PIL images, (N, C, H, W) float tensor in [0, 1] ("pt"), or (N, H, W, C) uint8 ("np")
    codes: torch.Tensor  # (N, h, w) int64


class Pipeline:
    """Prior sampling chained with decoding. Shapes and sizes are read from the parts' configs."""

    def __init__(self, tokenizer: VQVAE, prior: Prior) -> None:
        if prior.config.vocab_size != tokenizer.config.codebook_size:
            raise UserError(f"the prior's vocab_size {prior.config.vocab_size} differs from the tokenizer's "
                            f"codebook_size {tokenizer.config.codebook_size}; train the prior on this tokenizer's codes")
        if tuple(prior.config.latent_shape) != tuple(tokenizer.latent_shape):
            raise UserError(f"the prior's latent_shape {tuple(prior.config.latent_shape)} differs from the tokenizer's "
                            f"{tuple(tokenizer.latent_shape)}; train the prior on this tokenizer's codes")
        self.tokenizer = tokenizer.eval()
        self.prior = prior.eval()

    # ------------------------------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write pipeline.json + tokenizer/ + prior/ into a new folder (built aside, then renamed)."""
        directory = Path(directory)
        if directory.exists():
            raise UserError(f"{directory} already exists; remove it or choose another folder")
        with staged_folder(directory) as staging:
            self.tokenizer.save_pretrained(staging / "tokenizer")
            self.prior.save_pretrained(staging / "prior")
            write_json_atomic(staging / PIPELINE_NAME, {"_class_name": "Pipeline",
                                                        "format_version": PIPELINE_FORMAT_VERSION,
                                                        "tokenizer": "tokenizer", "prior": "prior"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> "Pipeline":
        """Load a pipeline folder onto `device` (default: the Accelerate device, a GPU when present)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"pipeline folder {directory} does not exist; pass a folder written by Pipeline.save_pretrained")
        missing = [part for part in (PIPELINE_NAME, "tokenizer", "prior") if not (directory / part).exists()]
        if missing:
            raise UserError(f"pipeline folder {directory} is incomplete: {', '.join(missing)} missing; "
                            "re-save it with Pipeline.save_pretrained")
        values = read_json(directory / PIPELINE_NAME)
        if values.get("_class_name") != "Pipeline" or values.get("format_version") != PIPELINE_FORMAT_VERSION:
            raise UserError(f"{directory / PIPELINE_NAME} is not a version-{PIPELINE_FORMAT_VERSION} pipeline file")
        pipeline = cls(VQVAE.from_pretrained(directory / values["tokenizer"]),
                       Prior.from_pretrained(directory / values["prior"]))
        return pipeline.to(device if device is not None else default_device())

    def to(self, device: str | torch.device) -> "Pipeline":
        self.tokenizer.to(device)
        self.prior.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def resolve_labels(self, num_images: int, labels: int | list[int] | torch.Tensor | None,
                       seed: int) -> torch.Tensor | None:
        """Labels (num_images,) for a conditional prior; None for an unconditional one."""
        num_classes = self.prior.config.num_classes
        if labels is None:
            if num_classes is None:
                return None
            # a conditional prior without labels: classes drawn from the seed, the same for any batch split
            return torch.randint(0, num_classes, (num_images,), generator=torch.Generator().manual_seed(seed))
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim == 0:
            labels = labels.expand(num_images)
        if labels.shape != (num_images,):
            raise UserError(f"labels must be an int or {num_images} ints, got {tuple(labels.shape)}")
        self.prior.check_labels(labels, num_images)
        return labels

    def iter_generate(self, num_images: int, *, labels=None, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None, batch_size: int | None = None,
                      first_index: int = 0, progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (b, C, H, W) in [0, 1] on the CPU, codes (b, h, w)) batch by batch.

        Image k is a function of (seed, first_index + k) alone. `labels` covers the num_images
        images of this call.
        """
        from tqdm.auto import tqdm

        if num_images < 1:
            raise UserError(f"num_images must be at least 1, got {num_images}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()))
        all_labels = self.resolve_labels(num_images, labels, seed)
        batch_size = batch_size or min(num_images, 64)
        with tqdm(total=num_images, desc="generating", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, num_images, batch_size):
                count = min(batch_size, num_images - start)
                batch_labels = None if all_labels is None else all_labels[start:start + count]
                with torch.inference_mode():
                    codes = self.prior.sample(count, labels=batch_labels, temperature=temperature, top_k=top_k,
                                              top_p=top_p, seed=seed, sample_offset=first_index + start)
                    images = self.decode_in_fixed_chunks(codes.to(self.device))
                bar.update(count)
                yield images.float().add(1).div(2).clamp(0, 1).cpu(), codes.cpu()

    def generate(self, num_images: int, *, labels=None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, batch_size: int | None = None,
                 output_type: str = "pil", progress: bool = True) -> GenerationOutput:
        """Sample `num_images` code grids from the prior and decode them.

        labels: an int (every image), a list of num_images ints, or None: an unconditional prior
        samples freely; a class-conditional one draws each image's class uniformly from the seed.
        The same seed gives the same images whatever `batch_size` is; seed=None draws one.
        Returns `.images` as `output_type` ("pil": PIL images, "pt": (N, C, H, W) float in [0, 1],
        "np": (N, H, W, C) uint8) and `.codes` (N, h, w).
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        batches = list(self.iter_generate(num_images, labels=labels, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, batch_size=batch_size, progress=progress))
        images = torch.cat([images for images, _ in batches])
        codes = torch.cat([codes for _, codes in batches])
        return GenerationOutput(convert_images(images, output_type), codes)

    # ------------------------------------------------------------------------------------------
    # Encoding, decoding, completion
    # ------------------------------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        config = self.tokenizer.config
        expected = (config.in_channels, config.image_size, config.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise UserError(f"images must be (B, {expected[0]}, {expected[1]}, {expected[2]}) in [-1, 1], "
                            f"got {tuple(images.shape)}")

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w)."""
        self.check_images(images)
        return self.tokenizer.encode(images.to(self.device))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, C, H, W) in [-1, 1]."""
        return self.tokenizer.decode(codes.to(self.device))

    @torch.inference_mode()
    def decode_in_fixed_chunks(self, codes: torch.Tensor) -> torch.Tensor:
        """decode(), always on batches of DECODE_CHUNK (the last one padded): results do not depend on len(codes)."""
        parts = []
        for start in range(0, len(codes), DECODE_CHUNK):
            chunk = codes[start:start + DECODE_CHUNK]
            padding = DECODE_CHUNK - len(chunk)
            if padding:
                chunk = torch.cat([chunk, chunk[:1].expand(padding, *chunk.shape[1:])])
            parts.append(self.tokenizer.decode(chunk)[:DECODE_CHUNK - padding])
        return torch.cat(parts)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """decode(encode(images)): images (B, C, H, W) in [-1, 1]."""
        return self.decode(self.encode(images))

    def complete(self, images: torch.Tensor, known_mask: torch.Tensor, *, labels=None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> GenerationOutput:
        """Fill in the unknown part of images (B, C, H, W) in [-1, 1].

        known_mask (B, H, W) bool marks known pixels. A latent cell keeps its code only when all its
        pixels are known; the other cells are sampled in raster order, then everything is decoded.
        labels as in generate() (drawn from the seed for a conditional prior when None).
        Returns images in [0, 1] (B, C, H, W) and the codes.
        """
        self.check_images(images)
        if known_mask.shape != (images.shape[0], *images.shape[2:]):
            raise UserError(f"known_mask must be (B, H, W) = {(images.shape[0], *images.shape[2:])}, "
                            f"got {tuple(known_mask.shape)}")
        factor = self.tokenizer.config.downsample_factor
        unknown = (~known_mask.bool()).float()[:, None]  # (B, 1, H, W)
        known_cells = F.max_pool2d(unknown, factor)[:, 0] == 0  # (B, h, w): every pixel of the cell known
        codes = self.encode(images)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()))
        labels = self.resolve_labels(images.shape[0], labels, seed)
        with torch.inference_mode():
            completed = self.prior.complete(codes, known_cells.to(codes.device), labels=labels, temperature=temperature,
                                            top_k=top_k, top_p=top_p, seed=seed)
            decoded = self.tokenizer.decode(completed)
        return GenerationOutput(decoded.float().add(1).div(2).clamp(0, 1).cpu(), completed.cpu())


def default_device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def convert_images(images: torch.Tensor, output_type: str) -> Any:
    """Images (N, C, H, W) float in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return images
    pixels = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    if output_type == "np":
        return pixels
    return [Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image) for image in pixels]


