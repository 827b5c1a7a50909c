"""`Prior`: the arch contract, and what every prior shares whatever its network.

p(codes) = prod over positions p in raster order, then over the stack d = 0..D-1 at p, of
p(code[p, d] | codes before (p, d), label, condition map, caption).

An arch is a subclass of `Prior` with a registry entry (`register_arch(ArchSpec(...))` at the end of
its file in `stage2_prior/archs/`; see `stage2_prior.registry`). It supplies:

1. `network(x, conditioning) -> features`: embedded codes (B, C, h', w) -> features (B, C, h', w), for
   any h' <= h rows (exact sampling recomputes prefixes). The features at raster position p depend
   only on codes before p and, for an arch that orders a stack by channel groups
   (`ArchSpec.channel_groups`), on the stack's lower groups at p. `conditioning`
   (`stage2_prior.conditioning.Conditioning`) holds the label rows (the null class included) and
   the code map's features on the grid; an arch adds them where it likes.
2. Optionally `state_class()`: its incremental state (`stage2_prior.incremental`), which makes the
   cached sampler; with a `chain`, also the compiled and CUDA-graph steps. What an arch does not
   supply it does not claim: no state, no "cached"; no chain, no "compiled" or "graph"
   (`sampling_methods`), and asking for one is a one-line error naming the methods it has.
3. Its options: `ArchSpec.options`, a dataclass of its own settings with their checks, stored under
   "options" in config.json and offered as flags of `prior-train`.

This class owns the rest: the embedding of stacked codes, labels and the condition network
(`stage2_prior.conditioning`), the output head (`stage2_prior.heads`), input checks, the loss,
`log_prob`, and the entry points of the decoders (`stage2_prior.decoding`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from shared.config import read_json
from shared.errors import UserError
from shared.hub import resolve_folder
from shared.pretrained import CONFIG_NAME, PretrainedModel
from stage2_prior.conditioning import (ConditionNetwork, Conditioning, Context, Prompt, check_context,
                                       dropped_labels, dropped_text, label_rows)
from stage2_prior.config import PriorConfig, upgrade_format1
from stage2_prior.decoding import (PRECISIONS, BeamSearchOutput, Sampler, SamplingOptions, SamplingStats, beam_search,
                                   cast_copy, check_num_beams, check_num_samples, draw, evaluation, resolve_seed,
                                   sampling_options)
from stage2_prior.heads import build_head, upgrade_format1_weights
from stage2_prior.incremental import IncrementalState
from stage2_prior.levels import TokenizerLevels
from stage2_prior.pretrained_text import PretrainedTextEncoder, resolve_encoder_path, save_with_encoder
from stage2_prior.text import TextEncoder, text_heads


class Prior(TokenizerLevels, PretrainedModel):
    """Base of every prior arch (see the module docstring); `Prior.from_config(config)` builds the arch's class."""

    config_class = PriorConfig
    validation_metric = "bits_per_code"  # what training validates (lower is better): the held-out NLL per code
    default_steps: int | None = None  # masked priors: rounds of sampling when the options name none
    format_version = 2  # 2: an arch's own settings under "options"; 1: flat, and the head's layers on the prior
    classes: ClassVar[dict[str, type["Prior"]]] = {}  # class name -> class, for config.json's _class_name

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Prior.classes[cls.__name__] = cls

    @staticmethod
    def from_config(config: PriorConfig) -> "Prior":
        """The arch's model for `config` (e.g. GatedPixelCNN for arch "gated")."""
        return config.spec.model(config)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", revision: str | None = None) -> "Prior":
        """A saved prior (a folder, or a Hub repo id at `revision`) as the class its config.json names, a `cls`."""
        directory = resolve_folder(directory, revision)
        config_path = directory / CONFIG_NAME
        name = read_json(config_path).get("_class_name") if config_path.is_file() else None
        target = Prior.classes.get(name) if name else None
        if target is not None and issubclass(target, cls):
            return PretrainedModel.from_pretrained.__func__(target, directory, map_location)
        return super().from_pretrained.__func__(cls, directory, map_location)  # its one-line errors

    @classmethod
    def resolve_config(cls, config: PriorConfig, directory: Path) -> PriorConfig:
        """A saved prior's pretrained text encoder is its own copy, `text_encoder/` in its folder."""
        return resolve_encoder_path(config, directory)

    def write_folder(self, directory: Path) -> Path:
        """config.json + model.safetensors, and a pretrained text encoder's folder beside them (`text_encoder/`)."""
        return save_with_encoder(self, directory, super().write_folder)

    @classmethod
    def upgrade_config(cls, values: dict[str, Any], version: int, source: str) -> dict[str, Any]:
        return upgrade_format1(values)

    @classmethod
    def upgrade_weights(cls, weights: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        return upgrade_format1_weights(weights)

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        if config.spec.model is not type(self):
            raise UserError(f"{type(self).__name__} does not implement arch {config.arch!r} "
                            f"({config.spec.model.__name__} does); build it with Prior.from_config(config)")
        channels, groups = config.hidden_channels, config.channel_groups
        # Embedding of a position's stack: into its channel group (channel-group archs), else summed.
        self.embedding = nn.Embedding(config.vocab_size * config.depth, channels // groups)
        self.condition_network = (ConditionNetwork(config.condition_vocab_size, tuple(config.condition_shape),
                                                   tuple(config.latent_shape), channels)
                                  if config.condition_vocab_size is not None else None)
        self.head = build_head(config)
        self.text_encoder = None
        if config.text_encoder_path is not None:  # frozen, pretrained: kept as its own folder (text_encoder/)
            self.text_encoder = PretrainedTextEncoder(config.text_encoder_path, channels, config.text_length)
        elif config.text_encoder == "transformer":
            self.text_encoder = TextEncoder(config.text_vocab_size, config.text_length, channels, text_heads(channels),
                                            config.text_layers, config.dropout)

    # ------------------------------------------------------------------------------------------
    # The arch's part (see the module docstring)
    # ------------------------------------------------------------------------------------------

    def network(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def state_class(self) -> type[IncrementalState] | None:
        """The arch's incremental state class, or None (no cached sampler)."""
        return None

    def start(self, batch_size: int, conditioning: Conditioning) -> IncrementalState:
        """A fresh incremental state for `batch_size` samples (the code map's features on the whole grid)."""
        return self.state_class()(self, batch_size, conditioning)

    @property
    def sampling_methods(self) -> tuple[str, ...]:
        """The methods this prior samples with, its default first."""
        state = self.state_class()
        if state is None:
            return ("naive", "jacobi")
        compiled = ("compiled", "graph") if state.chain is not None else ()
        return ("cached", "naive", *compiled, "jacobi")

    # ------------------------------------------------------------------------------------------
    # Shapes and checks
    # ------------------------------------------------------------------------------------------

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one sample's codes: (h, w), or (h, w, D) for stacks; (N,) for a multi-scale pyramid, every
        scale's grid in raster order, coarse to fine (inside, a grid of one row)."""
        if self.config.scales is not None:
            return (self.config.num_positions,)
        height, width = self.config.latent_shape
        return (height, width) if self.config.depth == 1 else (height, width, self.config.depth)

    @property
    def parallel_runs(self) -> list[tuple[int, int]] | None:
        """Runs of positions (first, count) in raster order whose features read only positions before the run,
        so that one network pass gives them all and their codes can be drawn at once (VAR's scales); None:
        every position reads the one before it."""
        return None

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def label_rows(self) -> int:
        """Rows of the class embedding tables: the classes, and the null class when there is one."""
        return label_rows(self.config)

    def check_codes(self, codes: torch.Tensor) -> None:
        shape = self.code_shape
        if codes.ndim != len(shape) + 1 or tuple(codes.shape[1:]) != shape or codes.dtype.is_floating_point:
            raise UserError(f"codes must be integers of shape (B, {', '.join(map(str, shape))}), "
                            f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.vocab_size):
            raise UserError(f"codes must lie in [0, {self.config.vocab_size}), got values in "
                            f"[{int(codes.min())}, {int(codes.max())}]")

    def context(self, labels: torch.Tensor | int | None, condition: torch.Tensor | None, batch_size: int,
                prompt: Prompt = None) -> Context:
        """The checked conditions of a batch (labels, condition code map, prompt) on the model's device."""
        return check_context(self.config, labels, condition, batch_size, self.device, prompt)

    def stacked(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as (B, h, w, D) whatever their public shape."""
        if codes.is_inference() and not torch.is_inference_mode_enabled():
            codes = codes.clone()  # codes from `sample` are inference tensors, which autograd cannot save
        return codes.reshape(len(codes), *self.config.latent_shape, self.config.depth)

    def public(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> the public shape (`code_shape`): (B, h, w) when D == 1."""
        return codes.reshape(len(codes), *self.code_shape)

    # ------------------------------------------------------------------------------------------
    # The full forward
    # ------------------------------------------------------------------------------------------

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Stacked codes (B, h, w, D) -> (B, C, h, w): channel group d holds entry d (channel-group archs),
        else the entries' embeddings are summed (the network then never sees a position's own stack)."""
        return rearrange(self.embed_stack(codes), "b h w c -> b c h w")

    def embed_stack(self, codes: torch.Tensor) -> torch.Tensor:
        """Stacks of codes (..., D) -> their embeddings (..., C), as `embed` (channels last, any leading shape:
        the cached samplers embed one row or one position at a time)."""
        depth, vocab = self.config.depth, self.config.vocab_size
        if depth == 1:  # one entry: no offsets to add, nothing to sum (the same values, fewer ops per position)
            return self.embedding(codes[..., 0].long())  # (..., C)
        offsets = torch.arange(depth, device=codes.device) * vocab
        vectors = self.embedding(codes.long() + offsets)  # (..., D, C / groups)
        if self.config.channel_groups > 1:
            return vectors.flatten(-2)  # (..., D * C / groups): group d holds entry d
        return vectors.sum(-2)

    def conditioning(self, context: Context, rows: int | None = None) -> Conditioning:
        """What the network reads for `context`: label rows (some dropped to the null class in training
        with label dropout), the code map's features on the first `rows` rows (all by default), and the
        encoded caption (some dropped to the null caption in training with caption dropout)."""
        code_map = text = None
        if context.code_map is not None:
            code_map = self.condition_network(context.code_map)[:, :, :rows]  # (B, C, rows, w)
        text_ids = dropped_text(self.config, context.text, self.training)
        if text_ids is not None and self.text_encoder is not None:
            text = self.text_encoder(text_ids)
        return Conditioning(dropped_labels(self.config, context.labels, self.training), code_map, text, text_ids)

    def text_nll(self, conditioning: Conditioning) -> torch.Tensor | None:
        """The mean NLL (nats) of the caption tokens, for an arch that models them (text encoder "bpe"), else None."""
        return None

    def features(self, stacked: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """Stacked codes (B, h', w, D), h' <= h rows -> network features (B, C, h', w)."""
        return self.network(self.embed(stacked), conditioning)

    def stack_logits(self, stacked: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """Stacked codes (B, h', w, D) -> logits (B, h', w, D, V): entry d at p given everything before it."""
        features = rearrange(self.features(stacked, conditioning), "b c h w -> b h w c")
        return self.head(features, stacked)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
                condition: torch.Tensor | None = None, prompt: Prompt = None
                ) -> torch.Tensor:
        """Codes (B, h, w[, D]) int -> logits (B, V, h, w[, D]): log-probabilities up to a constant of each
        code given the codes before it in raster-then-stack order (and the label, condition map and prompt)."""
        self.check_codes(codes)
        context = self.context(labels, condition, codes.shape[0], prompt)
        logits = rearrange(self.stack_logits(self.stacked(codes), self.conditioning(context)), "b h w d v -> b v h w d")
        return logits.reshape(*logits.shape[:2], *self.code_shape)  # (B, V, *code_shape)

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
            condition: torch.Tensor | None = None, prompt: Prompt = None) -> torch.Tensor:
        """Mean negative log-likelihood per code in nats (the training loss)."""
        self.check_codes(codes)
        context = self.context(labels, condition, codes.shape[0], prompt)
        stacked = self.stacked(codes)
        features = rearrange(self.features(stacked, self.conditioning(context)), "b c h w -> b h w c")
        return self.head.nll(features, stacked).mean() / self.config.depth

    def training_loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                      condition: torch.Tensor | None = None, prompt: Prompt = None) -> torch.Tensor:
        """What training minimises: `nll`, and for an arch that models the caption's tokens too (text encoder
        "bpe"), their NLL, weighted as DALL-E weights the two kinds of token (Ramesh et al. 2021, sec. 2.2:
        1/8 text, 7/8 image; `text_loss_weight`)."""
        if self.config.text_encoder != "bpe":
            return self.nll(codes, labels, condition, prompt=prompt)
        self.check_codes(codes)
        stacked = self.stacked(codes)
        conditioning = self.conditioning(self.context(labels, condition, codes.shape[0], prompt))
        features = rearrange(self.features(stacked, conditioning), "b c h w -> b h w c")
        loss = self.head.nll(features, stacked).mean() / self.config.depth
        weight = self.config.text_loss_weight
        return (1 - weight) * loss + weight * self.text_nll(conditioning)

    def validation_scores(self, codes: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None,
                          rows: torch.Tensor, prompt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, V, *code_shape), weights (B, *code_shape)): what validation scores, at which positions, of
        the split's rows `rows` (B,) (an autoregressive prior: every code given the codes before it, everywhere)."""
        return self(codes, labels, condition, prompt=prompt), torch.ones(codes.shape[:1] + self.code_shape, dtype=torch.bool,
                                                          device=codes.device)

    def log_prob(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
                 condition: torch.Tensor | None = None, precision: str = "float64",
                 prompt: Prompt = None) -> torch.Tensor:
        """Log-likelihood of each grid (B,) in nats (float64): the sum over its codes of log p(code | before).
        The network runs in `precision` (float64 by default, so scores do not depend on the batch)."""
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.check_codes(codes)
        return self.stack_log_prob(self.stacked(codes.to(self.device)),
                                   self.context(labels, condition, len(codes), prompt), precision)

    def stack_log_prob(self, stacked: torch.Tensor, context: Context, precision: str = "float64") -> torch.Tensor:
        """`log_prob` of checked stacked codes (B, h, w, D) and context."""
        with evaluation(self):
            model = cast_copy(self, getattr(torch, precision))
            features = rearrange(model.features(stacked, model.conditioning(context)), "b c h w -> b h w c")
            return -model.head.nll(features, stacked).double().flatten(1).sum(1)

    # ------------------------------------------------------------------------------------------
    # Decoding: the entry points (stage2_prior.decoding)
    # ------------------------------------------------------------------------------------------

    def sample(self, num_samples: int, labels: torch.Tensor | int | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
               method: str | None = None, *, seed: int | None = None, sample_offset: int = 0,
               condition: torch.Tensor | None = None, guidance_scale: float = 0.0, strategy: str = "sample",
               precision: str = "float64", window: int | None = None, guidance_schedule: str = "constant",
               steps: int | None = None, confidence_temperature: float = 4.5, options: SamplingOptions | None = None,
               sampler: Sampler | None = None, return_stats: bool = False,
               prompt: Prompt = None
               ) -> torch.Tensor | tuple[torch.Tensor, SamplingStats]:
        """Draw codes (num_samples, h, w[, D]) in raster order, then the stack.

        Sample k is drawn from uniforms seeded by (seed, sample_offset + k): the same codes for any
        batch split, process count, and for `method` "cached" (fast; the default where the arch has
        one), "naive" (one full forward per code), "compiled" (the cached step through torch.compile),
        "graph" (that step in CUDA graphs; a GPU only) and "jacobi" (every draw at once, iterated to the
        sequential sample: a few network passes instead of one per code; `window=W` iterates W positions
        at a time on the arch's cache, where the arch has a windowed step). seed=None draws a seed from `generator`
        (the global generator when None). `strategy="greedy"` (or temperature=0) takes the most
        likely code each time. `guidance_scale` s > 0 (priors trained with label dropout) uses the
        guided logits cond + s * (cond - uncond), with s moving over the decoder's steps by
        `guidance_schedule` ("constant", "linear", "power:P", "interval:A:B"; `GuidanceSchedule`).
        A masked prior (MaskGIT) fills the grid in `steps` rounds, with confidence noise
        `confidence_temperature` annealed to 0. `condition`: the code map of a conditioned prior.
        `precision`: the dtype the network runs in while sampling ("float64", or "float32": the same
        codes, faster only where few draws need the float64 check; "bfloat16": fast on GPUs, not exact).
        `options`: a SamplingOptions instead of the keywords above. `sampler`: a Sampler of this prior kept
        across calls (it measures its float error once; make a new one after the weights change); its
        options are used. `return_stats`: also return a SamplingStats (network passes per sample, draws
        re-decided in float64). `prompt`: the caption of a text-conditioned prior, one string for every sample
        or one per sample (guidance on text needs a prior trained with caption dropout).
        """
        check_num_samples(num_samples)
        if sampler is not None and sampler.model is not self:
            raise UserError("the sampler was made for another prior: pass a Sampler of this one")
        options = sampling_options(options if sampler is None else sampler.options, temperature=temperature,
                                   top_k=top_k, top_p=top_p, guidance_scale=guidance_scale, strategy=strategy,
                                   precision=precision, method=method, window=window,
                                   guidance_schedule=guidance_schedule, steps=steps,
                                   confidence_temperature=confidence_temperature)
        sampler = sampler or Sampler(self, options, copy_weights=False)  # resolves the options: their one check
        codes, stats = draw(sampler, num_samples, self.context(labels, condition, num_samples, prompt),
                            resolve_seed(seed, generator), sample_offset)
        return (self.public(codes), stats) if return_stats else self.public(codes)

    def complete(self, codes: torch.Tensor, known_mask: torch.Tensor, labels: torch.Tensor | int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, method: str | None = None, *, seed: int | None = None,
                 sample_offset: int = 0, condition: torch.Tensor | None = None, guidance_scale: float = 0.0,
                 strategy: str = "sample", precision: str = "float64", window: int | None = None,
                 guidance_schedule: str = "constant", steps: int | None = None, confidence_temperature: float = 4.5,
                 options: SamplingOptions | None = None, prompt: Prompt = None) -> torch.Tensor:
        """Keep `codes` where `known_mask` (the shape of codes) is True and sample the rest in order.

        The prior conditions only on codes earlier in raster order: a known code after an unknown one
        is kept, but does not inform the samples before it.
        """
        self.check_codes(codes)
        if known_mask.shape != codes.shape:
            raise UserError(f"known_mask must have the shape of codes {tuple(codes.shape)}, "
                            f"got {tuple(known_mask.shape)}")
        options = sampling_options(options, temperature=temperature, top_k=top_k, top_p=top_p,
                                   guidance_scale=guidance_scale, strategy=strategy, precision=precision, method=method,
                                   window=window, guidance_schedule=guidance_schedule, steps=steps,
                                   confidence_temperature=confidence_temperature)
        sampler = Sampler(self, options, copy_weights=False)
        completed, _ = draw(sampler, codes.shape[0], self.context(labels, condition, codes.shape[0], prompt),
                            resolve_seed(seed, generator), sample_offset, self.stacked(codes),
                            self.stacked(known_mask.bool()))
        return self.public(completed)

    def beam_search(self, num_samples: int = 1, labels: torch.Tensor | int | None = None, num_beams: int = 4, *,
                    condition: torch.Tensor | None = None, guidance_scale: float = 0.0,
                    guidance_schedule: str = "constant", method: str | None = None,
                    precision: str = "float64", prompt: Prompt = None) -> BeamSearchOutput:
        """The most likely grids under the prior found by beam search over raster-then-stack order:
        `num_beams` partial grids kept per sample, scored by their total (guided) log-probability.
        Returns the best grid of each sample, its log-probability under the prior (`log_prob`, nats)
        and the score the search maximised (the same without guidance)."""
        check_num_beams(num_beams, method)
        check_num_samples(num_samples)
        sampler = Sampler(self, SamplingOptions.build(guidance_scale=guidance_scale, precision=precision,
                                                      method=method, guidance_schedule=guidance_schedule),
                          guarded=False, copy_weights=False)
        return self.beam_search_with(sampler, num_samples, self.context(labels, condition, num_samples, prompt),
                                     num_beams)

    def beam_search_with(self, sampler: Sampler, num_samples: int, context: Context,
                         num_beams: int) -> BeamSearchOutput:
        """`beam_search` with a sampler of this prior (its options) and a checked context."""
        with evaluation(self):
            codes, score = beam_search(sampler, num_samples, context, num_beams)
        return BeamSearchOutput(self.public(codes), self.stack_log_prob(codes, context, sampler.options.precision),
                                score)


def bits_per_code(nats: float) -> float:
    return nats / math.log(2)
