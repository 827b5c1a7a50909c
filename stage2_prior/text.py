"""Text conditioning: the caption tokenizer, the text encoder, and the cross-attention that reads it.

- The tokenizer is a byte-pair encoding trained on the training captions with the `tokenizers` library
  (lower-cased, split on whitespace and punctuation; Sennrich et al. 2016), kept whole in the prior's
  config.json (`PriorConfig.text_tokenizer`), so a prior folder, its checkpoints and a resumed run carry
  the very tokenizer it was trained with. A caption becomes [BOS] + its tokens, cut to `text_length`, padded
  with [PAD]; the null caption of classifier-free guidance (and of caption dropout) is [BOS] alone.
- `TextEncoder` ("transformer", Parti's arrangement, Yu et al. 2022, sec. 2.2): token and position
  embeddings through bidirectional pre-norm transformer blocks that ignore the padding, trained with the
  prior. Its output, the memory (B, L, C) and its mask (B, L), is read by cross-attention in each block of
  the image-token network (`CrossAttention`), after self-attention, as in the T5 / Parti decoder.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn

from shared.errors import UserError

PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"  # ids 0, 1, 2
PAD_ID, BOS_ID = 0, 1
TEXT_ENCODERS = ("transformer", "bpe")


def train_text_tokenizer(captions: Sequence[str], vocab_size: int) -> dict[str, Any]:
    """A BPE tokenizer trained on `captions` with at most `vocab_size` tokens, as its JSON object."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, UNK], show_progress=False)
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return json.loads(tokenizer.to_str())


@functools.lru_cache(maxsize=8)
def _load(serialized: str) -> Tokenizer:
    return Tokenizer.from_str(serialized)


def text_vocab_size(tokenizer_json: dict[str, Any]) -> int:
    return _load(json.dumps(tokenizer_json, sort_keys=True)).get_vocab_size()


def encode_captions(tokenizer_json: dict[str, Any], captions: Sequence[str | None], length: int,
                    warn_truncated: bool = True) -> torch.Tensor:
    """Captions -> token ids (B, length) int64: [BOS] + tokens, cut to `length`, padded with [PAD]; a None
    caption is the null caption ([BOS] alone). A caption cut short is reported once, naming the limit."""
    tokenizer = _load(json.dumps(tokenizer_json, sort_keys=True))
    ids = torch.full((len(captions), length), PAD_ID, dtype=torch.long)
    ids[:, 0] = BOS_ID
    truncated = []
    texts = [caption or "" for caption in captions]
    for row, encoding in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
        tokens = encoding.ids[:length - 1]
        if len(encoding.ids) > length - 1:
            truncated.append(row)
        ids[row, 1:1 + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    if truncated and warn_truncated:
        print(f"warning: {len(truncated)} caption(s) are longer than the prior's {length - 1} text tokens and were "
              f"cut to it (e.g. {texts[truncated[0]]!r})", file=sys.stderr)
    return ids


@dataclasses.dataclass(frozen=True)
class TextMemory:
    """What cross-attention reads: the encoded caption (B, L, C) and which of its tokens are real (B, L) bool."""

    states: torch.Tensor
    mask: torch.Tensor

    def select(self, index) -> "TextMemory":
        return TextMemory(self.states[index], self.mask[index])


class EncoderBlock(nn.Module):
    """A bidirectional pre-norm transformer block that ignores padded tokens."""

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = CrossAttention(channels, heads, dropout)
        self.mlp_norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x, TextMemory(x, mask))  # self-attention: the caption reads itself
        return x + F.dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


class TextEncoder(nn.Module):
    """Token ids (B, L) -> TextMemory: embeddings + learned positions through `layers` bidirectional blocks,
    then a LayerNorm (Parti's text encoder, small)."""

    def __init__(self, vocab_size: int, length: int, channels: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        # Token and position tables on one scale, N(0, 0.02) as in GPT: with nn.Embedding's N(0, 1) the positions
        # are 1/50 of a word, the blocks read a bag of words, and "a red circle above a blue square" cannot be
        # told from "a blue circle above a red square" (measured: no binding of attributes to objects).
        self.embedding = nn.Embedding(vocab_size, channels)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.positions = nn.Parameter(torch.randn(length, channels) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(channels, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(channels)

    def forward(self, ids: torch.Tensor) -> TextMemory:
        mask = ids != PAD_ID  # (B, L): [BOS] is never padding, so every caption has a token to read
        x = self.embedding(ids) + self.positions[:ids.shape[1]]  # (B, L, C)
        for block in self.blocks:
            x = block(x, mask)
        return TextMemory(self.norm(x), mask)


class CrossAttention(nn.Module):
    """The update (B, n, C) that attention from LN(x) over the memory adds to x: queries from the tokens, keys
    and values from the memory's real (unmasked) tokens."""

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, channels)
        self.key_value = nn.Linear(channels, 2 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, memory: TextMemory) -> torch.Tensor:
        q = rearrange(self.query(self.norm(x)), "b n (heads d) -> b heads n d", heads=self.heads)
        source = self.norm(memory.states) if memory.states is x else memory.states
        k, v = (rearrange(t, "b l (heads d) -> b heads l d", heads=self.heads)
                for t in self.key_value(source).chunk(2, dim=-1))
        visible = memory.mask[:, None, None, :]  # (B, 1, 1, L)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, heads, n, d)
        update = self.out(rearrange(attended, "b heads n d -> b n (heads d)"))
        return F.dropout(update, self.dropout, self.training)


def text_heads(channels: int) -> int:
    """Attention heads of the text encoder and cross-attention: 64-channel heads, or fewer that divide the width."""
    return next(heads for heads in (max(1, channels // 64), 4, 2, 1) if channels % heads == 0)


def check_text_encoder(name: str | None) -> None:
    if name is not None and name not in TEXT_ENCODERS:
        raise UserError(f"text_encoder must be one of {', '.join(TEXT_ENCODERS)} (or None), got {name!r}")
