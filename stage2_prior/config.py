"""Configs of stage 2: the prior's architecture (config.json) and a training run.

`PriorConfig` holds what every arch shares (vocabulary, grid, stack depth, width, conditioning, head,
provenance); an arch's own settings are its `options` (a dataclass of the arch's, see
`stage2_prior.registry`), so a flag of one arch is never a field of another.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from shared.config import config_from_dict, option
from shared.errors import UserError
from shared.training import LoopConfig
from stage2_prior.registry import ARCHS, ArchOptions, arch_names, arch_spec, option_owners, text_archs
from stage2_prior.text import check_text_encoder, text_vocab_size

PIXEL_LEVELS = (2, 4, 16, 256)
# The default length of a prior run, in passes over the training codes. On the digits export (1,455
# training grids) the default prior's held-out bits/code bottom out after about 26 passes at a
# near-constant rate and then rise by 0.1 bits per 4 passes (docs/benchmarks.md); a fixed 3,000 steps
# was 130 passes and ended 3 bits above its best point.
AUTO_EPOCHS = 25
AUTO_MIN_STEPS = 200
AUTO_MAX_STEPS = 100_000
# Format 1 (the first releases) kept every arch's settings as flat fields of every config.
FORMAT1_ARCH_FIELDS = ("kernel_size", "num_heads", "attention_every", "position_embedding", "max_positions")


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture of a prior over code grids.

    Codes are (B, h, w) in [0, vocab_size), or (B, h, w, depth) for an ordered stack of codes per
    position (RGB subpixels, residual-quantizer depths). `options`: the arch's own settings, a dict or
    the arch's options dataclass (None: its defaults); `PriorConfig.build(**flat)` takes them flat.
    """

    vocab_size: int = option(512, "number of codes (the tokenizer's codebook_size, or pixel levels)")
    latent_shape: tuple[int, int] = option((8, 8), "code grid (h, w)")
    depth: int = option(1, "codes per position, generated in order (3 for RGB pixels, D for residual quantizers)")
    num_classes: int | None = option(None, "classes for a class-conditional prior; None: unconditional")
    arch: str = option("gated", "the network (see --help for the registered archs)", choices=arch_names)
    hidden_channels: int = option(64, "channels of each layer (the transformer's width)")
    num_layers: int = option(15, "layers (pixelsnail: gated layers in all; transformer: blocks; PixelRNN: LSTM layers)")
    dropout: float = option(0.1, "dropout inside each layer, in training only (code datasets are small)")
    head: Literal["softmax", "logistic_mixture"] = option(
        "softmax", "softmax: a categorical per code; logistic_mixture: PixelCNN++'s discretized logistic mixture "
                   "(pixel levels, channels coupled linearly)")
    mixtures: int = option(10, "logistic mixture components (head logistic_mixture)")
    label_dropout: float = option(0.0, "training: fraction of labels replaced by a null class, which enables "
                                       "classifier-free guidance at sampling time")
    condition_vocab_size: int | None = option(None, "vocabulary of a conditioning code map (e.g. the top level)")
    condition_shape: tuple[int, ...] | None = option(None, "conditioning code map (h, w) or (h, w, depth)")
    options: Any = option(None, "the arch's own options (a dict or its options dataclass; None: its defaults)")
    # Provenance, set by training from codes.json: which tokenizer and level the codes came from.
    tokenizer_sha256: str | None = option(None, "sha256 of the weights of the tokenizer that made the codes")
    level: str | None = option(None, "the tokenizer level this prior models (codes, top, bottom)")
    condition_level: str | None = option(None, "the tokenizer level its condition code map is")
    # A multi-scale token pyramid (VAR), from codes.json: the side of each scale's grid, coarse to fine; the
    # codes are then one sequence of every scale's grid in raster order, latent_shape (1, sum of sides squared).
    scales: tuple[int, ...] | None = option(None, "the sides of a multi-scale pyramid's grids (arch var)")
    # Text conditioning (stage2_prior.text): the encoder, and the caption tokenizer trained on the training captions
    text_encoder: str | None = option(None, "transformer: a text encoder trained with the prior, read by "
                                            "cross-attention (Parti); bpe: caption tokens prefix the code tokens in "
                                            "one causal stream (DALL-E; arch transformer); none: no text conditioning. "
                                            "Unset: transformer on captioned codes for an arch that reads text")
    text_tokenizer: Any = option(None, "the caption tokenizer (a `tokenizers` BPE, as its JSON object)", flag=False)
    text_encoder_path: str | None = option(None, "a local transformers folder (T5 or CLIP text model): its frozen "
                                                 "hidden states, read by cross-attention, instead of a trained encoder "
                                                 "(the prior keeps a copy in its folder)")
    text_encoder_sha256: str | None = option(None, "sha256 of the pretrained text encoder's weights", flag=False)
    text_length: int = option(32, "caption tokens the prior reads ([BOS] included); longer prompts are cut")
    text_layers: int = option(2, "layers of the text encoder")
    text_loss_weight: float = option(0.125, "with text_encoder bpe: the weight of the caption tokens' loss, "
                                            "the code tokens' weight is 1 minus it (DALL-E: 1/8 and 7/8)")
    caption_dropout: float = option(0.0, "training: fraction of captions replaced by the null caption, which "
                                         "enables classifier-free guidance on text")

    def __post_init__(self) -> None:
        spec = arch_spec(self.arch)
        object.__setattr__(self, "options", arch_options(self.arch, self.options))
        if self.vocab_size < 2 or self.num_layers < 1 or self.hidden_channels < 1:
            raise UserError("vocab_size >= 2, num_layers >= 1 and hidden_channels >= 1 are required")
        if len(self.latent_shape) != 2 or min(self.latent_shape) < 1:
            raise UserError(f"latent_shape must be (h, w) with h, w >= 1, got {self.latent_shape}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise UserError(f"num_classes must be None or at least 1, got {self.num_classes}")
        if self.depth < 1:
            raise UserError(f"depth must be at least 1, got {self.depth}")
        if self.head not in spec.heads:
            raise UserError(f"arch {self.arch} takes the heads {', '.join(spec.heads)}, not {self.head}")
        if self.channel_groups > 1 and self.hidden_channels % self.depth:
            raise UserError(f"arch {self.arch} orders a stack of {self.depth} codes by channel groups: "
                            f"--hidden-channels {self.hidden_channels} must be a multiple of {self.depth}")
        if self.head == "logistic_mixture":
            if self.vocab_size not in PIXEL_LEVELS or self.vocab_size == 2:
                raise UserError(f"the logistic mixture head models pixel levels 4, 16 or 256, not {self.vocab_size}; "
                                "use --head softmax for this vocabulary")
            if self.mixtures < 1:
                raise UserError(f"mixtures must be at least 1, got {self.mixtures}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.label_dropout > 0 and self.num_classes is None:
            raise UserError("label dropout (classifier-free guidance) needs a class-conditional prior")
        if (self.condition_vocab_size is None) != (self.condition_shape is None):
            raise UserError("condition_vocab_size and condition_shape go together")
        if self.condition_shape is not None:
            if len(self.condition_shape) not in (2, 3) or min(self.condition_shape) < 1:
                raise UserError(f"condition_shape must be (h, w) or (h, w, depth), got {self.condition_shape}")
            if any(side % cond for side, cond in zip(self.latent_shape, self.condition_shape[:2])):
                raise UserError(f"the condition grid {tuple(self.condition_shape[:2])} must divide the prior's grid "
                                f"{tuple(self.latent_shape)} (an aligned coarser level)")
        self.check_layout(spec)
        self.check_text(spec)
        self.options.check(self)

    def check_text(self, spec) -> None:
        if not 0.0 <= self.caption_dropout < 1.0:
            raise UserError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.text_encoder is None:
            if self.caption_dropout > 0 or self.text_encoder_path is not None:
                raise UserError("caption dropout and --text-encoder-path need a text-conditioned prior "
                                "(--text-encoder transformer)")
            return
        check_text_encoder(self.text_encoder)
        if self.text_encoder not in spec.text_encoders:
            names = text_archs(self.text_encoder)
            takers = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            what = "no text conditioning" if not spec.text_encoders else f"no text encoder {self.text_encoder!r}"
            raise UserError(f"arch {self.arch} takes {what}: use --arch {takers}, or pass --text-encoder none")
        if self.text_encoder_path is not None:
            if self.text_encoder != "transformer":
                raise UserError("--text-encoder-path gives the encoder that cross-attention reads: use it with "
                                "--text-encoder transformer")
        elif self.text_tokenizer is None:
            raise UserError("a text-conditioned prior needs its caption tokenizer (text_tokenizer)")
        if not 0.0 <= self.text_loss_weight < 1.0:
            raise UserError(f"text_loss_weight must lie in [0, 1), got {self.text_loss_weight}")
        if self.text_length < 2 or self.text_layers < 0:
            raise UserError(f"text_length must be at least 2 and text_layers at least 0, got {self.text_length} and "
                            f"{self.text_layers}")

    def check_layout(self, spec) -> None:
        """UserError for codes the arch does not read: a pyramid for a grid arch and the reverse, a stack or a
        code map for an arch that takes none."""
        if spec.reads == "scales":
            if self.scales is None:
                raise UserError(f"arch {self.arch} models a multi-scale token pyramid: train it on codes exported by a "
                                "--quantizer multiscale tokenizer")
            if any(b <= a for a, b in zip(self.scales, self.scales[1:])) or min(self.scales) < 1:
                raise UserError(f"scales must be increasing positive sides, got {list(self.scales)}")
            positions = sum(side * side for side in self.scales)
            if tuple(self.latent_shape) != (1, positions):
                raise UserError(f"a pyramid of scales {list(self.scales)} is one sequence of {positions} codes: "
                                f"latent_shape must be (1, {positions}), got {tuple(self.latent_shape)}")
        elif self.scales is not None:
            raise UserError(f"arch {self.arch} models one code grid, and these codes are a multi-scale pyramid "
                            f"(scales {' '.join(map(str, self.scales))}): use --arch "
                            f"{' or '.join(name for name, other in ARCHS.items() if other.reads == 'scales')}, or "
                            "export a single-grid tokenizer")
        if self.depth > 1 and not spec.stacks:
            raise UserError(f"arch {self.arch} models one code per position, these have a stack of {self.depth}; "
                            "use another --arch or a tokenizer with one code per position")
        if self.condition_vocab_size is not None and not spec.code_maps:
            raise UserError(f"arch {self.arch} takes no conditioning code map: drop --condition-level, or use another "
                            "--arch")

    @classmethod
    def build(cls, **values: Any) -> "PriorConfig":
        """A config from flat keywords: PriorConfig's fields, and the arch's options by name
        (`PriorConfig.build(arch="pixelsnail", attention_every=2, vocab_size=16)`)."""
        names = {field.name for field in dataclasses.fields(cls)}
        arch = values.get("arch", cls.arch)
        options_names = {field.name for field in dataclasses.fields(arch_spec(arch).options)}
        general = {key: value for key, value in values.items() if key in names and key != "options"}
        extra = {key: value for key, value in values.items() if key not in names}
        check_option_names(arch, extra, options_names)
        return cls(**general, options={**dict(values.get("options") or {}), **extra})

    @property
    def spec(self):
        return ARCHS[self.arch]

    @property
    def channel_groups(self) -> int:
        """Channel groups that order a position's stack inside the network (1: the head orders it)."""
        return self.depth if self.spec.channel_groups and self.head == "softmax" else 1

    @property
    def num_positions(self) -> int:
        return self.latent_shape[0] * self.latent_shape[1]

    @property
    def null_class(self) -> int | None:
        """The label index meaning 'no class' (classifier-free guidance), when the prior has one."""
        return self.num_classes if self.num_classes is not None and self.label_dropout > 0 else None

    @property
    def text_vocab_size(self) -> int | None:
        return None if self.text_tokenizer is None else text_vocab_size(self.text_tokenizer)

    @property
    def condition_grid(self) -> tuple[int, ...] | None:
        """The shape of one sample's condition code map: (hc, wc), or (hc, wc, Dc) for a stack."""
        if self.condition_shape is None:
            return None
        shape = tuple(self.condition_shape)
        return shape[:2] if len(shape) == 3 and shape[2] == 1 else shape


def arch_options(arch: str, values: Any) -> ArchOptions:
    """`values` (None, a dict or an options dataclass) as arch `arch`'s options dataclass, checked."""
    options_class = arch_spec(arch).options
    if values is None:
        return options_class()
    if isinstance(values, options_class):
        return values
    if isinstance(values, ArchOptions):
        raise UserError(f"arch {arch} takes {options_class.__name__}, not {type(values).__name__}")
    if not isinstance(values, dict):
        raise UserError(f"the options of arch {arch} must be a dict, got {values!r}")
    known = {field.name for field in dataclasses.fields(options_class)}
    check_option_names(arch, values, known)
    return config_from_dict(options_class, values, source=f"options of arch {arch}")


def check_option_names(arch: str, values: dict[str, Any], known: set[str], flags: bool = False) -> None:
    """UserError for the first key of `values` that is not an option of `arch`, naming the archs that take
    it, as flags (`--attention-every`, the command line) or keys (`attention_every`, the Python API)."""
    for name in values:
        if name in known:
            continue
        spelled = "--" + name.replace("_", "-") if flags else name
        owners = option_owners(name)
        if owners:
            other = f"--arch {owners[0]}" if flags else f"arch={owners[0]!r}"
            raise UserError(f"{spelled} is an option of arch {', '.join(owners)}, not of {arch}; "
                            f"pass {other} or drop {spelled}")
        known_text = ", ".join(sorted(known)) or "none"
        raise UserError(f"{spelled} is not an option of arch {arch} (its options: {known_text})")


def upgrade_format1(values: dict[str, Any]) -> dict[str, Any]:
    """A format-1 config.json (every arch's settings flat, for every arch) as format 2: the arch's own
    settings move into `options`; settings of other archs, which the arch never read, are dropped.
    PixelSNAIL folders keep the network they were trained with (`full_context` False: see its file)."""
    values = dict(values)
    arch = values.get("arch", PriorConfig.arch)
    known = {field.name for field in dataclasses.fields(arch_spec(arch).options)}
    options = {name: values.pop(name) for name in FORMAT1_ARCH_FIELDS if name in values}
    options = {name: value for name, value in options.items() if name in known}
    if "full_context" in known:
        options["full_context"] = False
    values["options"] = options
    return values


@dataclasses.dataclass(frozen=True)
class Stage2TrainConfig(LoopConfig):
    """A prior training run (train_config.json)."""

    codes: str = option("", "codes folder written by vqvae-export")
    level: str | None = option(None, "which level of a multi-level export to model (e.g. top, bottom)")
    condition_level: str | None = option(None, "a level of the same export to condition on (e.g. top)")
    tokenizer: str | None = option(None, "tokenizer folder for decoded sample grids (default: from codes.json if found)")
    conditional: bool = option(True, "class-conditional when the codes have labels")
    text_vocab_size: int = option(256, "with captioned codes: at most this many tokens in the caption tokenizer "
                                       "(a BPE trained on the training captions)")
    strict_captions: bool = option(False, "refuse codes rows without a caption instead of skipping them")
    validation_fraction: float = option(0.1, "held-out fraction of the codes for validation")
    validation_codes: str | None = option(None, "a separate codes folder to validate on (default: a held-out fraction)")
    sample_every: int = option(1000, "write a decoded sample grid every N steps (needs a tokenizer)")
    max_steps: int | None = option(None, f"optimizer steps (default: {AUTO_EPOCHS} passes over the training codes, "
                                         f"{AUTO_MIN_STEPS} to {AUTO_MAX_STEPS:,} steps; longer overfits a small export)")
    learning_rate: float = 1e-3
    batch_size: int = 64
    eval_every: int = 250
    save_every: int = 500


def default_max_steps(num_rows: int, global_batch_size: int) -> int:
    """The run length when --max-steps is not given: AUTO_EPOCHS passes over `num_rows` grids, clamped."""
    steps_per_epoch = math.ceil(num_rows / global_batch_size)
    return min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, AUTO_EPOCHS * steps_per_epoch))
