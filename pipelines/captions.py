"""Caption accuracy of generated images, and a picture of prompts beside their samples.

`caption_accuracy` scores images against their prompts with the shapes checker
(`shared.data.shapes.caption_matches`: colours by palette, shape by fill and taper, relation by
centroids), split by the prompts' kind: one object or a relation of two, and whether the prompt names a
held-out (colour, shape) pair that no training caption names. `binding_gains` asks a prior whether it binds
each caption word to its thing.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from shared.data.shapes import HELD_OUT_PAIRS, MISMATCHES, SWAPS, caption_matches, mismatch, parse_caption, swapped


def prompt_kind(prompt: str) -> str:
    """"single" or "relation", with "_heldout" when it names a held-out (colour, shape) pair."""
    kind = "single" if parse_caption(prompt)[1] is None else "relation"
    return f"{kind}_heldout" if held_out_pairs(prompt) else kind


def caption_accuracy(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Images (N, H, W, 3) uint8 and their prompts -> the share the checker accepts: overall ("all") and per
    kind of prompt (`prompt_kind`), with the count of each ("n_<kind>")."""
    matches: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        matched = caption_matches(image, prompt)
        for key in ("all", prompt_kind(prompt)):
            matches.setdefault(key, []).append(matched)
    scores = {key: float(np.mean(values)) for key, values in matches.items()}
    scores.update({f"n_{key}": len(values) for key, values in matches.items()})
    return scores


def refusals(images: np.ndarray, prompts: list[str]) -> dict[str, dict[str, int]]:
    """Images (N, H, W, 3) uint8 and their prompts -> per kind of prompt, how many the checker refused for each
    reason (`shared.data.shapes.MISMATCHES`)."""
    counts: dict[str, dict[str, int]] = {}
    for image, prompt in zip(images, prompts):
        reason = mismatch(image, prompt)
        if reason is not None:
            kind = counts.setdefault(prompt_kind(prompt), dict.fromkeys(MISMATCHES, 0))
            kind[reason] += 1
    return counts


TIE_NATS = 1e-9  # log-likelihoods closer than this are equal: float64 rounding of one sum in another order


def binding_gains(prior, codes: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """How much better a text-conditioned prior explains code grids (B, ...) by their own shapes captions than by the
    same words bound otherwise (`shared.data.shapes.swapped`: colours, shapes or sizes exchanged between the two
    things, the relation reversed). Per swap, over the grids where it changes the caption and names no held-out pair
    the caption did not (that would measure an unseen pair, not binding; "n_<swap>"): the mean log-likelihood gain
    in nats per grid ("<swap>"), and the share of grids the true caption wins, a tie (within float64's
    rounding, TIE_NATS) counting half ("<swap>_wins"). A prior that reads its captions as a bag of words gains 0
    and wins half on colour, shape and size."""
    true = prior.log_prob(codes, prompt=captions)  # (B,) nats
    gains: dict[str, float] = {}
    for swap in SWAPS:
        others = {row: swapped(caption, swap) for row, caption in enumerate(captions)}
        rows = [row for row, other in others.items()
                if other is not None and held_out_pairs(other) <= held_out_pairs(captions[row])]
        if rows:
            difference = true[rows] - prior.log_prob(codes[rows], prompt=[others[row] for row in rows])  # (n,)
            tie = difference.abs() < TIE_NATS
            wins = (difference > 0).double().masked_fill(tie, 0.5)
            gains.update({swap: difference.mean().item(), f"{swap}_wins": wins.mean().item(), f"n_{swap}": len(rows)})
    return gains


def held_out_pairs(caption: str) -> set[tuple[str, str]]:
    """The held-out (colour, shape) pairs a shapes caption names."""
    return {(thing.colour, thing.shape) for thing in parse_caption(caption)[0]} & HELD_OUT_PAIRS


def save_prompt_grid(images: torch.Tensor, prompts: list[str], per_row: int, path: str | os.PathLike,
                     scale: int = 2, text_width: int = 300) -> None:
    """Images (N, C, H, W) in [0, 1], `per_row` per prompt, as one PNG: each row's prompt, then its samples."""
    rows = len(images) // per_row
    side = images.shape[-1] * scale
    pixels = (images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())  # (N, H, W, C)
    canvas = Image.new("RGB", (text_width + per_row * (side + 2), rows * (side + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for row in range(rows):
        top = row * (side + 2)
        draw.text((4, top + side // 2 - 6), prompts[row * per_row], fill="black")
        for column in range(per_row):
            tile = Image.fromarray(pixels[row * per_row + column].squeeze()).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (text_width + column * (side + 2), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    canvas.save(temporary)
    os.replace(temporary, path)
