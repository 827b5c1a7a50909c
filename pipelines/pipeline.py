"""`Pipeline`: a tokenizer and the chain of priors that generates its codes, with one entry point, `generate()`.

    pipe = Pipeline.from_pretrained("runs/quickstart/pipeline")   # on the GPU when there is one
    out = pipe.generate(16, labels=3, seed=0)                      # out.images: 16 PIL images of a 3

A one-level tokenizer (a VQVAE, or a PixelTokenizer for pixel-space models) has one prior. A
two-level VQ-VAE-2 tokenizer has a chain: the top prior, then the bottom prior conditioned on the
top codes. Each prior records the sha256 of the tokenizer weights its codes came from; a pair that
does not match is refused (`check_provenance=False` for experts who know better).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from pipelines.parts import (check_chain, known_cells, check_provenance_of, concatenate, convert_images, to_cpu,
                             to_device)
from shared.codes import SINGLE_LEVEL
from shared.config import read_json, write_json_atomic
from shared.errors import UserError
from shared.hub import contained, push_folder, resolve_folder
from shared.pretrained import staged_folder
from stage1_vqvae.tokenizer import load_tokenizer
from stage2_prior import Prior, Sampler, SamplingOptions
from stage2_prior.conditioning import Context, check_labels, check_prompt
from stage2_prior.decoding import SEED_STRIDE, check_num_beams, check_num_samples, draw, sampling_options

PIPELINE_NAME = "pipeline.json"
PIPELINE_FORMAT_VERSION = 1  # one prior
CHAIN_FORMAT_VERSION = 2  # a chain of priors, one per level
OUTPUT_TYPES = ("pil", "pt", "np")
# generate() decodes in padded chunks of this fixed size: convolution kernels may round differently
# for different batch sizes, and a fixed size keeps images bit-identical for any batch_size or split.
DECODE_CHUNK = 16


@dataclass
class GenerationOutput:
    images: Any  # list of PIL images, (N, C, H, W) float tensor in [0, 1] ("pt"), or (N, H, W, C) uint8 ("np")
    codes: Any  # (N, h, w[, D]) int64, or {level: codes} for a chain of priors


class Pipeline:
    """Prior sampling chained with decoding. Shapes and sizes are read from the parts' configs."""

    def __init__(self, tokenizer, prior: Prior | list[Prior], check_provenance: bool = True) -> None:
        priors = list(prior) if isinstance(prior, (list, tuple)) else [prior]
        check_chain(tokenizer, priors)
        if check_provenance:
            check_provenance_of(tokenizer, priors)
        self.tokenizer = tokenizer.eval()
        self.priors = [member.eval() for member in priors]

    @property
    def prior(self) -> Prior:
        """The prior of a one-level pipeline (the last of a chain)."""
        return self.priors[-1]

    @property
    def is_chain(self) -> bool:
        return len(self.priors) > 1

    # ------------------------------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, push_to_hub: bool = False, repo_id: str | None = None,
                        **hub_options: Any) -> Path:
        """Write pipeline.json + tokenizer/ + prior/ (a chain: prior_<level>/ each) into a new folder; with
        `push_to_hub`, then upload it and a model card to the Hub repo `repo_id` (`shared.hub.push_folder`)."""
        if push_to_hub and not repo_id:
            raise UserError("push_to_hub=True needs repo_id='your-name/model-name'")
        directory = Path(directory)
        if directory.exists():
            raise UserError(f"{directory} already exists; remove it or choose another folder")
        with staged_folder(directory) as staging:
            self.tokenizer.save_pretrained(staging / "tokenizer")
            if not self.is_chain:
                self.prior.save_pretrained(staging / "prior")
                values = {"format_version": PIPELINE_FORMAT_VERSION, "tokenizer": "tokenizer", "prior": "prior"}
            else:
                names = [f"prior_{member.config.level}" for member in self.priors]
                for name, member in zip(names, self.priors):
                    member.save_pretrained(staging / name)
                values = {"format_version": CHAIN_FORMAT_VERSION, "tokenizer": "tokenizer", "priors": names}
            write_json_atomic(staging / PIPELINE_NAME, {"_class_name": "Pipeline", **values})
        if push_to_hub:
            push_folder(directory, repo_id, **hub_options)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        check_provenance: bool = True, revision: str | None = None) -> "Pipeline":
        """Load a pipeline folder, or a Hub repo id (at `revision`) through the Hub cache, onto `device`
        (default: the Accelerate device, a GPU when present)."""
        directory = resolve_folder(directory, revision)
        if not directory.is_dir():
            raise UserError(f"pipeline folder {directory} does not exist; pass a folder written by Pipeline.save_pretrained")
        if not (directory / PIPELINE_NAME).is_file():
            raise UserError(f"pipeline folder {directory} is incomplete: {PIPELINE_NAME} missing; "
                            "re-save it with Pipeline.save_pretrained")
        values = read_json(directory / PIPELINE_NAME)
        version = values.get("format_version")
        if values.get("_class_name") != "Pipeline" or version not in (PIPELINE_FORMAT_VERSION, CHAIN_FORMAT_VERSION):
            raise UserError(f"{directory / PIPELINE_NAME} is not a version-1 or -2 pipeline file")
        names = [values.get("prior")] if version == PIPELINE_FORMAT_VERSION else list(values.get("priors") or [])
        parts = [values.get("tokenizer"), *names]
        missing = [str(part) for part in parts  # a shared folder holds its parts: none may lie outside it
                   if not isinstance(part, str) or not contained(directory, part, "a part").exists()]
        if missing:
            raise UserError(f"pipeline folder {directory} is incomplete: {', '.join(missing)} missing; "
                            "re-save it with Pipeline.save_pretrained")
        priors = [Prior.from_pretrained(directory / name) for name in names]
        pipeline = cls(load_tokenizer(directory / values["tokenizer"]), priors, check_provenance)
        return pipeline.to(device if device is not None else PartialState().device)

    def to(self, device: str | torch.device) -> "Pipeline":
        self.tokenizer.to(device)
        for member in self.priors:
            member.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.prior.device

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int | None:
        return next((member.config.num_classes for member in self.priors if member.config.num_classes), None)

    @property
    def text_conditioned(self) -> bool:
        """Whether a prior of the chain reads a prompt."""
        return any(member.config.text_encoder is not None for member in self.priors)

    def resolve_labels(self, num_images: int, labels: int | list[int] | torch.Tensor | None,
                       seed: int) -> torch.Tensor | None:
        """Labels (num_images,) for a conditional chain, checked against every prior; None for an
        unconditional one."""
        num_classes = self.num_classes
        if labels is None:
            if num_classes is None:
                return None
            # a conditional prior without labels: classes drawn from the seed, the same for any batch split
            return torch.randint(0, num_classes, (num_images,), generator=torch.Generator().manual_seed(seed))
        if num_classes is None:
            raise UserError("this pipeline's priors are unconditional: pass labels=None")
        for member in self.priors:
            if member.config.num_classes:
                labels = check_labels(member.config, labels, num_images, torch.device("cpu"))
        return labels

    def resolve_prompts(self, num_images: int, prompt: str | list[str] | None) -> list[str] | None:
        """Prompts (num_images,) for a text-conditioned chain, checked against its text priors; None otherwise."""
        prompts = [prompt] * num_images if isinstance(prompt, str) else prompt
        text_priors = [member for member in self.priors if member.config.text_encoder is not None]
        for member in text_priors or self.priors[:1]:  # a missing prompt, or one for a chain without text
            check_prompt(member.config, prompts, num_images, torch.device("cpu"))
        return None if prompts is None else list(prompts)

    def samplers(self, options: SamplingOptions | None = None, num_beams: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 guidance_scale: float = 0.0, strategy: str = "sample", method: str | None = None,
                 precision: str = "float64", window: int | None = None, guidance_schedule: str = "constant",
                 steps: int | None = None, confidence_temperature: float = 4.5) -> list[Sampler]:
        """One Sampler per prior for a call: the SamplingOptions (`options`, or the keywords) made once and
        checked against every prior, so that a bad option is the one-line error `generate` gives before
        anything runs. They are for one call: they run on the priors' weights, which must not change meanwhile."""
        if num_beams is not None:
            check_num_beams(num_beams, method)
            for member in self.priors:
                if member.config.spec.family == "masked":
                    member.beam_search()  # its one-line refusal, before anything runs
            if temperature != 1 or top_k is not None or top_p is not None or strategy != "sample":
                raise UserError("beam search looks for the grid of the highest total log-probability under the prior: "
                                "drop temperature, top_k, top_p and strategy, or sample without num_beams")
        options = sampling_options(options, temperature=temperature, top_k=top_k, top_p=top_p,
                                   guidance_scale=guidance_scale, strategy=strategy, method=method, precision=precision,
                                   window=window, guidance_schedule=guidance_schedule, steps=steps,
                                   confidence_temperature=confidence_temperature)
        return [Sampler(member, options, guarded=num_beams is None, copy_weights=False) for member in self.priors]

    def _sample_chain(self, samplers: list[Sampler], count: int, labels: torch.Tensor | None, seed: int,
                      first_index: int, known: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                      num_beams: int | None = None, prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Codes of every level for `count` images, each level's prior conditioned on the earlier ones.
        Level k draws its uniforms from seed + k * SEED_STRIDE, so levels do not share them. With
        `num_beams`, each level is the most likely grid beam search finds instead of a draw."""
        codes: dict[str, torch.Tensor] = {}
        for index, (member, sampler) in enumerate(zip(self.priors, samplers)):
            config = member.config
            member_labels = None if config.num_classes is None or labels is None else labels.to(member.device)
            code_map = codes[config.condition_level] if config.condition_level else None
            text = check_prompt(config, prompts if config.text_encoder else None, count, member.device)
            context = Context(member_labels, code_map, text)
            level = config.level or SINGLE_LEVEL
            if num_beams is not None:  # the best grid of this level (given the levels before) beam search finds
                codes[level] = member.beam_search_with(sampler, count, context, num_beams).codes
                continue
            level_seed = (seed + index * SEED_STRIDE) % 2 ** 62
            known_codes = known_mask = None
            if known is not None:  # the prior's levels as one tensor (a pyramid's scales joined)
                known_codes = member.join_levels({name: known[name][0] for name in member.level_names})
                known_mask = member.join_levels({name: known[name][1] for name in member.level_names})
            stacked, _ = draw(sampler, count, context, level_seed, first_index,
                              None if known_codes is None else member.stacked(known_codes),
                              None if known_mask is None else member.stacked(known_mask))
            codes.update(member.split_levels(member.public(stacked)))
        return codes

    def _public(self, codes: dict[str, torch.Tensor]) -> Any:
        """The codes as the tokenizer takes them: one grid, or a dict per level."""
        return codes if len(codes) > 1 else next(iter(codes.values()))

    def iter_generate(self, num_images: int, *, labels=None, seed: int | None = None, batch_size: int | None = None,
                      first_index: int = 0, progress: bool = True, samplers: list[Sampler] | None = None,
                      num_beams: int | None = None, prompt: str | list[str] | None = None,
                      **keywords: Any) -> Iterator[tuple[torch.Tensor, Any]]:
        """Yield (images (b, C, H, W) in [0, 1] on the CPU, codes) batch by batch.

        Image k is a function of (seed, first_index + k) alone. `labels` covers the num_images
        images of this call. `samplers` (from `samplers()`), or the keywords of `generate`.
        """
        check_num_samples(num_images, "num_images")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        samplers = samplers or self.samplers(num_beams=num_beams, **keywords)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()))
        all_labels = self.resolve_labels(num_images, labels, seed)
        all_prompts = self.resolve_prompts(num_images, prompt)
        batch_size = batch_size or min(num_images, 64)
        with tqdm(total=num_images, desc="generating", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, num_images, batch_size):
                count = min(batch_size, num_images - start)
                batch_labels = None if all_labels is None else all_labels[start:start + count]
                with torch.inference_mode():
                    codes = self._sample_chain(samplers, count, batch_labels, seed, first_index + start,
                                               num_beams=num_beams,
                                               prompts=None if all_prompts is None else all_prompts[start:start + count])
                    images = self.decode_in_fixed_chunks(self._public(codes))
                bar.update(count)
                yield images.float().add(1).div(2).clamp(0, 1).cpu(), to_cpu(self._public(codes))

    def generate(self, num_images: int, *, labels=None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, batch_size: int | None = None,
                 output_type: str = "pil", progress: bool = True, guidance_scale: float = 0.0,
                 strategy: str = "sample", method: str | None = None, precision: str = "float64",
                 window: int | None = None, num_beams: int | None = None, guidance_schedule: str = "constant",
                 steps: int | None = None, confidence_temperature: float = 4.5,
                 options: SamplingOptions | None = None, prompt: str | list[str] | None = None) -> GenerationOutput:
        """Sample `num_images` code grids from the prior chain and decode them.

        labels: an int (every image), a list of num_images ints, or None: an unconditional prior
        samples freely; a class-conditional one draws each image's class uniformly from the seed.
        prompt: a text-conditioned chain's caption, one string for every image or one per image (an image
        does not depend on the other prompts of its batch).
        The same seed gives the same images whatever `batch_size` is; seed=None draws one.
        guidance_scale and guidance_schedule, strategy ("sample" or "greedy"), method (e.g. "jacobi": a few
        parallel network passes per level instead of one per code), window, precision, and a masked prior's
        steps and confidence_temperature: see `Prior.sample` (or pass them as one SamplingOptions,
        `options`). A chain of priors uses them level by level.
        num_beams: decode the most likely grid of each level that beam search finds (`Prior.beam_search`)
        instead of sampling (given the labels; for a chain, level by level).
        Returns `.images` as `output_type` ("pil": PIL images, "pt": (N, C, H, W) float in [0, 1],
        "np": (N, H, W, C) uint8) and `.codes` (N, h, w[, D]), or a dict per level for a tokenizer of
        several (a chain, or a pyramid's scales).
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        samplers = self.samplers(options, num_beams, temperature=temperature, top_k=top_k, top_p=top_p,
                                 guidance_scale=guidance_scale, strategy=strategy, method=method, precision=precision,
                                 window=window, guidance_schedule=guidance_schedule, steps=steps,
                                 confidence_temperature=confidence_temperature)
        batches = list(self.iter_generate(num_images, labels=labels, seed=seed, batch_size=batch_size,
                                          progress=progress, samplers=samplers, num_beams=num_beams, prompt=prompt))
        for sampler in samplers:
            sampler.release()
        images = torch.cat([images for images, _ in batches])
        return GenerationOutput(convert_images(images, output_type), concatenate([codes for _, codes in batches]))

    # ------------------------------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        config = self.tokenizer.config
        expected = (config.in_channels, config.image_size, config.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise UserError(f"images must be (B, {expected[0]}, {expected[1]}, {expected[2]}) in [-1, 1], "
                            f"got {tuple(images.shape)}")

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> Any:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w[, D]), or a dict per level."""
        self.check_images(images)
        return self.tokenizer.encode(images.to(self.device))

    @torch.inference_mode()
    def decode(self, codes: Any) -> torch.Tensor:
        """Codes as `encode` returns them -> images (B, C, H, W) in [-1, 1]."""
        return self.tokenizer.decode(to_device(codes, self.device))

    @torch.inference_mode()
    def decode_in_fixed_chunks(self, codes: Any) -> torch.Tensor:
        """decode(), always on batches of DECODE_CHUNK (the last one padded): results do not depend on len(codes)."""
        total = len(next(iter(codes.values()))) if isinstance(codes, dict) else len(codes)
        parts = []
        for start in range(0, total, DECODE_CHUNK):
            padding = DECODE_CHUNK - min(DECODE_CHUNK, total - start)

            def chunk_of(grid: torch.Tensor) -> torch.Tensor:
                chunk = grid[start:start + DECODE_CHUNK]
                return torch.cat([chunk, chunk[:1].expand(padding, *chunk.shape[1:])]) if padding else chunk

            chunk = {name: chunk_of(grid) for name, grid in codes.items()} if isinstance(codes, dict) else chunk_of(codes)
            parts.append(self.tokenizer.decode(to_device(chunk, self.device))[:DECODE_CHUNK - padding])
        return torch.cat(parts)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """decode(encode(images)): images (B, C, H, W) in [-1, 1]."""
        return self.decode(self.encode(images))

    def complete(self, images: torch.Tensor, known_mask: torch.Tensor, *, labels=None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 guidance_scale: float = 0.0, method: str | None = None, precision: str = "float64",
                 window: int | None = None, guidance_schedule: str = "constant", steps: int | None = None,
                 confidence_temperature: float = 4.5, options: SamplingOptions | None = None,
                 prompt: str | list[str] | None = None) -> GenerationOutput:
        """Fill in the unknown part of images (B, C, H, W) in [-1, 1].

        known_mask (B, H, W) bool marks known pixels. A code keeps its value only when every pixel
        it covers is known (in pixel mode: the pixel itself); the others are sampled in raster order,
        level by level, then everything is decoded. labels and prompt as in generate() (labels drawn from
        the seed for a conditional prior when None). Returns images in [0, 1] (B, C, H, W) and the codes.
        """
        codes = self.encode(images)  # checks the images
        if known_mask.shape != (images.shape[0], *images.shape[2:]):
            raise UserError(f"known_mask must be (B, H, W) = {(images.shape[0], *images.shape[2:])}, "
                            f"got {tuple(known_mask.shape)}")
        samplers = self.samplers(options, temperature=temperature, top_k=top_k, top_p=top_p,
                                 guidance_scale=guidance_scale, method=method, precision=precision, window=window,
                                 guidance_schedule=guidance_schedule, steps=steps,
                                 confidence_temperature=confidence_temperature)
        levels = codes if isinstance(codes, dict) else {SINGLE_LEVEL: codes}
        known = {}
        for name, grid in levels.items():
            cells = known_cells(known_mask, grid.shape[1:3])  # (B, h, w)
            cells = cells.to(grid.device)
            known[name] = (grid, cells[..., None].expand(grid.shape) if grid.ndim == 4 else cells)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()))
        labels = self.resolve_labels(images.shape[0], labels, seed)
        prompts = self.resolve_prompts(images.shape[0], prompt)
        with torch.inference_mode():
            completed = self._sample_chain(samplers, images.shape[0], labels, seed, 0, known=known, prompts=prompts)
            decoded = self.tokenizer.decode(self._public(completed))
        return GenerationOutput(decoded.float().add(1).div(2).clamp(0, 1).cpu(), to_cpu(self._public(completed)))
