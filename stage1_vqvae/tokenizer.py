"""The tokenizer contract, the registry of tokenizer classes, and `load_tokenizer`.

A tokenizer turns images (B, C, H, W) in [-1, 1] into integer code grids and back. A subclass of
`Tokenizer` supplies:
- `encode(images) -> codes`: a tensor (B, h, w[, D]) for one level, or a dict level -> tensor for
  several, in generation order (a prior chain generates the levels in that order, each conditioned
  on the ones before);
- `decode(codes) -> images` (B, C, H, W) in [-1, 1], and `forward(images) -> TokenizerOutput`;
- `code_layout(image_size) -> tuple[LevelInfo, ...]`: what `encode` gives at that image size (each
  level's name, grid, vocabulary, stack depth and its column in a codes export);
- `check_images(images)`, and a config with `in_channels` and `image_size`.

Subclasses register by class name, the `_class_name` their config.json records: `load_tokenizer`,
the codes reader (`tokenizer_for_codes`), export and stage 2 find a class there and ask it; nothing
compares class names. Class attributes say the rest: `shortcut` (a spec "NAME:ARG" that builds one
without a folder, e.g. "pixels:256"), `codes_are_subpixels` (bits per code are bits per dimension),
`first_codes_format` (one level of one code per position is exported in codes.json format 1, as the
first release wrote it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch

from shared.codes import CodesMetadata, LevelInfo
from shared.config import read_json
from shared.errors import UserError
from shared.files import CONFIG_NAME, WEIGHTS_NAME, file_sha256
from shared.hub import resolve_folder
from shared.pretrained import PretrainedModel

Codes = torch.Tensor | dict[str, torch.Tensor]


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W) in [-1, 1]
    codes: Codes  # (B, h, w[, D]) int64, or a dict per level
    quantizer_loss: torch.Tensor  # scalar: commitment (and entropy) losses of every level


class Tokenizer(PretrainedModel):
    """Base of every tokenizer (see the module docstring)."""

    registry: ClassVar[dict[str, type["Tokenizer"]]] = {}  # class name -> class
    shortcut: ClassVar[str | None] = None
    codes_are_subpixels: ClassVar[bool] = False
    first_codes_format: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Tokenizer.registry[cls.__name__] = cls

    # the contract (every subclass overrides these)
    def encode(self, images: torch.Tensor) -> Codes:  # pragma: no cover
        raise NotImplementedError

    def decode(self, codes: Codes) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def code_layout(self, image_size: int | None = None) -> tuple[LevelInfo, ...]:  # pragma: no cover
        raise NotImplementedError

    # what follows from the layout
    @property
    def level_names(self) -> tuple[str, ...]:
        """Names of the code grids, in generation order: ("codes",), or ("top", "bottom")."""
        return tuple(level.name for level in self.code_layout())

    @property
    def level_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per level, the shape of one image's codes: (h, w), or (h, w, D) for a stack of D > 1."""
        return {level.name: level.grid_shape for level in self.code_layout()}

    @property
    def scales(self) -> tuple[int, ...] | None:
        """For a multi-scale pyramid (levels "scale_<side>", coarse to fine), the sides; else None."""
        return None

    @property
    def codebook_size(self) -> int:
        return self.code_layout()[0].vocab_size

    @property
    def latent_shape(self) -> tuple[int, int]:
        """The last (finest) level's grid (h, w)."""
        return tuple(self.code_layout()[-1].latent_shape)

    # building one without a folder, and finding the one that made a codes export
    @classmethod
    def from_shortcut(cls, argument: str, channels: int | None, image_size: int | None) -> "Tokenizer":
        raise NotImplementedError  # pragma: no cover: only classes with a `shortcut` are asked

    @classmethod
    def for_codes(cls, metadata: CodesMetadata) -> "Tokenizer | None":
        """The tokenizer that made an export, if it can be had: its folder, still where it was and with
        the same weights. Else None."""
        weights = Path(metadata.tokenizer_path) / WEIGHTS_NAME
        if weights.is_file() and file_sha256(weights) == metadata.tokenizer_sha256:
            return cls.from_pretrained(metadata.tokenizer_path)
        return None


def shortcut_names() -> list[str]:
    return [cls.shortcut for cls in Tokenizer.registry.values() if cls.shortcut]


def shortcut_class(spec: str | os.PathLike) -> type[Tokenizer] | None:
    """The tokenizer class whose shortcut `spec` ("NAME:ARG") names, or None for a folder path."""
    name = str(spec).split(":", 1)[0] if ":" in str(spec) else None
    return next((cls for cls in Tokenizer.registry.values() if cls.shortcut and cls.shortcut == name), None)


def load_tokenizer(spec: str | os.PathLike, channels: int | None = None, image_size: int | None = None,
                   map_location: str | torch.device = "cpu", revision: str | None = None) -> Tokenizer:
    """A tokenizer folder (its class from config.json) or Hub repo id (at `revision`), or a shortcut
    "NAME:ARG" such as "pixels:256" (then `channels` and `image_size` say the rest)."""
    shortcut = shortcut_class(spec)
    if shortcut is not None:
        return shortcut.from_shortcut(str(spec).split(":", 1)[1], channels, image_size)
    spec = resolve_folder(spec, revision)
    config_path = Path(spec) / CONFIG_NAME
    name = read_json(config_path).get("_class_name") if config_path.is_file() else None
    if name is not None and name not in Tokenizer.registry:
        raise UserError(f"{spec} holds a {name}, not a tokenizer (tokenizers: {', '.join(Tokenizer.registry)}); "
                        "pass a tokenizer folder")
    target = Tokenizer.registry[name] if name is not None else next(iter(Tokenizer.registry.values()))
    return target.from_pretrained(spec, map_location)  # no config.json: its one-line error


def tokenizer_class(metadata: CodesMetadata) -> type[Tokenizer]:
    """The class of the tokenizer that made an export."""
    if metadata.tokenizer_class not in Tokenizer.registry:
        raise UserError(f"these codes were made by a {metadata.tokenizer_class}, which this vqprior does not know "
                        f"(tokenizers: {', '.join(Tokenizer.registry)})")
    return Tokenizer.registry[metadata.tokenizer_class]


def tokenizer_for_codes(metadata: CodesMetadata) -> Tokenizer | None:
    """The tokenizer that made an export, if it can be had (see `Tokenizer.for_codes`)."""
    return tokenizer_class(metadata).for_codes(metadata)


def tokenizer_path(spec: str | os.PathLike) -> str:
    """How an export records where its tokenizer came from: a shortcut as written, a folder as an absolute path."""
    return str(spec) if shortcut_class(spec) is not None else str(Path(spec).resolve())
