"""MaskGIT: a bidirectional transformer over a code grid, trained to fill masked codes (arch "maskgit";
Chang et al., CVPR 2022).

It reads the same single-level codes the raster priors read, so they compare on one tokenizer. The
grid is one sequence of h*w tokens in raster order: each token's input is its code's embedding, or
the learned mask vector where the code is hidden (`stage2_prior.masked`), plus a learned position
embedding; a class token in front carries the label (the null class of classifier-free guidance is
one more row; unconditional priors have a learned start token there). Pre-norm transformer blocks
(`stage2_prior.attention`) without a causal mask: every token reads every other (sec. 3.1, the
bidirectional transformer of BERT). Training and sampling in rounds are the family's
(`stage2_prior.masked`, `stage2_prior.decoding.rounds`).
"""
from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import nn

from shared.config import option
from stage2_prior.attention import TransformerBlock, initialize_gpt, initialize_tables
from stage2_prior.conditioning import Conditioning
from stage2_prior.config import PriorConfig
from stage2_prior.masked import MaskedPrior
from stage2_prior.registry import ArchOptions, ArchSpec, check_heads, register_arch


@dataclasses.dataclass(frozen=True)
class MaskGITOptions(ArchOptions):
    num_heads: int = option(4, "attention heads")

    def check(self, config) -> None:
        check_heads(self.num_heads, config.hidden_channels)


class MaskGITPrior(MaskedPrior):
    """Bidirectional transformer (arch="maskgit"): `forward(codes (B, h, w), labels, hidden=mask)` -> logits
    (B, vocab_size, h, w) of every position given the codes not hidden."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        channels = config.hidden_channels
        self.label_embedding = nn.Embedding(self.label_rows, channels) if self.label_rows else None
        self.start_token = None if self.label_rows else nn.Parameter(torch.randn(channels))
        self.position_embedding = nn.Parameter(torch.randn(config.num_positions + 1, channels) * 0.02)
        text = config.text_encoder is not None
        self.blocks = nn.ModuleList(TransformerBlock(channels, config.options.num_heads, config.dropout, False, text)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(channels)
        initialize_gpt(self.blocks)
        initialize_tables(self.embedding, self.start_token, self.label_embedding)

    def network(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        height = x.shape[2]
        tokens = rearrange(x, "b c h w -> b (h w) c")  # (B, N, C): codes or the mask vector
        if self.label_embedding is not None:
            first = self.label_embedding(conditioning.labels)  # (B, C)
        else:
            first = self.start_token.expand(len(x), -1)
        tokens = torch.cat([first[:, None], tokens], dim=1) + self.position_embedding  # (B, N + 1, C)
        for block in self.blocks:
            tokens = block(tokens, None, mask=None, text=conditioning.text)
        return rearrange(self.final_norm(tokens[:, 1:]), "b (h w) c -> b c h w", h=height)  # (B, C, h, w)


register_arch(ArchSpec(
    "maskgit", MaskGITPrior, "a bidirectional transformer filling masked codes in a few rounds (MaskGIT)",
    options=MaskGITOptions, family="masked", code_maps=False, stacks=False, heads=("softmax",), text_encoders=("transformer",),
    recipe=dict(num_layers=6, options=dict(num_heads=4)),
    tiny=dict(hidden_channels=12, num_layers=2, options=dict(num_heads=2))))
