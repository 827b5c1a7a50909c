"""Attention for the sequence archs: the pre-norm transformer block and its cached forms.

- `TransformerBlock`: x + attention(LN(x)), then x + MLP(LN(x)) (GPT-2 and ImageGPT's pre-norm block,
  Chen et al. 2020, sec. 2.2), over a sequence (B, n, C) with a causal mask, a given mask (VAR's
  block-causal one over scales) or none (MaskGIT's bidirectional one).
- `cached_attention`: one query over a preallocated KV cache (the cached step of a raster arch).
- `window_attention`: a window of queries over the cache before it and causally over each other
  (windowed Jacobi decoding).
- `block_attention`: a block of queries written into the cache and attending over everything up to the
  block's end, the block included (a whole scale of VAR at once).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage2_prior.text import CrossAttention, TextMemory


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     position: int | torch.Tensor) -> torch.Tensor:
    """One query q (B, heads, 1, d) at raster `position`, whose key and value k, v (B, heads, 1, d) go
    into the preallocated caches keys, values (B, heads, N, d), over the cached positions 0..position
    -> (B, heads, 1, d). Every one of them is allowed, so no causal mask (`is_causal` would align its
    triangle to the top left and let the query see only position 0).
    `position` an int: the caches are sliced to position + 1. A (1,) tensor (a compiled step): the same
    attention over all N entries with the later ones masked out, so that every shape stays fixed."""
    if isinstance(position, int):
        keys[:, :, position:position + 1] = k
        values[:, :, position:position + 1] = v
        return F.scaled_dot_product_attention(q, keys[:, :, :position + 1], values[:, :, :position + 1])
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    visible = (torch.arange(keys.shape[2], device=keys.device) <= position)[None]  # (1, N): the rest get weight 0
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     start: int) -> torch.Tensor:
    """Queries q (B, heads, n, d) at raster positions start .. start + n - 1, with their keys and values
    k, v (B, heads, n, d), over the cached positions 0 .. start - 1 (keys, values (B, heads, N, d); read,
    not written) and the window causally: query i reads positions <= start + i -> (B, heads, n, d)."""
    count = q.shape[2]
    all_keys = torch.cat([keys[:, :, :start], k], dim=2)  # (B, heads, start + n, d)
    all_values = torch.cat([values[:, :, :start], v], dim=2)
    visible = torch.arange(start + count, device=q.device)[None] <= start + torch.arange(count, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, all_keys, all_values, attn_mask=visible)  # (B, heads, n, d)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    start: int) -> torch.Tensor:
    """Queries q (B, heads, n, d) at positions start .. start + n - 1, whose keys and values k, v go into the
    caches keys, values (B, heads, N, d) there, over every cached position before start + n (the block
    included, no mask) -> (B, heads, n, d)."""
    end = start + q.shape[2]
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])


class TransformerBlock(nn.Module):
    """Pre-norm block over a sequence (B, n, C): x + attention(LN(x)), then x + MLP(LN(x)) (4x width, GELU).
    With a conditioning map, x first gets a linear projection of the map's features at each token; with
    text, x + cross-attention(LN(x) -> the encoded caption) comes between attention and MLP (the T5 and
    Parti decoder block)."""

    def __init__(self, channels: int, heads: int, dropout: float, conditioned: bool, text: bool = False) -> None:
        super().__init__()
        self.cross_attention = CrossAttention(channels, heads, dropout) if text else None
        self.heads = heads
        self.dropout = dropout
        self.condition_projection = nn.Linear(channels, channels) if conditioned else None
        self.attention_norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.attention_out = nn.Linear(channels, channels)
        self.mlp_norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def queries_keys_values(self, x: torch.Tensor, condition: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, n, C) and the condition features there (B, n, C) or None -> the residual stream with
        the condition added (B, n, C), and q, k, v (B, heads, n, d)."""
        if self.condition_projection is not None:
            x = x + self.condition_projection(condition)
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b n (heads d) -> b heads n d", heads=self.heads) for t in (q, k, v))
        return x, q, k, v

    def finish(self, x: torch.Tensor, attended: torch.Tensor, text: TextMemory | None) -> torch.Tensor:
        """The residual stream x (B, n, C), the attention output (B, heads, n, d) and the encoded caption or
        None -> the block's output (B, n, C)."""
        update = self.attention_out(rearrange(attended, "b heads n d -> b n (heads d)"))
        x = x + F.dropout(update, self.dropout, self.training)
        if self.cross_attention is not None:
            x = x + self.cross_attention(x, text)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None,
                mask: torch.Tensor | str | None = "causal", text: TextMemory | None = None) -> torch.Tensor:
        """x (B, n, C) -> (B, n, C). `mask`: "causal" (token t reads tokens <= t), a bool (n, n) of what each
        token reads, or None (every token reads every token)."""
        x, q, k, v = self.queries_keys_values(x, condition)
        causal = isinstance(mask, str)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal)
        return self.finish(x, attended, text)  # attended: (B, heads, n, d)

    def window(self, x: torch.Tensor, condition: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
               start: int, text: TextMemory | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens x (B, n, C) at positions start .. start + n - 1 over the cached tokens before `start` (read,
        not written) and each other, causally -> (B, n, C), and their keys and values (B, heads, n, d)."""
        x, q, k, v = self.queries_keys_values(x, condition)
        return self.finish(x, window_attention(q, k, v, keys, values, start), text), k, v

    def step(self, x: torch.Tensor, condition: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
             position: int | torch.Tensor, text: TextMemory | None = None) -> torch.Tensor:
        """One token x (B, 1, C) at `position` (an int, or a (1,) tensor in a compiled step); keys and
        values (B, heads, N, d) hold the tokens before it and receive this one's."""
        x, q, k, v = self.queries_keys_values(x, condition)
        return self.finish(x, cached_attention(q, k, v, keys, values, position), text)  # (B, 1, C)

    def block(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
              text: TextMemory | None = None) -> torch.Tensor:
        """Tokens x (B, n, C) at positions start .. start + n - 1 over the cache and each other, unmasked; their
        keys and values go into the caches (B, heads, N, d) -> (B, n, C)."""
        x, q, k, v = self.queries_keys_values(x, None)
        return self.finish(x, block_attention(q, k, v, keys, values, start), text)


def initialize_gpt(blocks: nn.ModuleList) -> None:
    """The GPT initialisation of transformer blocks, as ImageGPT uses it: weights N(0, 0.02), zero biases
    (GPT, Radford et al. 2018, sec. 4.1), and the projections into the residual stream scaled by
    1/sqrt(2 * layers) so the stream's variance does not grow with depth (GPT-2, Radford et al. 2019, sec. 2.3)."""
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    for block in blocks:
        for projection in (block.attention_out, block.mlp[2]):
            nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * len(blocks)))


def initialize_tables(*tables: nn.Module | torch.Tensor | None) -> None:
    """The GPT initialisation of a sequence arch's input tables (codes, prefix, caption tokens): N(0, 0.02), the
    scale of its position tables, as ImageGPT's code draws its token and position embeddings (openai/image-gpt,
    src/model.py: 0.02 and 0.01). Left at nn.Embedding's N(0, 1), a position is 1/50 of a code and the blocks
    barely see where they are. Measured on a caption-conditioned transformer on shapes (64 channels, 6 layers):
    1.63 bits per code after 6,297 steps with N(0, 1) tables, 1.27 with these, and two-thing captions drawn right
    10% -> 52% of the time (docs/benchmarks.md). MaskGIT and VAR take it for the same reason, unmeasured, as is a
    transformer conditioned on a code map (whose condition is now larger than the codes at the start). A table is
    a parameter or an nn.Embedding; None (an arch without that table) is skipped."""
    for table in tables:
        if table is not None:
            nn.init.normal_(getattr(table, "weight", table), std=0.02)
