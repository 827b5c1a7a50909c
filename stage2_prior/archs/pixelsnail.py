"""PixelSNAIL (Chen et al. 2018): residual blocks of gated causal convolutions interleaved with causal
multi-head self-attention, so that every position sees every earlier one.

Here the convolutional part is the Gated PixelCNN stack (no blind spot, and its exact row/position
cache), and after every `attention_every` gated layers a pre-norm self-attention layer updates the
horizontal stream. The stream at position p knows only codes before p, so the attention may read
every position <= p (a standard causal mask), and the model's receptive field becomes the whole
past: convolutions give local detail, attention the long range (sec. 3 of the paper). Queries and
keys get learned row and column embeddings (the paper's positional "background" channels).

Cached sampling keeps, per attention layer, the keys and values of the positions drawn so far; the
convolutional state is the gated one.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage2_prior.archs.gated import GatedPixelCNN, GatedState
from stage2_prior.layers import cached_attention


class CausalSelfAttention(nn.Module):
    """x + out(attention(norm(x) + position)) over raster positions, each attending to itself and earlier ones."""

    def __init__(self, channels: int, heads: int, latent_shape: tuple[int, int], dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(channels)
        self.row_embedding = nn.Parameter(torch.randn(latent_shape[0], channels) * 0.02)
        self.column_embedding = nn.Parameter(torch.randn(latent_shape[1], channels) * 0.02)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def positions(self, rows: int) -> torch.Tensor:
        """Learned 2-D position embeddings of the first `rows` rows, flattened: (rows * w, C)."""
        return (self.row_embedding[:rows, None] + self.column_embedding[None]).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, h', w) -> (B, C, h', w); position p reads positions <= p."""
        rows = x.shape[2]
        sequence = rearrange(x, "b c h w -> b (h w) c")
        q, k, v = self.qkv(self.norm(sequence) + self.positions(rows)).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b n (heads d) -> b heads n d", heads=self.heads) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, N, d)
        update = F.dropout(self.out(rearrange(attended, "b heads n d -> b n (heads d)")), self.dropout, self.training)
        return x + rearrange(update, "b (h w) c -> b c h w", h=rows)

    def step(self, x: torch.Tensor, position: int | torch.Tensor, keys: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor:
        """One position (an int, or a (1,) tensor in a compiled step): x (B, C); keys and values
        (B, heads, N, d) are filled for positions < `position` and receive this one's."""
        width = self.column_embedding.shape[0]
        row, column = position // width, position % width
        query_input = self.norm(x) + self.row_embedding[row] + self.column_embedding[column]  # (B, C)
        q, k, v = (rearrange(t, "b (heads d) -> b heads 1 d", heads=self.heads)
                   for t in self.qkv(query_input).chunk(3, dim=-1))
        attended = cached_attention(q, k, v, keys, values, position)  # (B, heads, 1, d)
        return x + self.out(rearrange(attended, "b heads 1 d -> b (heads d)"))


def attend_after(index: int, horizontal: torch.Tensor, attentions: nn.ModuleList, after: tuple[int, ...],
                 keys: list[torch.Tensor], values: list[torch.Tensor], position: int | torch.Tensor) -> torch.Tensor:
    """PixelSNAIL's hook in the gated chain: gated layer `index`'s horizontal output (B, C) at
    `position`, through the attention layer that follows it, if one does."""
    if index not in after:
        return horizontal
    layer = after.index(index)
    return attentions[layer].step(horizontal, position, keys[layer], values[layer])


class PixelSNAIL(GatedPixelCNN):
    """Gated causal convolutions with causal self-attention after every `attention_every` layers."""

    archs: ClassVar[tuple[str, ...]] = ("pixelsnail",)

    def __init__(self, config) -> None:
        super().__init__(config)
        count = len(self.attention_after)
        self.attentions = nn.ModuleList(CausalSelfAttention(config.hidden_channels, config.num_heads,
                                                            tuple(config.latent_shape), config.dropout)
                                        for _ in range(count))

    @property
    def attention_after(self) -> list[int]:
        """Indices of the gated layers an attention layer follows (not the last: its stream feeds nothing)."""
        every = self.config.attention_every
        return [index for index in range(self.config.num_layers - 1) if (index + 1) % every == 0]

    def after_block(self, index: int, horizontal: torch.Tensor) -> torch.Tensor:
        after = self.attention_after
        return self.attentions[after.index(index)](horizontal) if index in after else horizontal

    def start(self, batch_size: int, labels: torch.Tensor | None, condition: torch.Tensor | None) -> GatedState:
        state = super().start(batch_size, labels, condition)
        config = self.config
        head_size = config.hidden_channels // config.num_heads
        shape = (batch_size, config.num_heads, config.num_positions, head_size)
        dtype = self.embedding.weight.dtype
        state.attention_keys = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self.attentions]
        state.attention_values = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self.attentions]
        return state

    def after_block_hook(self, state: GatedState, position: int | torch.Tensor) -> tuple:
        return attend_after, (self.attentions, tuple(self.attention_after), state.attention_keys,
                              state.attention_values, position)
