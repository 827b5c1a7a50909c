"""PixelSNAIL (Chen et al. 2018): residual blocks of gated causal convolutions interleaved with causal
multi-head self-attention, so that every position sees every earlier one.

Here the convolutional part is the Gated PixelCNN stack (no blind spot, and its exact row/position
cache), and after every `attention_every` gated layers a pre-norm self-attention layer updates the
horizontal stream. Queries and keys get learned row and column embeddings (the paper's positional
"background" channels).

Full context. The horizontal stream at position p knows only codes before p, so attention may read
the streams at every position <= p (a standard causal mask). But the stream at q never holds the
code at q itself, only codes before q; so without more, the code just before p (its raster
predecessor) reaches p only through the convolutions, which at a row start means through the
vertical stack's window: at 32x32 with 12 layers of 3x3, columns 0-18 of every row never saw the last
code of the row above. So before each attention layer, the stream at p also gets a learned projection
of the code at p - 1 (zero at p = 0): attention at p then reads, in the stream at each q <= p, the
code at q - 1, that is every code before p. (Folders saved before format 2 have no such projection,
`full_context` False, and keep the blind spot they were trained with.)

Cached sampling keeps, per attention layer, the keys and values of the positions drawn so far; the
convolutional state is the gated one.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from shared.config import option
from shared.errors import UserError
from stage2_prior.archs.gated import GatedPixelCNN, GatedState
from stage2_prior.conditioning import Conditioning
from stage2_prior.incremental import IncrementalState
from stage2_prior.attention import cached_attention
from stage2_prior.registry import ArchSpec, ConvolutionOptions, check_heads, register_arch


@dataclasses.dataclass(frozen=True)
class PixelSNAILOptions(ConvolutionOptions):
    num_heads: int = option(4, "attention heads")
    attention_every: int = option(4, "a causal self-attention layer after every N gated layers")
    full_context: bool = option(True, "feed each attention layer the code before each position, so every position "
                                      "sees every earlier one (False only for folders saved before format 2)",
                                flag=False)

    def check(self, config) -> None:
        super().check(config)
        check_heads(self.num_heads, config.hidden_channels)
        if self.attention_every < 1:
            raise UserError(f"--attention-every must be at least 1, got {self.attention_every}")
        if self.full_context and not attention_layers(config.num_layers, self.attention_every):
            fix = (f"pass --attention-every {config.num_layers - 1} or less, or more --num-layers"
                   if config.num_layers > 1 else "pass --num-layers 2 or more")
            raise UserError(f"a PixelSNAIL of {config.num_layers} gated layer(s) with --attention-every "
                            f"{self.attention_every} has no attention layer (attention follows a gated layer every "
                            f"{self.attention_every} layers, never the last one); {fix}")


def attention_layers(num_layers: int, every: int) -> list[int]:
    """Indices of the gated layers an attention layer follows (not the last: its stream feeds nothing)."""
    return [index for index in range(num_layers - 1) if (index + 1) % every == 0]


def shift_raster(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> the same with every position holding its raster predecessor's vector (zero at 0)."""
    width = x.shape[3]
    sequence = rearrange(x, "b c h w -> b c (h w)")
    return rearrange(F.pad(sequence, (1, 0))[:, :, :-1], "b c (h w) -> b c h w", w=width)


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
                 keys: list[torch.Tensor], values: list[torch.Tensor], position: int | torch.Tensor,
                 previous_codes: nn.ModuleList | None, previous_code: torch.Tensor) -> torch.Tensor:
    """PixelSNAIL's hook in the gated chain: gated layer `index`'s horizontal output (B, C) at `position`,
    with the code before it (`previous_code` (B, C), embedded) added, through the attention layer that
    follows it, if one does."""
    if index not in after:
        return horizontal
    layer = after.index(index)
    if previous_codes is not None:
        horizontal = horizontal + previous_codes[layer](previous_code)
    return attentions[layer].step(horizontal, position, keys[layer], values[layer])


class PixelSNAILState(GatedState):
    """The gated state, plus per attention layer its keys and values (B, heads, N, d), and the embedded
    code before the current position."""

    graph_inputs = GatedState.graph_inputs + ("previous_code",)

    def __init__(self, model: "PixelSNAIL", batch: int, conditioning: Conditioning) -> None:
        super().__init__(model, batch, conditioning)
        config, options = model.config, model.config.options
        shape = (batch, options.num_heads, config.num_positions, config.hidden_channels // options.num_heads)
        dtype = model.embedding.weight.dtype
        self.attention_keys = [torch.zeros(shape, device=model.device, dtype=dtype) for _ in model.attentions]
        self.attention_values = [torch.zeros(shape, device=model.device, dtype=dtype) for _ in model.attentions]
        self.previous_code = torch.zeros(batch, config.hidden_channels, device=model.device, dtype=dtype)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.previous_code.copy_(self.previous_code[index])


class PixelSNAIL(GatedPixelCNN):
    """Gated causal convolutions with causal self-attention after every `attention_every` layers."""

    def __init__(self, config) -> None:
        super().__init__(config)
        options = config.options
        self.attention_after = attention_layers(config.num_layers, options.attention_every)
        channels = config.hidden_channels
        self.attentions = nn.ModuleList(CausalSelfAttention(channels, options.num_heads, tuple(config.latent_shape),
                                                            config.dropout) for _ in self.attention_after)
        self.previous_codes = (nn.ModuleList(nn.Linear(channels, channels) for _ in self.attention_after)
                               if options.full_context else None)

    def state_class(self) -> type[IncrementalState]:
        return PixelSNAILState

    def after_block(self, index: int, horizontal: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        if index not in self.attention_after:
            return horizontal
        layer = self.attention_after.index(index)
        if self.previous_codes is not None:
            previous = rearrange(shift_raster(embedded), "b c h w -> b h w c")
            horizontal = horizontal + rearrange(self.previous_codes[layer](previous), "b h w c -> b c h w")
        return self.attentions[layer](horizontal)

    def after_block_hook(self, state: PixelSNAILState, codes: torch.Tensor, row: int, column: int) -> tuple:
        width = self.config.latent_shape[1]
        position = row * width + column
        if position > 0 and self.previous_codes is not None:
            before_row, before_column = divmod(position - 1, width)
            state.previous_code.copy_(self.embed_stack(codes[:, before_row, before_column]))  # (B, C)
        return attend_after, (self.attentions, tuple(self.attention_after), state.attention_keys,
                              state.attention_values, state.position_input(position), self.previous_codes,
                              state.previous_code)


register_arch(ArchSpec(
    "pixelsnail", PixelSNAIL, "PixelSNAIL (Chen et al. 2018): gated convolutions with causal self-attention; every "
    "position sees every earlier one", options=PixelSNAILOptions, full_context=True,
    recipe=dict(num_layers=12, options=dict(attention_every=4)),
    tiny=dict(hidden_channels=12, num_layers=3, options=dict(num_heads=2, attention_every=1))))
