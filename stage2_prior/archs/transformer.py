"""A decoder-only transformer over the raster-ordered code grid (arch "transformer"), with the KV cache
of its incremental state for the cached sampler.

The grid is read as one sequence of h*w positions in raster order, as ImageGPT reads pixels (Chen et
al. 2020, sec. 2.1) and the VQGAN transformer reads codes (Esser et al. 2021, sec. 3.2). The features
at position p may see only codes before p, so the sequence is shifted by one: token p's input is the
code at p - 1, and token 0's input is a prefix, the class embedding (the VQGAN prior's class token in
front of the sequence; the null class of classifier-free guidance is one more row of it) or a learned
start vector. Causal self-attention lets token p read tokens <= p, that is codes < p: the receptive
field is the whole past, with no blind spot. Learned position embeddings (row + column, or one table
over raster positions) are indexed by the position a token predicts.

Blocks are pre-norm, as in GPT-2 and ImageGPT (Chen et al. 2020, sec. 2.2): x + attention(LN(x)),
then x + MLP(LN(x)), and one LN after the last block. A conditioning code map is known in full before
sampling, so it needs no shift: each block adds its own linear projection of the map's features at p
to token p's residual stream (location-dependent conditioning, Gated PixelCNN paper sec. 2.3).

Text: with text encoder "transformer", each block reads the encoded caption by cross-attention (Parti);
with "bpe", the caption's tokens come first in the one causal stream, as in DALL-E (Ramesh et al. 2021,
sec. 2.2): L text tokens (their own embedding and positions), then the code tokens, which thus read the
whole caption; the caption tokens are also predicted, each from those before it (`text_nll`).

Cached sampling keeps, per block, the keys and values of the tokens seen so far, preallocated for the
whole grid (after the caption's, which are computed once when sampling starts). Each position runs one token through the blocks, writes its key and value at p and
attends over 0..p: the same arithmetic as the full forward, up to rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from shared.config import option
from shared.errors import UserError
from stage2_prior.conditioning import Conditioning
from stage2_prior.config import PriorConfig
from stage2_prior.incremental import IncrementalState
from stage2_prior.attention import TransformerBlock, initialize_gpt, initialize_tables
from stage2_prior.prior import Prior
from stage2_prior.registry import ArchOptions, ArchSpec, check_heads, register_arch
from stage2_prior.text import PAD_ID, TextMemory


@dataclasses.dataclass(frozen=True)
class TransformerOptions(ArchOptions):
    num_heads: int = option(4, "attention heads")
    position_embedding: Literal["2d", "1d"] = option(
        "2d", "learned row + column embeddings (2d), or one learned table over raster positions (1d)")
    max_positions: int | None = option(None, "with 1d positions: size of the position table (default: the grid's "
                                             "positions)")

    def check(self, config) -> None:
        check_heads(self.num_heads, config.hidden_channels)
        if self.max_positions is not None and self.max_positions < config.num_positions:
            height, width = config.latent_shape
            raise UserError(f"a sequence of {config.num_positions} positions ({height}x{width}) is longer than the "
                            f"position table (--max-positions {self.max_positions}); raise --max-positions to at "
                            f"least {config.num_positions} or use --position-embedding 2d")


def transformer_chain(token: torch.Tensor, condition: torch.Tensor | None, position: int | torch.Tensor,
                      blocks: nn.ModuleList, keys: list[torch.Tensor], values: list[torch.Tensor],
                      final_norm: nn.LayerNorm, text_states: torch.Tensor | None = None,
                      text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The cached state's per-position step: one token (B, 1, C), input and position embedding added,
    with the condition features there (B, 1, C) or None and the encoded caption (B, L, C) and its mask
    (B, L) or None, through every block -> features (B, C)."""
    text = None if text_states is None else TextMemory(text_states, text_mask)
    for block, block_keys, block_values in zip(blocks, keys, values):
        token = block.step(token, condition, block_keys, block_values, position, text)
    return final_norm(token)[:, 0]


class TransformerPrior(Prior):
    """Decoder-only transformer (arch="transformer") over codes in raster order.

    `forward(codes (B, h, w[, D]), labels (B,) or None, condition)` -> logits (B, vocab_size, h, w[, D]);
    the logits at raster position p depend only on codes at positions < p (and the label, and the
    condition map); a position's stack is ordered by the base class's depth head.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        channels, options = config.hidden_channels, config.options
        height, width = config.latent_shape
        # Token 0's input, on the scale of a code token (initialize_weights).
        self.label_embedding = nn.Embedding(self.label_rows, channels) if self.label_rows else None
        self.start_token = None if self.label_rows else nn.Parameter(torch.randn(channels))
        if options.position_embedding == "2d":
            self.row_embedding = nn.Parameter(torch.zeros(height, channels))
            self.column_embedding = nn.Parameter(torch.zeros(width, channels))
        else:
            self.position_table = nn.Parameter(torch.zeros(options.max_positions or config.num_positions, channels))
        conditioned, text = config.condition_vocab_size is not None, config.text_encoder == "transformer"
        self.blocks = nn.ModuleList(TransformerBlock(channels, options.num_heads, config.dropout, conditioned, text)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(channels)
        self.text_prefix = config.text_encoder == "bpe"
        if self.text_prefix:  # DALL-E: caption tokens first in the stream, with their own tables and output layer
            self.text_embedding = nn.Embedding(config.text_vocab_size, channels)
            self.text_positions = nn.Parameter(torch.randn(config.text_length, channels) * 0.02)
            self.text_head = nn.Linear(channels, config.text_vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The GPT initialisation, as ImageGPT uses it, for this arch's own layers: weights and position
        tables N(0, 0.02), zero biases (GPT, Radford et al. 2018, sec. 4.1), and the projections into the
        residual stream scaled by 1/sqrt(2 * layers) so the stream's variance does not grow with depth
        (GPT-2, Radford et al. 2019, sec. 2.3); the code, prefix and caption tables on the positions' scale
        (`initialize_tables`). The base class's head and condition network keep their own initialisation."""
        initialize_gpt(self.blocks)
        two_d = self.config.options.position_embedding == "2d"
        for table in (self.row_embedding, self.column_embedding) if two_d else (self.position_table,):
            nn.init.normal_(table, std=0.02)
        initialize_tables(self.embedding, self.start_token, self.label_embedding,
                          self.text_embedding if self.text_prefix else None)

    # ------------------------------------------------------------------------------------------
    # The full forward
    # ------------------------------------------------------------------------------------------

    def prefix(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Token 0's input (B, C): the class embedding (incl. the null class), or the start vector."""
        if self.label_embedding is not None:
            return self.label_embedding(labels)
        return self.start_token.expand(batch_size, -1)

    def positions(self, rows: int) -> torch.Tensor:
        """Position embeddings of the first `rows` rows in raster order: (rows * w, C)."""
        if self.config.options.position_embedding == "2d":
            return rearrange(self.row_embedding[:rows, None] + self.column_embedding[None], "h w c -> (h w) c")
        return self.position_table[:rows * self.config.latent_shape[1]]

    def position_at(self, position: int) -> torch.Tensor:
        """The embedding of one raster position: (C,), the same sum as `positions`."""
        if self.config.options.position_embedding == "2d":
            row, column = divmod(position, self.config.latent_shape[1])
            return self.row_embedding[row] + self.column_embedding[column]
        return self.position_table[position]

    def caption_tokens(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Caption token ids (B, L) -> the stream's first L inputs (B, L, C) (text encoder "bpe")."""
        return self.text_embedding(text_ids) + self.text_positions[:text_ids.shape[1]]

    def network(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        labels, condition = conditioning.labels, conditioning.code_map
        rows = x.shape[2]
        codes = rearrange(x, "b c h w -> b (h w) c")  # (B, N', C)
        # shift by one: token p reads the code at p - 1, token 0 the prefix (ImageGPT sec. 2.1; VQGAN sec. 3.2)
        tokens = torch.cat([self.prefix(labels, x.shape[0])[:, None], codes[:, :-1]], dim=1)  # (B, N', C)
        tokens = tokens + self.positions(rows)
        if condition is not None:
            condition = rearrange(condition, "b c h w -> b (h w) c")  # (B, N', C): known in full, no shift
        caption = 0
        if self.text_prefix:  # the caption first; the code map's features only on the code tokens
            caption = conditioning.text_ids.shape[1]
            tokens = torch.cat([self.caption_tokens(conditioning.text_ids), tokens], dim=1)  # (B, L + N', C)
            if condition is not None:
                condition = torch.cat([condition.new_zeros(len(tokens), caption, condition.shape[2]), condition], 1)
        for block in self.blocks:
            tokens = block(tokens, condition, text=conditioning.text)
        return rearrange(self.final_norm(tokens[:, caption:]), "b (h w) c -> b c h w", h=rows)  # (B, C, h', w)

    def text_nll(self, conditioning: Conditioning) -> torch.Tensor | None:
        """The caption tokens' mean NLL (nats), each predicted from those before it, padding not scored. The caption
        reads nothing after it, so its own causal pass gives the joint pass's features (in training up to
        dropout, drawn anew in this pass)."""
        if not self.text_prefix:
            return None
        ids = conditioning.text_ids
        tokens = self.caption_tokens(ids)
        for block in self.blocks:
            tokens = block(tokens, None if self.blocks[0].condition_projection is None else
                           tokens.new_zeros(tokens.shape))
        logits = self.text_head(self.final_norm(tokens[:, :-1]))  # (B, L - 1, text vocabulary)
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD_ID, -100)  # (B, L - 1): padding ignored
        if (targets == -100).all():
            return logits.sum() * 0  # every caption dropped: nothing to predict
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)

    # ------------------------------------------------------------------------------------------
    # The cached state
    # ------------------------------------------------------------------------------------------

    def state_class(self) -> type[IncrementalState]:
        return KVCache


class KVCache(IncrementalState):
    """Incremental state of the transformer: per block, keys and values (B, heads, N, d) of the tokens
    seen so far, plus what every step reads (the prefix, the condition features). Tensors keep the
    batch on their first dimension, which `reorder` indexes."""

    chain = staticmethod(transformer_chain)
    # the blocks' weights are parameters: static already
    graph_inputs = ("position_tensor", "keys", "values", "text_states", "text_mask")

    def __init__(self, model: TransformerPrior, batch: int, conditioning: Conditioning) -> None:
        super().__init__(model.device)
        self.model = model
        config = model.config
        heads = config.options.num_heads
        # the caption's tokens first (text encoder "bpe"): code position p is entry offset + p of the cache
        self.offset = conditioning.text_ids.shape[1] if model.text_prefix else 0
        shape = (batch, heads, self.offset + config.num_positions, config.hidden_channels // heads)
        dtype = model.embedding.weight.dtype
        self.keys = [torch.zeros(shape, device=model.device, dtype=dtype) for _ in model.blocks]
        self.values = [torch.zeros(shape, device=model.device, dtype=dtype) for _ in model.blocks]
        self.prefix = model.prefix(conditioning.labels, batch)  # (B, C)
        self.pending: tuple[int | None, list] = (None, [])  # the last window's start and keys and values
        self.condition = None  # (B, N, C): the condition network's features in raster order
        text = conditioning.text
        # (B, L, C), (B, L): copies, which `reorder` permutes in place
        self.text_states, self.text_mask = (None, None) if text is None else (text.states.clone(), text.mask.clone())
        if conditioning.code_map is not None:
            self.condition = rearrange(conditioning.code_map, "b c h w -> b (h w) c")
        if self.offset:  # the caption's keys and values, once: it reads only itself, causally
            x = model.caption_tokens(conditioning.text_ids)
            zeros = None if self.condition is None else x.new_zeros(x.shape)
            for block, keys, values in zip(model.blocks, self.keys, self.values):
                x, k, v = block.window(x, zeros, keys, values, 0)
                keys[:, :, :self.offset], values[:, :, :self.offset] = k, v

    def tokens(self, codes: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """The inputs (B, n, C) of positions start .. start + n - 1: the code before each (the prefix at 0),
        embedded, plus the position's embedding."""
        model = self.model
        previous = codes.flatten(1, 2)[:, max(start - 1, 0):start + count - 1]  # (B, n or n - 1, D)
        tokens = model.embed_stack(previous)  # (B, n or n - 1, C)
        if start == 0:
            tokens = torch.cat([self.prefix[:, None], tokens], dim=1)
        positions = torch.stack([model.position_at(position) for position in range(start, start + count)])
        return tokens + positions  # (B, n, C)

    def step(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        """Features (B, C) at (row, column) from the codes before it (the sampler asks at depth 0 only)."""
        model = self.model
        position = row * model.config.latent_shape[1] + column
        token = self.tokens(codes, position, 1)  # (B, 1, C)
        condition = None if self.condition is None else self.condition[:, position:position + 1]  # (B, 1, C)
        return self.chain(token, condition, self.position_input(self.offset + position), model.blocks, self.keys,
                          self.values, model.final_norm, self.text_states, self.text_mask)  # (B, C)

    def window(self, codes: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """Features (B, n, C) of positions start .. start + n - 1 from the cache of the positions before
        `start` and the codes in `codes` (B, h, w, D) before each, without writing the cache (windowed
        Jacobi decoding: the window's codes are guesses until they settle). The window's keys and values
        are kept for `commit`."""
        model = self.model
        x = self.tokens(codes, start, count)
        condition = None if self.condition is None else self.condition[:, start:start + count]  # (B, n, C)
        self.pending = (start, [])
        text = None if self.text_states is None else TextMemory(self.text_states, self.text_mask)
        for block, keys, values in zip(model.blocks, self.keys, self.values):
            x, k, v = block.window(x, condition, keys, values, self.offset + start, text)
            self.pending[1].append((k, v))
        return model.final_norm(x)

    def commit(self, codes: torch.Tensor, start: int, count: int) -> None:
        """Write the keys and values of the last window's first `count` positions into the cache: position
        i's come from the code at i - 1, which has settled when i does (else step through them)."""
        if self.pending[0] != start:
            return super().commit(codes, start, count)
        first = self.offset + start
        for (k, v), keys, values in zip(self.pending[1], self.keys, self.values):
            keys[:, :, first:first + count] = k[:, :, :count]
            values[:, :, first:first + count] = v[:, :, :count]
        self.pending = (None, [])

    def reorder(self, index: torch.Tensor) -> None:
        for tensor in self.keys + self.values:
            tensor.copy_(tensor[index])  # in place: CUDA graphs read the caches at fixed addresses
        self.prefix = self.prefix[index]
        self.condition = None if self.condition is None else self.condition[index]
        if self.text_states is not None:  # in place too
            self.text_states.copy_(self.text_states[index])
            self.text_mask.copy_(self.text_mask[index])


register_arch(ArchSpec(
    "transformer", TransformerPrior, "a decoder-only transformer (ImageGPT, the VQGAN prior) with a KV cache",
    options=TransformerOptions, full_context=True, text_encoders=("transformer", "bpe"), recipe=dict(num_layers=6, options=dict(num_heads=4)),
    tiny=dict(hidden_channels=12, num_layers=2, options=dict(num_heads=2))))
