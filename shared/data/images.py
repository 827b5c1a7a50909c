"""One image: decoding, conversion to 8-bit grey or RGB, resizing, augmentation, and writing grids.

Every image becomes 8-bit grey or RGB the same way: EXIF orientation applied, 16-bit scaled (not
clipped) to 8 bits, palettes expanded, alpha composited onto white, CMYK converted. Then the shorter
side is resized to `image_size` (bicubic, antialiased), the centre cropped, and pixels are scaled
to [-1, 1] as (C, H, W) floats when they reach the model. Augmentation draws are a pure function
of (seed, micro-batch, example)."""
from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import first_line


SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
GREY_MODES = frozenset({"1", "L", "LA", "La", *SIXTEEN_BIT_MODES})


class ImageProblem(Exception):
    """An image that cannot be used; `where` names the row and file."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot read the image at {where}: {reason}")
        self.where, self.reason = where, reason

    def __reduce__(self):  # it travels from loader workers to the main process
        return ImageProblem, (self.where, self.reason)


def decode_image(value: Any, where: str) -> Image.Image:
    """A stored image (a {path, bytes} dict, a PIL image or an array) as a loaded PIL image."""
    if isinstance(value, dict):
        if value.get("path"):
            where = f"{where} ({value['path']})" if value["path"] not in where else where
        try:
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as error:
            raise ImageProblem(where, first_line(error)) from None
        return image
    if isinstance(value, Image.Image):
        return value
    try:
        return Image.fromarray(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise ImageProblem(where, first_line(error)) from None


def channels_of(image: Image.Image) -> int:
    """1 for grey images (a palette of greys included), 3 for colour ones (an alpha channel is dropped)."""
    if image.mode == "P":
        palette = image.getpalette() or []
        colours = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
        return 1 if len(colours) and (colours == colours[:, :1]).all() else 3
    return 1 if image.mode in GREY_MODES else 3


def to_8bit(image: Image.Image, channels: int, where: str) -> Image.Image:
    """Convert any PIL mode to 8-bit 'L' (channels 1) or 'RGB' (channels 3).

    16-bit grey is scaled by 255/65535 (PIL's own conversion clips at 255); transparency is
    composited onto white; palettes, CMYK and YCbCr go through PIL's conversions.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / 65535.0)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ImageProblem(where, "32-bit float images have no defined range; convert it to 8- or 16-bit")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    try:
        return image.convert("L" if channels == 1 else "RGB")
    except ValueError as error:  # modes PIL cannot convert (LAB, HSV, ...)
        raise ImageProblem(where, f"mode {image.mode} cannot be converted ({first_line(error)})") from None


def resize_and_centre_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (antialiased bicubic), centre-crop: uint8 (C, size, size)."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.BICUBIC)
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = np.array(image, dtype=np.uint8, copy=True)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, S, S)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (same shape)."""
    return pixels.float().div(127.5).sub(1.0)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training-time draws; off for evaluation and export."""

    seed: int = 0
    flip: bool = False
    crop: bool = False


def augmentation_draws(seed: int, micro_batch: int, index: int, base_size: int, image_size: int,
                       flip: bool, crop: bool) -> tuple[bool, int, int]:
    """(flip?, top, left) for example `index` in micro-batch `micro_batch`: a pure function of its inputs."""
    generator = np.random.default_rng([seed, micro_batch, index, 0xA06])
    top, left = (base_size - image_size) // 2, (base_size - image_size) // 2
    if crop:
        top, left = (int(value) for value in generator.integers(0, base_size - image_size + 1, size=2))
    return bool(flip and generator.random() < 0.5), top, left


def augment(base: torch.Tensor, draws: tuple[bool, int, int], image_size: int) -> torch.Tensor:
    """Crop (C, S, S) uint8 at (top, left) to image_size, flipped left-right when asked."""
    flip, top, left = draws
    cropped = base[:, top:top + image_size, left:left + image_size]
    return cropped.flip(-1) if flip else cropped


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save images (B, C, H, W) in [-1, 1] as one PNG grid (written to a temporary file, then renamed)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    save_image(images.detach().float().cpu().add(1).div(2).clamp(0, 1), str(temporary), nrow=nrow, padding=2,
               pad_value=1.0)
    os.replace(temporary, path)
