"""`shapes`: a built-in captioned dataset, generated deterministically (no download), and a checker that
reads an image and says whether it matches its caption.

An image (64x64 RGB, black background) holds one or two flat shapes: a circle, a square or a triangle, in
red, green, blue or yellow, small or large. Its caption names them, and for two the relation of their
centres: "a small red circle", "a large blue square left of a small yellow triangle" (left of, right of,
above, below).

Splits: `train` and `test` (seen compositions), and `heldout`: every caption names at least one held-out
(colour, shape) pair, which no training caption names (`HELD_OUT_PAIRS`: a compositional split, as in
CLEVR-CoGenT, Johnson et al. 2017, sec. 4.7).

The checker (`caption_matches`) finds objects by colour: each foreground pixel goes to the nearest palette
colour, objects are connected regions of one colour; a shape is told by how much of its bounding box it
fills (square 1, circle pi/4, triangle 1/2) and whether it narrows upwards (a triangle), a size by its
bounding box, a relation by the centroids.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SHAPES = "shapes"
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40)}
SHAPE_NAMES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.4}  # the side of a shape's bounding box, as a fraction of the image's
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT_PAIRS = frozenset({("blue", "triangle"), ("green", "circle")})
SPLIT_SIZES = {"train": 6000, "test": 600, "heldout": 600}
SPLIT_SEEDS = {"train": 11, "test": 12, "heldout": 13}
SIDE = 64
FOREGROUND = 90  # a pixel whose brightest channel reaches this is part of a shape
CAPTION = re.compile(r"a (small|large) (\w+) (\w+)(?: (left of|right of|above|below) a (small|large) (\w+) (\w+))?")


@dataclasses.dataclass(frozen=True)
class Thing:
    """One shape of a caption: size, colour and shape name."""

    size: str
    colour: str
    shape: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def caption_of(things: list[Thing], relation: str | None) -> str:
    return things[0].words() if len(things) == 1 else f"{things[0].words()} {relation} {things[1].words()}"


def parse_caption(caption: str) -> tuple[list[Thing], str | None]:
    """A caption of this dataset's grammar -> its things and relation; ValueError for any other text."""
    match = CAPTION.fullmatch(caption.strip().lower())
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    size, colour, shape, relation, *second = match.groups()
    things = [Thing(size, colour, shape)] + ([Thing(*second)] if relation else [])
    for thing in things:
        if thing.colour not in COLOURS or thing.shape not in SHAPE_NAMES:
            raise ValueError(f"not a shapes caption: {caption!r}")
    return things, relation


OPPOSITES = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SWAPS = ("colour", "shape", "size", "relation")


def swapped(caption: str, swap: str) -> str | None:
    """A two-thing caption with the things' `swap` ("colour", "shape" or "size") exchanged, or ("relation") its
    relation reversed: the same kind of words, bound otherwise, saying something else. None where it would say the
    same (two things alike in it) or the caption names one thing. A prior that reads captions as a bag of words
    cannot tell a colour, shape or size swap from the caption (`pipelines.captions.binding_gains`)."""
    if swap not in SWAPS:
        raise ValueError(f"swap must be one of {', '.join(SWAPS)}, got {swap!r}")
    things, relation = parse_caption(caption)
    if relation is None:
        return None
    first, second = things
    if swap == "relation":  # "X above X" and "X below X" say the same
        return None if first == second else caption_of(things, OPPOSITES[relation])
    if getattr(first, swap) == getattr(second, swap):
        return None
    return caption_of([dataclasses.replace(first, **{swap: getattr(second, swap)}),
                       dataclasses.replace(second, **{swap: getattr(first, swap)})], relation)


def draw_thing(canvas: ImageDraw.ImageDraw, thing: Thing, centre: tuple[float, float], side: int) -> None:
    extent = SIZES[thing.size] * side / 2
    x, y = centre
    box = (x - extent, y - extent, x + extent, y + extent)
    colour = COLOURS[thing.colour]
    if thing.shape == "circle":
        canvas.ellipse(box, fill=colour)
    elif thing.shape == "square":
        canvas.rectangle(box, fill=colour)
    else:  # an upright triangle: its box's bottom edge and the top's midpoint
        canvas.polygon([(x - extent, y + extent), (x + extent, y + extent), (x, y - extent)], fill=colour)


def random_thing(rng: np.random.Generator, held_out: bool | None) -> Thing:
    """A random thing; held_out True: a held-out (colour, shape) pair; False: never one; None: either."""
    while True:
        thing = Thing(str(rng.choice(list(SIZES))), str(rng.choice(list(COLOURS))), str(rng.choice(SHAPE_NAMES)))
        if held_out is None or ((thing.colour, thing.shape) in HELD_OUT_PAIRS) == held_out:
            return thing


def generate(rng: np.random.Generator, held_out: bool, side: int = SIDE) -> tuple[np.ndarray, str]:
    """One image (side, side, 3) uint8 and its caption. held_out: the caption names a held-out pair."""
    two = rng.random() < 0.6
    if not two:
        things, relation = [random_thing(rng, held_out)], None
    else:
        first_held = held_out and rng.random() < 0.5
        things = [random_thing(rng, True if first_held else (None if held_out else False)), None]
        things[1] = random_thing(rng, True if held_out and not first_held else (None if held_out else False))
        if held_out and not any((t.colour, t.shape) in HELD_OUT_PAIRS for t in things):
            things[1] = random_thing(rng, True)
        relation = str(rng.choice(RELATIONS))
    image = Image.new("RGB", (side, side))
    canvas = ImageDraw.Draw(image)
    if not two:
        margin = SIZES[things[0].size] * side / 2 + 1
        canvas_centre = rng.uniform(margin, side - margin, size=2)
        draw_thing(canvas, things[0], tuple(canvas_centre), side)
        return np.asarray(image), caption_of(things, relation)
    # two: the first in one half, the second in the other, as the relation says; each within its half
    horizontal = relation in ("left of", "right of")
    first_low = relation in ("left of", "above")  # the first has the smaller x (left of) or y (above)
    centres = []
    for index, thing in enumerate(things):
        extent = SIZES[thing.size] * side / 2
        low_half = (index == 0) == first_low
        along = rng.uniform(extent + 1, side / 2 - extent - 2) + (0 if low_half else side / 2 + 1)
        across = rng.uniform(extent + 1, side - extent - 1)
        centres.append((along, across) if horizontal else (across, along))
    for thing, centre in zip(things, centres):
        draw_thing(canvas, thing, centre, side)
    return np.asarray(image), caption_of(things, relation)


# `objects`, the label column of the built-in shapes (`--label-column objects`): which (colour, shape) pairs an
# image holds, regardless of size, place and order: 12 single pairs and 78 unordered two. A classifier of it must
# see every object's colour and shape, which makes its activations the features for FID on shapes
# (`python -m pipelines.features --dataset shapes --label-column objects`). 25 of the classes name a held-out pair
# and never occur in `train`: such a network has not seen a blue triangle, so FID on `heldout` with it says less.
OBJECTS_COLUMN = "objects"
_PAIRS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPE_NAMES]
OBJECT_SETS = _PAIRS + [f"{first} and {second}" for index, first in enumerate(_PAIRS) for second in _PAIRS[index:]]


def objects_label(caption: str) -> int:
    """The `objects` class of a shapes caption: its index in OBJECT_SETS."""
    pairs = sorted(_PAIRS.index(f"{thing.colour} {thing.shape}") for thing in parse_caption(caption)[0])
    return OBJECT_SETS.index(" and ".join(_PAIRS[index] for index in pairs))


def shapes_split(split: str, count: int | None = None, side: int = SIDE) -> tuple[list[np.ndarray], list[str]]:
    """The images and captions of a split ("train", "test", "heldout"), the same on every machine."""
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    count = SPLIT_SIZES[split] if count is None else count
    pairs = [generate(rng, held_out=split == "heldout", side=side) for _ in range(count)]
    return [image for image, _ in pairs], [caption for _, caption in pairs]


# ------------------------------------------------------------------------------------------------
# The checker
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Found:
    """An object the checker found: its thing and its centroid (x, y) in pixels."""

    thing: Thing
    centre: tuple[float, float]


def find_things(image: np.ndarray, min_area_fraction: float = 0.012) -> list[Found]:
    """The objects of an RGB image (H, W, 3) uint8: connected regions of one palette colour, larger than
    `min_area_fraction` of the image."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
    brightest = pixels.max(axis=2, keepdims=True)  # (H, W, 1)
    foreground = brightest[:, :, 0] >= FOREGROUND  # (H, W)
    # by chromaticity (each pixel over its brightest channel): an edge blended with the black background
    # keeps its hue, so it is not taken for a darker palette colour
    chroma, palette_chroma = pixels / np.maximum(brightest, 1), palette / palette.max(axis=1, keepdims=True)
    nearest = np.linalg.norm(chroma[:, :, None] - palette_chroma, axis=3).argmin(axis=2)  # (H, W)
    found = []
    for colour_index, colour in enumerate(COLOURS):
        regions, count = ndimage.label(foreground & (nearest == colour_index))
        for region in range(1, count + 1):
            ys, xs = np.nonzero(regions == region)
            if len(xs) < min_area_fraction * height * width:
                continue
            box_width, box_height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            fill = len(xs) / (box_width * box_height)
            # an upright triangle is narrow at the top and wide at the bottom; a circle is as wide at both
            widths = np.bincount(ys - ys.min(), minlength=box_height)  # (box_height,) pixels per row
            third = max(1, box_height // 3)
            tapered = widths[:third].mean() < 0.6 * widths[-third:].mean()
            shape = "square" if fill > 0.85 and not tapered else "triangle" if tapered else "circle"
            side = max(box_width, box_height) / max(height, width)
            size = "small" if side < sum(SIZES.values()) / 2 else "large"
            found.append(Found(Thing(size, colour, shape), (float(xs.mean()), float(ys.mean()))))
    return found


def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    (x1, y1), (x2, y2) = first, second
    return {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}[relation]


MISMATCHES = ("count", "colour", "shape", "size", "relation")


def mismatch(image: np.ndarray, caption: str) -> str | None:
    """Why the checker refuses an RGB image (H, W, 3) uint8 for a shapes caption, the first that applies of
    MISMATCHES: another number of objects, other colours, a colour on another shape, another size, or the
    right things against the relation; None when it shows exactly what the caption says."""
    things, relation = parse_caption(caption)
    found_objects = find_things(image)
    found_things = [f.thing for f in found_objects]
    for reason, key in (("count", lambda t: 0), ("colour", lambda t: t.colour),
                        ("shape", lambda t: (t.colour, t.shape)), ("size", lambda t: t.words())):
        if sorted(map(key, found_things)) != sorted(map(key, things)):
            return reason
    if relation is None:
        return None
    # the first thing of the caption against the second; with two alike, either assignment may hold
    firsts = [f for f in found_objects if f.thing == things[0]]
    seconds = [f for f in found_objects if f.thing == things[1]]
    holds = any(relation_holds(a.centre, b.centre, relation) for a in firsts for b in seconds if a is not b)
    return None if holds else "relation"


def caption_matches(image: np.ndarray, caption: str) -> bool:
    """Whether an RGB image (H, W, 3) uint8 shows exactly what a shapes caption says: its things (size,
    colour, shape) and nothing else, and for two things their relation."""
    return mismatch(image, caption) is None
