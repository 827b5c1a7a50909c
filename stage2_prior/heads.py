"""Output heads: the network's features at a position -> the distribution of the stack of codes there.

Every head works on channel-last features of any leading shape, so the full forward ((B, h, w, C)),
the cached sampler ((B, C), one position) and the loss run the same arithmetic:
- `forward(features (..., C), codes (..., D))` -> logits (..., D, V): entry d given the entries < d;
- `entry(features, codes, d)` -> (..., V): entry d alone (a cached step; only entries < d of codes are read);
- `nll(features, codes)` -> (...): -log p(stack) per position, in nats.

Heads:
- `SoftmaxHead`: two 1x1 layers and a categorical. With channel groups (D groups; PixelRNN paper,
  sec. 3.4) its layers are masked so that entry d's logits read groups <= d of the features, which
  the network has already ordered.
- `DepthHead`: a categorical per entry from the features plus the entries before it at the position
  (an exclusive running sum of their embeddings) and a learned vector per entry, for archs whose
  network sees no part of a position's own stack.
- `MixtureHead`: PixelCNN++'s discretized logistic mixture (`stage2_prior.mixture`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior import mixture
from stage2_prior.layers import GroupLinear


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses of half-precision outputs are computed in float32; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def categorical_nll(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """logits (..., D, V), codes (..., D) -> the stack's -log p per position (...)."""
    log_probs = F.log_softmax(at_least_float32(logits), dim=-1)
    return -log_probs.gather(-1, codes.long()[..., None])[..., 0].sum(-1)


class SoftmaxHead(nn.Module):
    """hidden = relu(W1 relu(f)); logits = W2 hidden: (..., groups, V). `groups` > 1: channel groups."""

    def __init__(self, channels: int, vocab_size: int, groups: int) -> None:
        super().__init__()
        self.vocab_size, self.groups = vocab_size, groups
        self.hidden = GroupLinear(channels, channels, groups)
        self.out = GroupLinear(channels, vocab_size * groups, groups)  # block d (vocab rows) reads groups <= d

    def forward(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.hidden.vector(F.relu(features)))  # (..., C)
        return self.out.vector(hidden).unflatten(-1, (self.groups, self.vocab_size))  # (..., D, V)

    def entry(self, features: torch.Tensor, codes: torch.Tensor, depth: int) -> torch.Tensor:
        hidden = F.relu(self.hidden.vector(F.relu(features)))  # (..., C)
        if self.groups == 1:
            return self.out.vector(hidden)  # (..., V)
        rows = slice(depth * self.vocab_size, (depth + 1) * self.vocab_size)
        return F.linear(hidden, self.out.matrix[rows], self.out.bias[rows])  # (..., V)

    def nll(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return categorical_nll(self(features, codes), codes)


class DepthHead(nn.Module):
    """Entry d of a stack of D: a categorical from f + sum of the embeddings of entries < d + a vector for d."""

    def __init__(self, channels: int, vocab_size: int, depth: int) -> None:
        super().__init__()
        self.vocab_size, self.depth = vocab_size, depth
        self.hidden = GroupLinear(channels, channels, 1)
        self.out = GroupLinear(channels, vocab_size, 1)
        self.depth_embedding = nn.Embedding(vocab_size * depth, channels)
        self.depth_position = nn.Parameter(torch.zeros(depth, channels))

    def earlier(self, codes: torch.Tensor) -> torch.Tensor:
        """Exclusive running sum over the stack of the entries' embeddings: (..., D, C)."""
        offsets = torch.arange(self.depth, device=codes.device) * self.vocab_size
        vectors = self.depth_embedding(codes.long() + offsets)  # (..., D, C)
        return vectors.cumsum(-2) - vectors

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs (..., C) of entries -> logits (..., V)."""
        return self.out.vector(F.relu(self.hidden.vector(F.relu(inputs))))

    def forward(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        inputs = features[..., None, :] + self.earlier(codes) + self.depth_position  # (..., D, C)
        return self.logits(inputs)  # (..., D, V)

    def entry(self, features: torch.Tensor, codes: torch.Tensor, depth: int) -> torch.Tensor:
        earlier = self.earlier(codes)[..., depth, :]  # (..., C)
        return self.logits(features + earlier + self.depth_position[depth])  # (..., V)

    def nll(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return categorical_nll(self(features, codes), codes)


class MixtureHead(nn.Module):
    """The discretized logistic mixture over a stack of D pixel channels of K levels."""

    def __init__(self, channels: int, levels: int, depth: int, mixtures: int) -> None:
        super().__init__()
        self.levels, self.mixtures = levels, mixtures
        self.hidden = GroupLinear(channels, channels, 1)
        self.out = GroupLinear(channels, mixture.parameter_count(mixtures, depth), 1)

    def parameters_at(self, features: torch.Tensor) -> torch.Tensor:
        """(..., C) -> the mixture's parameters (..., P)."""
        return self.out.vector(F.relu(self.hidden.vector(F.relu(features))))

    def forward(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return mixture.entry_log_probs(self.parameters_at(features), codes, self.mixtures, self.levels)  # (..., D, K)

    def entry(self, features: torch.Tensor, codes: torch.Tensor, depth: int) -> torch.Tensor:
        return self(features, codes)[..., depth, :]  # (..., K)

    def nll(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        params = at_least_float32(self.parameters_at(features))
        return mixture.stack_nll(params, codes, self.mixtures, self.levels)


def build_head(config) -> nn.Module:
    """The head of a PriorConfig: the mixture, the depth head (a stack the network does not order), or softmax."""
    channels = config.hidden_channels
    if config.head == "logistic_mixture":
        return MixtureHead(channels, config.vocab_size, config.depth, config.mixtures)
    if config.depth > 1 and config.channel_groups == 1:
        return DepthHead(channels, config.vocab_size, config.depth)
    return SoftmaxHead(channels, config.vocab_size, config.channel_groups)


# Format 1 kept the head's layers on the prior itself.
FORMAT1_HEAD_NAMES = {"head_hidden.": "head.hidden.", "head_out.": "head.out.",
                      "depth_embedding.": "head.depth_embedding.", "depth_position": "head.depth_position"}


def upgrade_format1_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format-1 weights (the head's layers on the prior itself) under the current names."""
    renamed = {}
    for name, tensor in weights.items():
        old = next((prefix for prefix in FORMAT1_HEAD_NAMES if name.startswith(prefix)), None)
        renamed[FORMAT1_HEAD_NAMES[old] + name[len(old):] if old else name] = tensor
    return renamed
