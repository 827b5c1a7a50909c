"""What a pipeline checks of its parts (the chain's order, shapes and provenance), and small conversions."""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from shared.errors import UserError
from stage2_prior import Prior
from stage2_prior.decoding import METHODS, PRECISIONS
from stage2_prior.decoding.options import GUIDANCE_SCHEDULES


def check_chain(tokenizer, priors: list[Prior]) -> None:
    """The priors generate the tokenizer's levels in order (one level each, or a pyramid's every scale),
    each conditioned on what came before it."""
    names = list(tokenizer.level_names)
    shapes = tokenizer.level_shapes
    generated = [name for member in priors for name in member.level_names]
    pyramids = [tuple(member.config.scales) for member in priors if member.config.scales is not None]
    if (pyramids or tokenizer.scales is not None) and (len(priors) != 1 or pyramids != [tokenizer.scales]):
        which = ("a pyramid of scales " + " ".join(map(str, tokenizer.scales)) if tokenizer.scales is not None
                 else "one grid per level")
        raise UserError(f"the tokenizer codes {which}, and a pyramid's pipeline is its tokenizer with one prior "
                        "trained on its codes (--arch var): pass the tokenizer and prior that go together")
    if len(generated) != len(names):
        raise UserError(f"the tokenizer has {len(names)} level(s) ({', '.join(names)}) but the pipeline has "
                        f"{len(priors)} prior(s); pass one prior per level, in order")
    done: list[str] = []
    for index, member in enumerate(priors):
        config = member.config
        for name in member.level_names:
            position = len(done)
            if len(names) > 1 and (position >= len(names) or name != names[position]):
                expected = names[position] if position < len(names) else "nothing more"
                raise UserError(f"prior {index + 1} of the chain models level {name!r} where the tokenizer has "
                                f"{expected!r}: the chain is out of order; list the priors as {', '.join(names)}")
            level = names[position] if position < len(names) else name
            shape = tuple(shapes[level])
            expected = tuple(member.split_levels(torch.zeros(1, *member.code_shape, dtype=torch.long))[name].shape[1:])
            if expected != shape:
                raise UserError(f"the prior's latent_shape {expected} differs from the tokenizer's {shape} "
                                f"(level {level}); train the prior on this tokenizer's codes")
            done.append(name)
        if config.vocab_size != tokenizer.codebook_size:
            raise UserError(f"the prior's vocab_size {config.vocab_size} differs from the tokenizer's "
                            f"codebook_size {tokenizer.codebook_size}; train the prior on this tokenizer's codes")
        if config.condition_level is not None and config.condition_level not in done[:-len(member.level_names)]:
            raise UserError(f"prior {config.level!r} is conditioned on level {config.condition_level!r}, which no "
                            "earlier prior of the chain generates; put that level's prior first")


def check_provenance_of(tokenizer, priors: list[Prior]) -> None:
    """Refuse a prior trained on another tokenizer's codes (same codebook size, other meaning)."""
    recorded = [member.config.tokenizer_sha256 for member in priors if member.config.tokenizer_sha256]
    if not recorded:
        return  # priors saved before provenance was recorded: nothing to check
    actual = tokenizer.weights_sha256()
    for digest in recorded:
        if digest != actual:
            raise UserError(f"the prior was trained on codes of another tokenizer (sha256 {digest[:12]}...), not this "
                            f"one ({actual[:12]}...): its codes would decode to garbage; pass the tokenizer that made "
                            "its codes (or check_provenance=False if you know better)")


def to_device(codes: Any, device: torch.device) -> Any:
    return {name: grid.to(device) for name, grid in codes.items()} if isinstance(codes, dict) else codes.to(device)


def to_cpu(codes: Any) -> Any:
    return to_device(codes, torch.device("cpu"))


def concatenate(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    return torch.cat(parts)


def convert_images(images: torch.Tensor, output_type: str) -> Any:
    """Images (N, C, H, W) float in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return images
    pixels = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    if output_type == "np":
        return pixels
    return [Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image) for image in pixels]


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags of `generate` and `evaluate` (`sampling_keywords` turns them into Pipeline keywords)."""
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (the most likely code each time)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--guidance-scale", type=float, default=0.0,
                        help="classifier-free guidance s: logits cond + s * (cond - uncond) (priors trained with "
                             "--label-dropout)")
    parser.add_argument("--guidance-schedule", default="constant",
                        help=f"how s moves over the decoder's steps: {', '.join(GUIDANCE_SCHEDULES)} (s t^P at "
                             "progress t; s only for t in [A, B])")
    parser.add_argument("--method", default=None, choices=list(METHODS),
                        help="cached (default where the arch has it), naive (one full forward per code), compiled "
                             "(the cached step through torch.compile; compiling takes seconds at the start), graph "
                             "(that step in CUDA graphs; needs a GPU), jacobi (every code at once, iterated to the "
                             "same codes in a few parallel passes: for GPUs and latency) or rounds (masked priors)")
    parser.add_argument("--window", type=int, default=None,
                        help="with --method jacobi: iterate this many positions at a time on the arch's cache "
                             "(archs with a windowed step, e.g. the transformer)")
    parser.add_argument("--steps", type=int, default=None,
                        help="masked priors (maskgit): rounds of parallel decoding (default 8)")
    parser.add_argument("--confidence-temperature", type=float, default=4.5,
                        help="masked priors: the confidence noise of the first round, annealed to 0")
    parser.add_argument("--precision", default="float64", choices=list(PRECISIONS),
                        help="the dtype the prior runs in while sampling (float64 and float32 draw the same codes; "
                             "bfloat16 is not exact)")


def sampling_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The Pipeline.samplers keywords of the flags `add_sampling_arguments` adds."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance_scale=args.guidance_scale,
                guidance_schedule=args.guidance_schedule, method=args.method, window=args.window, steps=args.steps,
                confidence_temperature=args.confidence_temperature, precision=args.precision)


def known_cells(known_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Which code cells of a (h, w) grid a pixel mask (B, H, W) knows, (B, h, w) bool: a cell is known when
    every pixel of its window is. Adaptive windows cover every pixel even where the grid's side does not
    divide the image's (VAR's scale 3 of a 32-pixel image), so no cell that saw an unknown pixel is kept."""
    unknown = (~known_mask.bool()).float()[:, None]  # (B, 1, H, W)
    return F.adaptive_max_pool2d(unknown, tuple(grid))[:, 0] == 0
