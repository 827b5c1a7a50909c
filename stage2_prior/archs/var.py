"""VAR: next-scale prediction over a multi-scale token pyramid (arch "var"; Tian et al., NeurIPS 2024).

The codes of a `--quantizer multiscale` tokenizer are K grids of growing sides s_1 < ... < s_K, read as
one sequence of N = sum of s_k^2 tokens, coarse to fine and in raster order within a scale (codes
(B, N); `Prior.split_levels` gives the grids back). The prior predicts a whole scale at once from the
scales before it (sec. 3.2): p(codes) = prod over k of p(scale k | scales < k), the tokens of a scale
independent of each other given the earlier scales. So one network pass draws a scale
(`Prior.parallel_runs`), and sampling a pyramid takes K passes.

Inputs (sec. 3.2 and the teacher forcing of its Algorithm 2): the single token of scale 1 reads the
class embedding (the null class of classifier-free guidance is one more row) or a learned start
vector; the tokens of scale k > 1 read the sum of the earlier scales' embedded grids, each upsampled
(bicubic) to the last side, area-downsampled to s_k, plus that same class embedding (VAR conditions
every block by adaptive layer norm; with the class in the first token alone, a prior trained for
250 steps on the digits drew every class alike). VAR builds that sum from its tokenizer's codebook
and phi convolutions; here every code has an embedding of the prior's own, so a prior is one folder
trained from the codes alone. Learned position and scale embeddings are added.

Pre-norm transformer blocks (`stage2_prior.attention`) with VAR's block-causal mask: a token of scale
k attends to every token of scales <= k. The cached state keeps the blocks' keys and values and the
running upsampled sum: each scale is one pass over its own tokens.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from shared.config import option
from stage2_prior.attention import TransformerBlock, initialize_gpt, initialize_tables
from stage2_prior.conditioning import Conditioning
from stage2_prior.config import PriorConfig
from stage2_prior.incremental import IncrementalState
from stage2_prior.prior import Prior
from stage2_prior.registry import ArchOptions, ArchSpec, check_heads, register_arch


@dataclasses.dataclass(frozen=True)
class VAROptions(ArchOptions):
    num_heads: int = option(4, "attention heads")

    def check(self, config) -> None:
        check_heads(self.num_heads, config.hidden_channels)


def upsample(grid: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, s, s) -> (B, C, side, side), bicubic (as VAR upsamples each scale's vectors)."""
    if grid.shape[-1] == side:
        return grid
    return F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)


def downsample(grid: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, side, side), area averages (as VAR reads the running sum at the next scale)."""
    return grid if grid.shape[-1] == side else F.interpolate(grid, size=(side, side), mode="area")


class VARPrior(Prior):
    """Next-scale prediction (arch="var"): `forward(codes (B, N), labels)` -> logits (B, vocab_size, N); the
    logits of a token of scale k depend only on the tokens of scales < k (and the label)."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        channels, scales = config.hidden_channels, tuple(config.scales)
        self.label_embedding = nn.Embedding(self.label_rows, channels) if self.label_rows else None
        self.start_token = None if self.label_rows else nn.Parameter(torch.randn(channels))
        self.position_embedding = nn.Parameter(torch.randn(config.num_positions, channels) * 0.02)
        self.scale_embedding = nn.Parameter(torch.randn(len(scales), channels) * 0.02)
        text = config.text_encoder == "transformer"  # a caption read by cross-attention in every block
        self.blocks = nn.ModuleList(TransformerBlock(channels, config.options.num_heads, config.dropout, False, text)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(channels)
        initialize_gpt(self.blocks)
        initialize_tables(self.embedding, self.start_token, self.label_embedding)
        sizes = torch.tensor([side * side for side in scales])
        scale_of = torch.repeat_interleave(torch.arange(len(scales)), sizes)  # (N,): each token's scale
        self.register_buffer("scale_of", scale_of, persistent=False)
        self.register_buffer("attention_mask", scale_of[:, None] >= scale_of[None, :], persistent=False)  # (N, N)
        starts = torch.cumsum(sizes, 0) - sizes
        self.runs = [(int(start), int(size)) for start, size in zip(starts, sizes)]

    @property
    def parallel_runs(self) -> list[tuple[int, int]]:
        return self.runs

    def prefix(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Scale 1's input (B, C): the class embedding (incl. the null class), or the start vector."""
        if self.label_embedding is not None:
            return self.label_embedding(labels)
        return self.start_token.expand(batch_size, -1)

    def scale_input(self, total: torch.Tensor, index: int, batch_size: int, labels: torch.Tensor | None
                    ) -> torch.Tensor:
        """The inputs (B, s_k^2, C) of scale `index` from the running sum of the earlier scales (B, C, S, S),
        with its position and scale embeddings."""
        first, count = self.runs[index]
        prefix = self.prefix(labels, batch_size)[:, None]  # (B, 1, C)
        if index == 0:
            tokens = prefix
        else:  # every token also reads the class: through the first token alone, 250 steps left it unused
            tokens = rearrange(downsample(total, self.config.scales[index]), "b c h w -> b (h w) c") + prefix
        return tokens + self.position_embedding[first:first + count] + self.scale_embedding[index]

    def grid_of(self, embedded: torch.Tensor, index: int) -> torch.Tensor:
        """Scale `index`'s embedded tokens (B, s^2, C) as a grid (B, C, s, s)."""
        return rearrange(embedded, "b (h w) c -> b c h w", h=self.config.scales[index])

    def network(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        embedded = rearrange(x, "b c h n -> b (h n) c")  # (B, N, C): every scale's tokens, coarse to fine
        batch, side = len(x), self.config.scales[-1]
        total = embedded.new_zeros(batch, embedded.shape[-1], side, side)  # the running sum of upsampled scales
        inputs = []
        for index, (first, count) in enumerate(self.runs):
            inputs.append(self.scale_input(total, index, batch, conditioning.labels))
            total = total + upsample(self.grid_of(embedded[:, first:first + count], index), side)
        tokens = torch.cat(inputs, dim=1)  # (B, N, C)
        for block in self.blocks:
            tokens = block(tokens, None, mask=self.attention_mask, text=conditioning.text)
        return rearrange(self.final_norm(tokens), "b n c -> b c 1 n")  # (B, C, 1, N)

    def state_class(self) -> type[IncrementalState]:
        return ScaleCache


class ScaleCache(IncrementalState):
    """Per block, keys and values (B, heads, N, d) of the scales so far; the running upsampled sum of the
    scales drawn (B, C, S, S); and the features of the current scale, which `step` hands out position by
    position (beam search asks one position at a time)."""

    def __init__(self, model: VARPrior, batch: int, conditioning: Conditioning) -> None:
        super().__init__(model.device)
        self.model = model
        config = model.config
        heads, channels = config.options.num_heads, config.hidden_channels
        dtype = model.embedding.weight.dtype
        shape = (batch, heads, config.num_positions, channels // heads)
        self.keys = [torch.zeros(shape, device=model.device, dtype=dtype) for _ in model.blocks]
        self.values = [torch.zeros(shape, device=model.device, dtype=dtype) for _ in model.blocks]
        side = config.scales[-1]
        self.total = torch.zeros(batch, channels, side, side, device=model.device, dtype=dtype)
        self.labels = conditioning.labels
        self.text = conditioning.text  # the encoded caption, or None
        self.scales_done = 0  # scales whose features were computed (and whose predecessor is in the sum)
        self.features: torch.Tensor | None = None  # (B, s^2, C) of the last scale computed

    def block(self, codes: torch.Tensor, start: int, count: int) -> torch.Tensor:
        model = self.model
        index = self.scales_done
        if model.runs[index] != (start, count):
            raise RuntimeError(f"VAR's cached state computes scale {index} next, not positions {start}..{start + count}")
        if index > 0:  # the scale before is drawn: add it to the running sum
            first, size = model.runs[index - 1]
            embedded = model.embed_stack(codes.flatten(1, 2)[:, first:first + size])  # (B, s^2, C)
            self.total = self.total + upsample(model.grid_of(embedded, index - 1), model.config.scales[-1])
        tokens = model.scale_input(self.total, index, len(self.total), self.labels)  # (B, s_k^2, C)
        for block, keys, values in zip(model.blocks, self.keys, self.values):
            tokens = block.block(tokens, keys, values, start, self.text)
        self.scales_done += 1
        self.features = model.final_norm(tokens)
        return self.features

    def step(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        """Features (B, C) at sequence position `column` (the grid is one row): a scale's first position
        computes the whole scale."""
        start = self.model.runs[self.scales_done][0] if self.scales_done < len(self.model.runs) else None
        if column == start:
            self.block(codes, *self.model.runs[self.scales_done])
        first = self.model.runs[self.scales_done - 1][0]
        return self.features[:, column - first]

    def reorder(self, index: torch.Tensor) -> None:
        self.keys = [tensor[index] for tensor in self.keys]
        self.values = [tensor[index] for tensor in self.values]
        self.total = self.total[index]
        self.labels = None if self.labels is None else self.labels[index]
        self.text = None if self.text is None else self.text.select(index)
        self.features = None if self.features is None else self.features[index]


register_arch(ArchSpec(
    "var", VARPrior, "next-scale prediction over a multi-scale token pyramid (VAR): one pass per scale",
    options=VAROptions, full_context=True, reads="scales", code_maps=False, stacks=False, text_encoders=("transformer",),
    heads=("softmax",), recipe=dict(num_layers=6, options=dict(num_heads=4)),
    tiny=dict(hidden_channels=12, num_layers=2, options=dict(num_heads=2), scales=(1, 2, 3))))
