"""`Prior`: what every autoregressive prior shares, whatever its network.

p(codes) = prod over positions p in raster order, then over the stack d = 0..D-1 at p, of
p(code[p, d] | codes before (p, d), label, condition map).

An arch (a subclass in `stage2_prior/archs/`) supplies only:
- `network(x, labels, condition)`: embedded codes (B, C, h', w) -> features (B, C, h', w), where the
  features at p see codes at positions < p (and, for channel-group archs, the stack at p below each group);
- `start(...)` / `step_features(...)`: the same features computed position by position from cached
  state, for the cached sampler (optional: without them only `method="naive"` samples).

This class owns the rest: input checks, the embedding of stacked codes, class labels (with the null
class of classifier-free guidance), the conditioning network for code maps, the output head
(softmax, or PixelCNN++'s discretized logistic mixture), `log_prob`, and the entry points of the one
sampling loop in `stage2_prior.sampling`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from shared.config import read_json
from shared.errors import UserError
from shared.pretrained import CONFIG_NAME, PretrainedModel
from stage2_prior.config import PriorConfig


COMPILED_CHAINS: dict = {}  # (function, method) -> torch.compile of it, compiled once per process


def compiled_chain(function, method: str):
    """`function` (a cached state's per-position step) through torch.compile; method "graph" adds CUDA
    graphs (mode reduce-overhead). Within a sample its shapes never change, so it compiles once; a
    new batch size or model compiles again, and after one such change the changed sizes are compiled
    as dynamic (dynamic=None), which keeps a session below dynamo's recompile limit (fullgraph=True
    would turn reaching that limit into an error; past it dynamo runs the function uncompiled)."""
    key = (function, method)
    if key not in COMPILED_CHAINS:
        mode = "reduce-overhead" if method == "graph" else "default"
        COMPILED_CHAINS[key] = torch.compile(function, mode=mode, dynamic=None)
    return COMPILED_CHAINS[key]


class CachedState:
    """What the sampler needs of every arch's incremental state, besides the arch's own tensors:
    `chain`, the per-position step as a function of tensors (`Prior.compile_steps` compiles it), and
    `reorder` (beam search)."""

    chain: Any  # staticmethod(the arch's per-position function); compile_steps sets a compiled one
    fixed_shapes = False  # set by `Prior.compile_steps`: the chain then takes the position as a tensor
    # Attributes (tensors, or lists / tuples of them) that the chain reads besides module parameters:
    # its weights, caches and position. CUDA graphs copy every input at every replay unless its address
    # is fixed, so method "graph" moves them into tensors kept on the model (`Prior.compile_steps`).
    graph_inputs: ClassVar[tuple[str, ...]] = ("position_tensor",)

    def __init__(self, device: torch.device) -> None:
        self.position_tensor = torch.zeros(1, dtype=torch.long, device=device)

    def position_input(self, position: int) -> int | torch.Tensor:
        """The raster position as the chain takes it: the int, or with fixed shapes the (1,) tensor
        holding it (a compiled chain specialises on ints, and would recompile at every position)."""
        if not self.fixed_shapes:
            return position
        return self.position_tensor.fill_(position)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch (beam search)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# Channel groups: how a network orders the stack of codes at one position (PixelRNN paper, sec. 3.4)
# ------------------------------------------------------------------------------------------------

def group_mask(out_channels: int, in_channels: int, groups: int, strict: bool, out_repeats: int = 1) -> torch.Tensor:
    """(out, in) mask: output group g sees input groups < g (strict, mask A) or <= g (mask B).

    Output channels are `out_repeats` consecutive blocks of `out_channels // out_repeats`, each split
    into `groups` groups (e.g. the two halves of a gated pre-activation).
    """
    block = out_channels // out_repeats
    out_group = (torch.arange(out_channels) % block) // (block // groups)  # (out,)
    in_group = torch.arange(in_channels) // (in_channels // groups)  # (in,)
    allowed = out_group[:, None] > in_group[None, :] if strict else out_group[:, None] >= in_group[None, :]
    return allowed.float()


class GroupLinear(nn.Conv2d):
    """A 1x1 convolution whose weights are masked by channel group (all ones for one group)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, strict: bool = False,
                 out_repeats: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.masked = groups > 1
        mask = group_mask(out_channels, in_channels, groups, strict, out_repeats) if self.masked else torch.ones(1, 1)
        self.register_buffer("mask", mask[:, :, None, None], persistent=False)

    @property
    def matrix(self) -> torch.Tensor:
        """The masked weight as an (out, in) matrix."""
        weight = self.weight * self.mask if self.masked else self.weight
        return weight.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask if self.masked else self.weight, self.bias)

    def vector(self, x: torch.Tensor) -> torch.Tensor:
        """The same map on per-position vectors (B, in) -> (B, out)."""
        return F.linear(x, self.matrix, self.bias)


# ------------------------------------------------------------------------------------------------
# Conditioning on an aligned code map (location-dependent conditioning, Gated PixelCNN paper sec. 2.3)
# ------------------------------------------------------------------------------------------------

class ConditionNetwork(nn.Module):
    """A coarser code grid (B, hc, wc[, Dc]) -> features (B, C, h, w) on the prior's grid.

    Embedded codes go through residual 3x3 convolutions at their own resolution, are upsampled by
    the integer factor between the grids (nearest), and mixed by one more 3x3 convolution. The map
    is known in full before sampling starts, so it needs no causal mask.
    """

    def __init__(self, vocab_size: int, condition_shape: tuple[int, ...], target_shape: tuple[int, int],
                 channels: int) -> None:
        super().__init__()
        self.depth = condition_shape[2] if len(condition_shape) == 3 else 1
        self.vocab_size = vocab_size
        self.scale = (target_shape[0] // condition_shape[0], target_shape[1] // condition_shape[1])
        self.embedding = nn.Embedding(vocab_size * self.depth, channels)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(channels, channels, 1)) for _ in range(2))
        self.out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        stacked = condition.long().reshape(*condition.shape[:3], self.depth)  # (B, hc, wc, Dc)
        offsets = torch.arange(self.depth, device=condition.device) * self.vocab_size
        x = self.embedding(stacked + offsets).sum(3).permute(0, 3, 1, 2)  # (B, C, hc, wc)
        for block in self.blocks:
            x = x + block(x)
        if self.scale != (1, 1):
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")  # (B, C, h, w)
        return self.out(F.relu(x))


# ------------------------------------------------------------------------------------------------
# The discretized logistic mixture (PixelCNN++, Salimans et al. 2017, sec. 2.1-2.2)
# ------------------------------------------------------------------------------------------------

def mixture_parameter_count(mixtures: int, depth: int) -> int:
    """Per position: M mixture logits, M*D means, M*D log-scales, M*D(D-1)/2 channel coefficients."""
    return mixtures * (1 + 2 * depth + depth * (depth - 1) // 2)


def split_mixture(params: torch.Tensor, mixtures: int, depth: int) -> tuple[torch.Tensor, ...]:
    """params (..., P) -> logit_pi (..., M), means (..., M, D), log_scales (..., M, D), coeffs (..., M, D(D-1)/2)."""
    m, d = mixtures, depth
    logit_pi, rest = params[..., :m], params[..., m:]
    means = rest[..., :m * d].unflatten(-1, (m, d))
    log_scales = rest[..., m * d:2 * m * d].unflatten(-1, (m, d)).clamp_min(-7.0)  # sec. 2.1: a floor on the scale
    coeffs = torch.tanh(rest[..., 2 * m * d:].unflatten(-1, (m, d * (d - 1) // 2)))
    return logit_pi, means, log_scales, coeffs


def coupled_means(means: torch.Tensor, coeffs: torch.Tensor, values: torch.Tensor, channel: int) -> torch.Tensor:
    """Mean of channel `channel` per component: mu + sum_{c < channel} coeff * value_c (sec. 2.2).

    means (..., M, D), coeffs (..., M, D(D-1)/2), values (..., D) in [-1, 1] -> (..., M).
    """
    mean = means[..., channel]
    first = channel * (channel - 1) // 2  # coefficients of earlier channels are stored channel by channel
    for previous in range(channel):
        mean = mean + coeffs[..., first + previous] * values[..., None, previous]
    return mean


def discretized_logistic_log_probs(mean: torch.Tensor, log_scale: torch.Tensor, levels: int,
                                   values: torch.Tensor | None = None) -> torch.Tensor:
    """log P(level) of a logistic (mean, scale) discretized to `levels` bins of [-1, 1], with the edge
    bins taking the tails (sec. 2.1). For `values` (in [-1, 1], broadcast with mean) the log-probability
    of those; else of every level, on a new last dimension (..., levels)."""
    if values is None:
        centres = torch.linspace(-1.0, 1.0, levels, device=mean.device, dtype=mean.dtype)
        x, mean, log_scale = centres, mean[..., None], log_scale[..., None]
    else:
        x = values
    half_bin = 1.0 / (levels - 1)
    inverse_scale = torch.exp(-log_scale)
    upper = inverse_scale * (x - mean + half_bin)
    lower = inverse_scale * (x - mean - half_bin)
    log_cdf_upper = upper - F.softplus(upper)  # log sigmoid(upper)
    log_one_minus_cdf_lower = -F.softplus(lower)  # log (1 - sigmoid(lower))
    # log(sigmoid(u) - sigmoid(l)) without cancellation: sigmoid(u) - sigmoid(l) = e^u (1 - e^(l-u)) / ((1 + e^u)(1 + e^l))
    log_middle = (torch.log((-torch.expm1(lower - upper)).clamp_min(1e-30)) + upper - F.softplus(upper)
                  - F.softplus(lower))
    edge_low = x <= -1.0 + 1e-6
    edge_high = x >= 1.0 - 1e-6
    return torch.where(edge_low, log_cdf_upper, torch.where(edge_high, log_one_minus_cdf_lower, log_middle))


def level_values(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Pixel levels [0, K) -> bin centres in [-1, 1] (float)."""
    return codes.float() * (2.0 / (levels - 1)) - 1.0


# ------------------------------------------------------------------------------------------------
# Output types
# ------------------------------------------------------------------------------------------------

@dataclass
class BeamSearchOutput:
    codes: torch.Tensor  # (B, h, w[, D]) the most likely grids found
    log_prob: torch.Tensor  # (B,) float64, their total log-probability under the prior (nats)


class Prior(PretrainedModel):
    """Base of every prior arch; `Prior.from_config(config)` builds the arch's class."""

    config_class = PriorConfig
    archs: ClassVar[tuple[str, ...]] = ()  # the config.arch values a subclass implements
    classes: ClassVar[dict[str, type["Prior"]]] = {}  # class name -> class, for from_pretrained
    by_arch: ClassVar[dict[str, type["Prior"]]] = {}
    cached_sampling: ClassVar[bool] = True  # whether the arch implements start/step_features

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Prior.classes[cls.__name__] = cls
        for arch in cls.__dict__.get("archs", ()):
            Prior.by_arch[arch] = cls

    @staticmethod
    def from_config(config: PriorConfig) -> "Prior":
        """The arch's model for `config` (e.g. GatedPixelCNN for arch "gated")."""
        import stage2_prior.archs  # noqa: F401  (registers every arch)

        return Prior.by_arch[config.arch](config)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "Prior":
        """Load any saved prior: the class comes from config.json (`Prior.from_pretrained`), or must be
        `cls` or a subclass of it (`GatedPixelCNN.from_pretrained`)."""
        import stage2_prior.archs  # noqa: F401

        config_path = Path(directory) / CONFIG_NAME
        name = read_json(config_path).get("_class_name") if config_path.is_file() else None
        target = Prior.classes.get(name) if name else None
        if target is not None and issubclass(target, cls):
            return PretrainedModel.from_pretrained.__func__(target, directory, map_location)
        return super().from_pretrained.__func__(cls, directory, map_location)  # its one-line errors

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        if config.arch not in type(self).archs:
            raise UserError(f"{type(self).__name__} implements arch {', '.join(type(self).archs)}, not "
                            f"{config.arch!r}; build it with Prior.from_config(config)")
        channels, depth, groups = config.hidden_channels, config.depth, config.channel_groups
        vocab = config.vocab_size
        # Embedding of a position's stack: into its channel group (channel-group archs), else summed.
        self.embedding = nn.Embedding(vocab * depth, channels // groups)
        self.condition_network = (ConditionNetwork(config.condition_vocab_size, tuple(config.condition_shape),
                                                   tuple(config.latent_shape), channels)
                                  if config.condition_vocab_size is not None else None)
        # Output head: two 1x1 layers. Channel groups: logits of stack entry d read groups <= d.
        if config.head == "logistic_mixture":
            out = mixture_parameter_count(config.mixtures, depth)
            self.head_hidden = GroupLinear(channels, channels, 1)
            self.head_out = GroupLinear(channels, out, 1)
        else:
            self.head_hidden = GroupLinear(channels, channels, groups)
            self.head_out = GroupLinear(channels, vocab * groups, groups)  # block d (vocab rows) reads groups <= d
        if depth > 1 and groups == 1 and config.head == "softmax":
            # the depth head: entry d of a position's stack sees the features and the entries before it
            self.depth_embedding = nn.Embedding(vocab * depth, channels)
            self.depth_position = nn.Parameter(torch.zeros(depth, channels))

    # ------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one sample's codes: (h, w), or (h, w, D) for stacks."""
        height, width = self.config.latent_shape
        return (height, width) if self.config.depth == 1 else (height, width, self.config.depth)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def check_codes(self, codes: torch.Tensor) -> None:
        shape = self.code_shape
        if codes.ndim != len(shape) + 1 or tuple(codes.shape[1:]) != shape or codes.dtype.is_floating_point:
            raise UserError(f"codes must be integers of shape (B, {', '.join(map(str, shape))}), "
                            f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.vocab_size):
            raise UserError(f"codes must lie in [0, {self.config.vocab_size}), got values in "
                            f"[{int(codes.min())}, {int(codes.max())}]")

    def check_labels(self, labels: torch.Tensor | int | None, batch_size: int) -> torch.Tensor | None:
        """Labels as a (batch_size,) int64 tensor (an int is repeated); None for unconditional models."""
        num_classes = self.config.num_classes
        if num_classes is None:
            if labels is not None:
                raise UserError("this prior is unconditional: pass labels=None (train with labelled codes "
                                "for a class-conditional prior)")
            return None
        if labels is None:
            raise UserError(f"this prior is class-conditional: pass labels in [0, {num_classes})")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise UserError(f"labels must be an int or {batch_size} ints, got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise UserError(f"labels must lie in [0, {num_classes}), got values in "
                            f"[{int(labels.min())}, {int(labels.max())}]")
        return labels

    def check_condition(self, condition: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """The conditioning code map (batch_size, hc, wc[, Dc]) on the model's device; None without one."""
        config = self.config
        if config.condition_shape is None:
            if condition is not None:
                raise UserError("this prior takes no condition code map: pass condition=None")
            return None
        shape = tuple(config.condition_shape)
        shape = shape[:2] if len(shape) == 3 and shape[2] == 1 else shape
        if condition is None:
            raise UserError(f"this prior is conditioned on a code map: pass condition of shape "
                            f"({batch_size}, {', '.join(map(str, shape))})")
        condition = torch.as_tensor(condition, device=self.device)
        if condition.dtype.is_floating_point or tuple(condition.shape) != (batch_size, *shape):
            raise UserError(f"the condition code map must be integers of shape ({batch_size}, "
                            f"{', '.join(map(str, shape))}), got {condition.dtype} {tuple(condition.shape)}")
        if condition.numel() and (int(condition.min()) < 0 or int(condition.max()) >= config.condition_vocab_size):
            raise UserError(f"the condition codes must lie in [0, {config.condition_vocab_size}), got values in "
                            f"[{int(condition.min())}, {int(condition.max())}]")
        return condition

    def stacked(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as (B, h, w, D) whatever their public shape."""
        return codes if self.config.depth > 1 else codes[..., None]

    def public(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> the public shape: (B, h, w) when D == 1."""
        return codes if self.config.depth > 1 else codes[..., 0]

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
            indices = codes[..., 0].long()
            if indices.is_inference() and not torch.is_inference_mode_enabled():
                indices = indices.clone()  # codes from `sample` are inference tensors, which autograd cannot save
            return self.embedding(indices)  # (..., C)
        offsets = torch.arange(depth, device=codes.device) * vocab
        vectors = self.embedding(codes.long() + offsets)  # (..., D, C / groups)
        if self.config.channel_groups > 1:
            return vectors.flatten(-2)  # (..., D * C / groups): group d holds entry d
        return vectors.sum(-2)

    def model_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Labels as the network sees them: in training with label dropout, some become the null class."""
        null = self.config.null_class
        if labels is None or null is None or not self.training:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.config.label_dropout
        return torch.where(drop, torch.full_like(labels, null), labels)

    @property
    def label_rows(self) -> int:
        """Rows of the class embedding tables: the classes, and the null class when there is one."""
        return (self.config.num_classes or 0) + (self.config.null_class is not None)

    def features(self, codes: torch.Tensor, labels: torch.Tensor | None,
                 condition: torch.Tensor | None) -> torch.Tensor:
        """Stacked codes (B, h', w, D), h' <= h rows -> network features (B, C, h', w)."""
        condition_features = None
        if condition is not None:
            condition_features = self.condition_network(condition)[:, :, :codes.shape[1]]  # (B, C, h', w)
        return self.network(self.embed(codes), labels, condition_features)

    def network(self, x: torch.Tensor, labels: torch.Tensor | None,
                condition: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - every arch overrides it
        raise NotImplementedError

    def head_logits(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Features (B, C, h', w) and stacked codes (B, h', w, D) -> logits (B, V, h', w, D); entry d at p
        depends on the features at p and on the codes (p, d' < d) (directly, or through channel groups)."""
        config = self.config
        hidden = F.relu(self.head_hidden(F.relu(features)))  # (B, C, h', w)
        if config.head == "logistic_mixture":
            params = rearrange(self.head_out(hidden), "b p h w -> b h w p")
            return rearrange(self.mixture_log_probs(params, codes), "b h w d v -> b v h w d")
        if config.channel_groups > 1:
            return rearrange(self.head_out(hidden), "b (d v) h w -> b v h w d", d=config.depth)
        if config.depth == 1:
            return self.head_out(hidden)[..., None]  # (B, V, h', w, 1)
        # depth head: features + position of the entry + the entries before it at this position
        earlier = self.depth_inputs(codes)  # (B, h', w, D, C)
        inputs = rearrange(features, "b c h w -> b h w 1 c") + earlier + self.depth_position  # (B, h', w, D, C)
        hidden = F.relu(F.linear(F.relu(inputs), self.head_hidden.matrix, self.head_hidden.bias))
        return rearrange(F.linear(hidden, self.head_out.matrix, self.head_out.bias), "b h w d v -> b v h w d")

    def depth_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """Exclusive running sum over the stack of the entries' depth embeddings: (B, h, w, D, C)."""
        offsets = torch.arange(self.config.depth, device=codes.device) * self.config.vocab_size
        vectors = self.depth_embedding(codes.long() + offsets)  # (B, h, w, D, C)
        return vectors.cumsum(3) - vectors

    def mixture_log_probs(self, params: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mixture parameters (..., P) and the stack (..., D) -> log p(entry d = k | entries < d): (..., D, K).

        The per-entry categorical of the mixture: component weights updated by the entries already
        seen, means coupled linearly to them. Summing the observed entries' values gives the joint
        log-likelihood of the mixture exactly (the chain rule)."""
        config = self.config
        levels = config.vocab_size
        logit_pi, means, log_scales, coeffs = split_mixture(params, config.mixtures, config.depth)
        values = level_values(codes, levels)  # (..., D)
        log_weight = F.log_softmax(logit_pi, dim=-1)  # (..., M)
        out = []
        for channel in range(config.depth):
            mean = coupled_means(means, coeffs, values, channel)  # (..., M)
            every_level = discretized_logistic_log_probs(mean, log_scales[..., channel], levels)  # (..., M, K)
            out.append(torch.logsumexp(log_weight[..., None] + every_level, dim=-2))  # (..., K)
            observed = discretized_logistic_log_probs(mean, log_scales[..., channel], levels,
                                                      values[..., channel, None])  # (..., M)
            log_weight = log_weight + observed
        return torch.stack(out, dim=-2)  # (..., D, K)

    def mixture_nll(self, params: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """-log p(stack) per position, straight from the mixture (no per-level tensor): (...,)."""
        config = self.config
        logit_pi, means, log_scales, coeffs = split_mixture(params, config.mixtures, config.depth)
        values = level_values(codes, config.vocab_size)
        total = F.log_softmax(logit_pi, dim=-1)  # (..., M)
        for channel in range(config.depth):
            mean = coupled_means(means, coeffs, values, channel)
            total = total + discretized_logistic_log_probs(mean, log_scales[..., channel], config.vocab_size,
                                                           values[..., channel, None])
        return -torch.logsumexp(total, dim=-1)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, h, w[, D]) int -> logits (B, V, h, w[, D]): log-probabilities up to a constant of each
        code given the codes before it in raster-then-stack order (and the label and condition map)."""
        self.check_codes(codes)
        labels = self.model_labels(self.check_labels(labels, codes.shape[0]))
        condition = self.check_condition(condition, codes.shape[0])
        stacked = self.stacked(codes)
        logits = self.head_logits(self.features(stacked, labels, condition), stacked)
        return logits if self.config.depth > 1 else logits[..., 0]

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
            condition: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per code in nats (the training loss)."""
        self.check_codes(codes)
        if self.config.head != "logistic_mixture":
            logits = self(codes, labels, condition)
            return F.cross_entropy(logits.float(), codes.long())
        labels = self.model_labels(self.check_labels(labels, codes.shape[0]))
        condition = self.check_condition(condition, codes.shape[0])
        stacked = self.stacked(codes)
        features = self.features(stacked, labels, condition)
        params = rearrange(self.head_out(F.relu(self.head_hidden(F.relu(features)))), "b p h w -> b h w p")
        return self.mixture_nll(params.float(), stacked).mean() / self.config.depth

    def log_prob(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
                 condition: torch.Tensor | None = None, precision: str = "float64") -> torch.Tensor:
        """Log-likelihood of each grid (B,) in nats (float64): the sum over its codes of log p(code | before).
        The network runs in `precision` (float64 by default, so scores do not depend on the batch)."""
        from stage2_prior.sampling import PRECISIONS, cast_copy, evaluation

        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        with evaluation(self):
            model = cast_copy(self, getattr(torch, precision))
            logits = model(codes.to(self.device), labels, condition).double()  # (B, V, h, w[, D])
            log_probs = F.log_softmax(logits, dim=1).gather(1, codes.long()[:, None].to(logits.device))
            return log_probs.flatten(1).sum(1)

    # ------------------------------------------------------------------------------------------
    # Incremental computation for the cached sampler (arch hooks)
    # ------------------------------------------------------------------------------------------

    def start(self, batch_size: int, labels: torch.Tensor | None, condition: torch.Tensor | None) -> Any:
        """A fresh incremental state for `batch_size` samples (arch hook; see `step_features`)."""
        raise UserError(f"arch {self.config.arch!r} has no cached sampler; use method='naive'")

    def compile_steps(self, state: Any, method: str) -> None:
        """Make `state` run its per-position step through torch.compile ("compiled") or in CUDA graphs
        ("graph": torch.compile's reduce-overhead mode). Every cached state names that step `chain`: a
        function of tensors whose shapes do not change over the grid (the position, where it reads one,
        is a tensor too, with `fixed_shapes` set), so it compiles once per shape.
        For CUDA graphs, the tensors the chain reads (`graph_inputs`) are copied into tensors kept on
        the model and marked static: the same addresses for every state of these shapes, so a graph
        recorded for one sample replays for the next (new addresses would make torch record it again,
        and stop graphing after 128 such re-records) and no weight or cache is copied per replay. So
        one such state per model and shapes is in use at a time (`run` measures its tolerance first)."""
        state.chain = compiled_chain(state.chain, method)
        state.fixed_shapes = True
        if method != "graph":
            return
        pool = self.__dict__.setdefault("_graph_inputs", {})  # (name, index, shape, dtype, device) -> tensor

        def fixed(name: str, index: int, tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            key = (name, index, tuple(tensor.shape), tensor.dtype, tensor.device)
            if key not in pool:
                pool[key] = torch.empty_like(tensor)
                torch._dynamo.mark_static_address(pool[key])
            return pool[key].copy_(tensor)

        for name in state.graph_inputs:
            value = getattr(state, name)
            if isinstance(value, (list, tuple)):
                setattr(state, name, type(value)(fixed(name, index, tensor) for index, tensor in enumerate(value)))
            else:
                setattr(state, name, fixed(name, 0, value))

    def step_features(self, state: Any, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        """Features (B, C) at (row, column) for stack entry `depth`, from `state` and the stacked codes
        (B, h, w, D), which hold every code before (row, column, depth) (arch hook)."""
        raise NotImplementedError

    def head_step(self, features: torch.Tensor, codes_here: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits (B, V) of stack entry `depth` at one position from its features (B, C) and the stack
        there (B, D), of which entries < depth are known. The same arithmetic as `head_logits`."""
        config = self.config
        hidden = F.relu(self.head_hidden.vector(F.relu(features)))  # (B, C)
        if config.head == "logistic_mixture":
            params = self.head_out.vector(hidden)  # (B, P)
            return self.mixture_log_probs(params, codes_here)[:, depth]  # (B, K)
        if config.channel_groups > 1:
            vocab = config.vocab_size
            rows = slice(depth * vocab, (depth + 1) * vocab)
            return F.linear(hidden, self.head_out.matrix[rows], self.head_out.bias[rows])
        if config.depth == 1:
            return self.head_out.vector(hidden)
        earlier = self.depth_inputs(codes_here[:, None, None])[:, 0, 0, depth]  # (B, C)
        inputs = F.relu(features + earlier + self.depth_position[depth])
        return self.head_out.vector(F.relu(self.head_hidden.vector(inputs)))

    # ------------------------------------------------------------------------------------------
    # Sampling: one loop for every arch (stage2_prior.sampling)
    # ------------------------------------------------------------------------------------------

    def sample(self, num_samples: int, labels: torch.Tensor | int | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
               method: str | None = None, *, seed: int | None = None, sample_offset: int = 0,
               condition: torch.Tensor | None = None, guidance_scale: float = 0.0,
               strategy: str = "sample", precision: str = "float64") -> torch.Tensor:
        """Draw codes (num_samples, h, w[, D]) in raster order, then the stack.

        Sample k is drawn from uniforms seeded by (seed, sample_offset + k): the same codes for any
        batch split, process count, and for `method` "cached" (fast; the default where the arch has
        one), "naive" (one full forward per code), "compiled" (the cached step through torch.compile)
        and "graph" (that step in CUDA graphs; a GPU only). `strategy="greedy"` (or temperature=0) takes the
        most likely code each time. `guidance_scale` s > 0 (priors trained with label dropout) uses
        the guided logits cond + s * (cond - uncond). `condition`: the code map of a conditioned prior.
        `precision`: the dtype the network runs in while sampling ("float64", or "float32": the same
        codes, faster only where few draws need the float64 check; "bfloat16": fast on GPUs, not
        exact: codes may differ between methods and batch sizes; see stage2_prior.sampling).
        """
        from stage2_prior.sampling import SamplingOptions, sample_codes

        options = SamplingOptions.build(temperature, top_k, top_p, guidance_scale, strategy, precision)
        return sample_codes(self, num_samples, labels, condition, options, generator, method, seed, sample_offset)

    def complete(self, codes: torch.Tensor, known_mask: torch.Tensor, labels: torch.Tensor | int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, method: str | None = None, *, seed: int | None = None,
                 sample_offset: int = 0, condition: torch.Tensor | None = None, guidance_scale: float = 0.0,
                 strategy: str = "sample", precision: str = "float64") -> torch.Tensor:
        """Keep `codes` where `known_mask` (the shape of codes) is True and sample the rest in order.

        The prior conditions only on codes earlier in raster order: a known code after an unknown one
        is kept, but does not inform the samples before it.
        """
        from stage2_prior.sampling import SamplingOptions, sample_codes

        self.check_codes(codes)
        if known_mask.shape != codes.shape:
            raise UserError(f"known_mask must have the shape of codes {tuple(codes.shape)}, "
                            f"got {tuple(known_mask.shape)}")
        options = SamplingOptions.build(temperature, top_k, top_p, guidance_scale, strategy, precision)
        return sample_codes(self, codes.shape[0], labels, condition, options, generator, method, seed, sample_offset,
                            known_codes=codes, known_mask=known_mask.bool())

    def beam_search(self, num_samples: int = 1, labels: torch.Tensor | int | None = None, num_beams: int = 4, *,
                    condition: torch.Tensor | None = None, guidance_scale: float = 0.0,
                    method: str | None = None, precision: str = "float64") -> BeamSearchOutput:
        """The most likely grids under the prior found by beam search over raster-then-stack order:
        `num_beams` partial grids kept per sample, scored by their total log-probability. Returns the
        best grid of each sample and its log-probability (`log_prob` of it, in nats)."""
        from stage2_prior.sampling import beam_search

        return beam_search(self, num_samples, labels, condition, num_beams, guidance_scale, method, precision)


def bits_per_code(nats: float) -> float:
    return nats / math.log(2)
