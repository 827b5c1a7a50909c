"""What a pipeline checks of its parts (the chain's order, shapes and provenance), and small conversions."""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from shared.codes import SINGLE_LEVEL
from shared.errors import UserError
from stage2_prior import Prior


def check_chain(tokenizer, priors: list[Prior]) -> None:
    """The priors generate the tokenizer's levels in order, each conditioned on what came before it."""
    names = list(tokenizer.level_names)
    shapes = tokenizer.level_shapes
    if len(priors) != len(names):
        raise UserError(f"the tokenizer has {len(names)} level(s) ({', '.join(names)}) but the pipeline has "
                        f"{len(priors)} prior(s); pass one prior per level, in order")
    for index, (name, member) in enumerate(zip(names, priors)):
        config = member.config
        level = config.level or SINGLE_LEVEL
        if len(names) > 1 and level != name:
            raise UserError(f"prior {index + 1} of the chain models level {level!r}, the tokenizer's level {index + 1} "
                            f"is {name!r}: the chain is out of order; list the priors as {', '.join(names)}")
        shape = tuple(shapes[name])
        expected = tuple(config.latent_shape) if config.depth == 1 else (*config.latent_shape, config.depth)
        if config.vocab_size != tokenizer.codebook_size:
            raise UserError(f"the prior's vocab_size {config.vocab_size} differs from the tokenizer's "
                            f"codebook_size {tokenizer.codebook_size}; train the prior on this tokenizer's codes")
        if expected != shape:
            raise UserError(f"the prior's latent_shape {expected} differs from the tokenizer's {shape} "
                            f"(level {name}); train the prior on this tokenizer's codes")
        if config.condition_level is not None and config.condition_level not in names[:index]:
            raise UserError(f"prior {level!r} is conditioned on level {config.condition_level!r}, which no earlier "
                            "prior of the chain generates; put that level's prior first")


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
