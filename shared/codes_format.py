"""The codes format: what `codes.json` holds (`CodesMetadata`, one `LevelInfo` per level) and the names of
a codes folder's columns (see `shared.codes` for the folder and its reader).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from shared.errors import UserError

CODES_META_NAME = "codes.json"
CAPTION_COLUMN = "caption"  # a row's caption in an arrow export (None: it has none)
CAPTIONS_NAME = "captions.json"  # the captions of an npy export: a JSON list, one entry (str or null) per row
CODES_FORMAT_VERSION = 2
SINGLE_LEVEL = "codes"
FORMAT1_TOKENIZER_CLASS = "VQVAE"


def codes_dtype(vocab_size: int) -> str:
    """int16 when every code fits, else int32."""
    return "int16" if vocab_size <= 32767 else "int32"


def default_scales(side: int) -> tuple[int, ...]:
    """A multi-scale pyramid's default sides for a latent side: 1, then about 1/4, 3/8, 1/2 and 3/4 of it, then
    the side itself (8: 1 2 3 4 6 8, the scales of VAR's 8x8 example)."""
    return tuple(sorted({1, *(max(1, round(side * share)) for share in (1 / 4, 3 / 8, 1 / 2, 3 / 4)), side}))


def scale_level_name(side: int) -> str:
    """The level of one scale of a multi-scale export (VAR's token pyramid): "scale_<side>"."""
    return f"scale_{side}"


def level_column(name: str) -> str:
    """The column of a level in a codes export: "codes" for the single level, "codes_<name>" for the others."""
    return SINGLE_LEVEL if name == SINGLE_LEVEL else f"{SINGLE_LEVEL}_{name}"


@dataclasses.dataclass(frozen=True)
class LevelInfo:
    """One grid of codes per row: its column and what it holds."""

    name: str  # "codes", or "top" / "bottom"
    column: str  # "codes", or "codes_top" / "codes_bottom"
    vocab_size: int
    latent_shape: tuple[int, int]
    depth: int  # codes per position
    dtype: str

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Shape of one row's codes: (h, w), or (h, w, depth)."""
        return tuple(self.latent_shape) if self.depth == 1 else (*self.latent_shape, self.depth)


@dataclasses.dataclass(frozen=True)
class CodesMetadata:
    """The contents of codes.json."""

    format_version: int  # 1: the first release's (one level of one code per position); 2: levels described
    format: str  # "arrow" or "npy"
    levels: tuple[LevelInfo, ...]  # in generation order (top before bottom)
    num_rows: int
    has_labels: bool
    label_names: list[str] | None
    tokenizer_class: str  # the class name of the tokenizer (stage1_vqvae.tokenizer.Tokenizer.registry)
    tokenizer_config: dict[str, Any]
    tokenizer_sha256: str
    tokenizer_path: str  # where the tokenizer was at export time; trust it only if the hash still matches
    source: dict[str, Any]
    scales: tuple[int, ...] | None = None  # a multi-scale pyramid: the side of each level's grid, coarse to fine
    has_captions: bool = False  # a caption per row (str, or None for a row without one), for text conditioning

    def __post_init__(self) -> None:
        if self.scales is not None and [scale_level_name(side) for side in self.scales] != self.level_names:
            raise UserError(f"codes.json names the scales {list(self.scales)} but has the levels "
                            f"{', '.join(self.level_names)}; re-export the codes")

    @property
    def num_classes(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def level(self, name: str | None = None) -> LevelInfo:
        """The level called `name`, or the only one."""
        if name is None:
            if len(self.levels) > 1:
                raise UserError(f"these codes have levels {', '.join(self.level_names)}: pick one with --level")
            return self.levels[0]
        for level in self.levels:
            if level.name == name:
                return level
        raise UserError(f"these codes have no level {name!r} (levels: {', '.join(self.level_names)}); fix --level "
                        "or --condition-level, or export a tokenizer with that level")

    @property
    def level_names(self) -> list[str]:
        return [level.name for level in self.levels]

    # the single level's facts, as format 1 offered them
    @property
    def vocab_size(self) -> int:
        return self.level().vocab_size

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.level().latent_shape

    @property
    def dtype(self) -> str:
        return self.level().dtype

    @property
    def fits_first_format(self) -> bool:
        """A single level of one code per position: what format 1 can describe."""
        return len(self.levels) == 1 and self.levels[0].depth == 1 and self.levels[0].name == SINGLE_LEVEL

    def to_json(self) -> dict[str, Any]:
        common = {"num_rows": self.num_rows, "has_labels": self.has_labels, "label_names": self.label_names,
                  "tokenizer_config": self.tokenizer_config, "tokenizer_sha256": self.tokenizer_sha256,
                  "tokenizer_path": self.tokenizer_path, "source": self.source}
        if self.format_version == 1:
            level = self.levels[0]
            return {"format_version": 1, "format": self.format, "vocab_size": level.vocab_size,
                    "latent_shape": list(level.latent_shape), "dtype": level.dtype, **common}
        levels = [{**dataclasses.asdict(level), "latent_shape": list(level.latent_shape)} for level in self.levels]
        scales = {} if self.scales is None else {"scales": list(self.scales)}
        captions = {"has_captions": True} if self.has_captions else {}  # older readers still read caption-free exports
        return {"format_version": 2, "format": self.format, "levels": levels, "tokenizer_class": self.tokenizer_class,
                **scales, **captions, **common}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str) -> "CodesMetadata":
        version = values.get("format_version")
        if version == 1:
            expected = {"format_version", "format", "vocab_size", "latent_shape", "dtype", "num_rows", "has_labels",
                        "label_names", "tokenizer_config", "tokenizer_sha256", "tokenizer_path", "source"}
        elif version == 2:
            expected = {"format_version", "format", "levels", "tokenizer_class", "num_rows", "has_labels",
                        "label_names", "tokenizer_config", "tokenizer_sha256", "tokenizer_path", "source"}
        else:
            raise UserError(f"{where} has format_version {version}, this vqprior reads 1 and 2; re-export the codes")
        missing = sorted(expected - set(values))
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}; re-export the codes with vqvae-export")
        optional = {"scales", "has_captions"} if version == 2 else set()
        unknown = sorted(set(values) - expected - optional)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; was it written by a newer vqprior?")
        common = {key: values[key] for key in ("format", "num_rows", "has_labels", "label_names", "tokenizer_config",
                                               "tokenizer_sha256", "tokenizer_path", "source")}
        if version == 1:
            level = LevelInfo(SINGLE_LEVEL, SINGLE_LEVEL, values["vocab_size"], tuple(values["latent_shape"]), 1,
                              values["dtype"])
            # format 1 was written for the VQ-VAE tokenizer alone, and so does not name its class
            return cls(format_version=1, levels=(level,), tokenizer_class=FORMAT1_TOKENIZER_CLASS, **common)
        try:
            levels = tuple(LevelInfo(**{**level, "latent_shape": tuple(level["latent_shape"])})
                           for level in values["levels"])
        except TypeError as error:
            raise UserError(f"{where}: a level is malformed ({error}); re-export the codes") from None
        scales = tuple(values["scales"]) if values.get("scales") is not None else None
        return cls(format_version=2, levels=levels, tokenizer_class=values["tokenizer_class"], scales=scales,
                   has_captions=bool(values.get("has_captions", False)), **common)
