"""The one list of prior archs: `ARCHS`, name -> `ArchSpec`.

Each arch file registers its archs at its end (`register_arch(ArchSpec(...))`), and importing the
`stage2_prior` package imports every arch file, so the registry is full before anything reads it.
The `--arch` choices and help, the flags of arch options, the benchmark recipes and the contract
test suite all read it; nothing else names the archs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from shared.codes import default_scales
from shared.config import option
from shared.errors import UserError

HEADS = ("softmax", "logistic_mixture")


@dataclasses.dataclass(frozen=True)
class ArchOptions:
    """An arch's own options: a frozen dataclass of `option(...)` fields, kept in config.json under
    "options" and offered as flags of `prior-train`. `check` refuses what the arch cannot build."""

    def check(self, config: Any) -> None:
        """UserError for a combination of these options with `config` (a PriorConfig) the arch cannot build."""


@dataclasses.dataclass(frozen=True)
class ConvolutionOptions(ArchOptions):
    """Options of the convolutional archs."""

    kernel_size: int = option(3, "odd filter size of the convolutional stacks")

    def check(self, config: Any) -> None:
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise UserError(f"--kernel-size must be odd and at least 3, got {self.kernel_size}")


def check_heads(num_heads: int, width: int) -> None:
    """UserError unless `num_heads` attention heads split a width of `width` channels."""
    if num_heads < 1 or width % num_heads:
        raise UserError(f"--num-heads {num_heads} does not divide --hidden-channels {width}; "
                        "pick a head count that divides the width")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What the registry knows of one arch name."""

    name: str  # the value of PriorConfig.arch and --arch
    model: type  # its Prior subclass (one class may implement several names)
    summary: str  # one line: what it is (the --arch help)
    options: type[ArchOptions] = ArchOptions  # its own options (none by default)
    # a stack of codes per position ordered by channel groups in the network (PixelRNN paper, sec. 3.4);
    # otherwise the base class's depth head orders it
    channel_groups: bool = False
    # every position sees every earlier one, at any grid size (the contract suite checks every position)
    full_context: bool = False
    heads: tuple[str, ...] = HEADS  # the output heads it takes
    # what it models: "autoregressive" (codes in an order, each given those before it: the sequential
    # decoders, Jacobi, beam search, log_prob) or "masked" (a bidirectional network filling masked codes in
    # rounds, MaskGIT: the rounds decoder)
    family: str = "autoregressive"
    # what it reads of a codes export: "grid" (one level, --level) or "scales" (every level of a multi-scale
    # pyramid, coarse to fine, as one sequence: VAR)
    reads: str = "grid"
    code_maps: bool = True  # takes a conditioning code map (--condition-level)
    # the text encoders it takes (stage2_prior.text): "transformer" (an encoder read by cross-attention, Parti),
    # "bpe" (caption tokens prefixing the code tokens in one causal stream, DALL-E); none: no text conditioning
    text_encoders: tuple[str, ...] = ()
    stacks: bool = True  # takes a stack of codes per position (depth > 1)
    # the benchmark recipe: general fields and options of the arch's default-size run (64 channels)
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the smallest config that exercises every part of it, for the contract tests
    tiny: dict[str, Any] = dataclasses.field(default_factory=dict)


ARCHS: dict[str, ArchSpec] = {}


def text_archs(encoder: str | None = None) -> list[str]:
    """The archs that take text conditioning (with `encoder`, when given)."""
    return [name for name, spec in ARCHS.items() if spec.text_encoders and (encoder is None or encoder in spec.text_encoders)]


FAMILIES = ("autoregressive", "masked")
READS = ("grid", "scales")


def register_arch(spec: ArchSpec) -> ArchSpec:
    if spec.family not in FAMILIES or spec.reads not in READS:
        raise RuntimeError(f"arch {spec.name!r}: family must be one of {FAMILIES} and reads one of {READS}")
    if spec.name in ARCHS and ARCHS[spec.name].model is not spec.model:
        raise RuntimeError(f"arch {spec.name!r} is registered twice ({ARCHS[spec.name].model.__name__}, "
                           f"{spec.model.__name__})")
    ARCHS[spec.name] = spec
    return spec


def arch_names() -> list[str]:
    return list(ARCHS)


def arch_spec(name: str) -> ArchSpec:
    """The registered arch `name`; a one-line error listing the registered ones otherwise."""
    if name not in ARCHS:
        raise UserError(f"unknown arch {name!r}; registered archs: {', '.join(ARCHS)}")
    return ARCHS[name]


def option_owners(name: str) -> list[str]:
    """The archs whose options include a field `name`."""
    return [arch for arch, spec in ARCHS.items()
            if name in {field.name for field in dataclasses.fields(spec.options)}]


def trained_scale(name: str, layers: int = 4, side: int | None = None) -> dict[str, Any]:
    """An arch at the default width with at most `layers` layers, in its tiny config's options: the size at
    which the exactness tests and benchmarks/guard.py give a model a trained prior's logit spread. With `side`,
    also its grid: side x side, or for a pyramid arch the default pyramid of that latent side."""
    spec = arch_spec(name)
    tiny = {key: value for key, value in spec.tiny.items() if key not in ("hidden_channels", "num_layers", "scales")}
    config = {**tiny, "arch": name, "num_layers": min(spec.recipe.get("num_layers", layers), layers)}
    if side is not None:  # a side x side grid, or for a pyramid arch the default pyramid of that side
        config["latent_shape"] = (side, side)
        if spec.reads == "scales":
            config["scales"] = default_scales(side)
            config["latent_shape"] = (1, sum(scale * scale for scale in config["scales"]))
    return config


def recipe_flags(name: str) -> list[str]:
    """The command-line flags of an arch's benchmark recipe (`prior-train --arch NAME ...`)."""
    spec = arch_spec(name)
    values = {**{key: value for key, value in spec.recipe.items() if key != "options"}, **spec.recipe.get("options", {})}
    flags = ["--arch", name]
    for key, value in values.items():
        flags += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return flags
