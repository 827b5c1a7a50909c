"""`MaskedPrior`: the family of masked priors (MaskGIT, Chang et al., CVPR 2022), what every such arch shares.

A masked prior reads a code grid in which some positions are hidden behind a learned mask vector and
predicts every position at once from what is visible, in both directions. It is trained by masked
token prediction (sec. 3.1): per grid a ratio r ~ U(0, 1), ceil(cos(pi r / 2) N) random positions
hidden (the cosine schedule of sec. 3.3), the loss the cross-entropy at the hidden ones. It samples in
rounds (`stage2_prior.decoding.rounds`, sec. 3.2): every hidden position is drawn, the most confident
draws are kept and the rest hidden again, fewer each round on the same cosine schedule.

An arch of this family subclasses `MaskedPrior` and supplies `network(x, conditioning)` over the whole
grid (no causal mask: the mask vector hides what it must not see); its registry entry says
`family="masked"`. It has no exact likelihood (a masked model defines no product of conditionals), so
`log_prob` and beam search are refused, and validation reports the masked loss in bits per hidden code
(`masked_bits_per_code`), which compares masked priors with each other, not with raster bits per code.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from shared.errors import UserError
from stage2_prior.conditioning import Conditioning
from stage2_prior.config import PriorConfig
from stage2_prior.prior import Prior

DEFAULT_STEPS = 8  # rounds of sampling (MaskGIT's 8 to 12, sec. 4.2)


def masked_count(ratios: torch.Tensor, positions: int) -> torch.Tensor:
    """Positions to hide (B,) int64 for mask ratios r (B,) in [0, 1): ceil(cos(pi r / 2) N), at least 1."""
    return torch.ceil(torch.cos(math.pi / 2 * ratios) * positions).long().clamp(1, positions)


VALIDATION_MASK_SEED = 4321  # validation masks: row k's mask is seeded by VALIDATION_MASK_SEED + k


def random_masks(batch: int, positions: int, device: torch.device, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Training masks (B, N) bool: per grid a cosine-schedule count of positions, chosen uniformly."""
    ratios = torch.rand(batch, generator=generator, device=device)
    order = torch.rand(batch, positions, generator=generator, device=device).argsort(1)  # a random ranking
    return order < masked_count(ratios, positions)[:, None]


class MaskedPrior(Prior):
    """Base of the masked archs (see the module docstring). Codes are grids (B, h, w), one code per position."""

    validation_metric = "masked_bits_per_code"
    default_steps = DEFAULT_STEPS

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        # the input of a hidden position: one more token, on the scale of the codes (initialize_tables)
        self.mask_vector = nn.Parameter(torch.randn(config.hidden_channels) * 0.02)

    @property
    def sampling_methods(self) -> tuple[str, ...]:
        return ("rounds",)

    def masked_features(self, stacked: torch.Tensor, hidden: torch.Tensor, conditioning: Conditioning
                        ) -> torch.Tensor:
        """Stacked codes (B, h, w, 1) with `hidden` (B, h, w) bool positions masked -> features (B, h, w, C)."""
        x = self.embed(stacked)  # (B, C, h, w)
        x = torch.where(hidden[:, None], self.mask_vector.to(x.dtype)[None, :, None, None], x)
        return rearrange(self.network(x, conditioning), "b c h w -> b h w c")

    def masked_logits(self, stacked: torch.Tensor, hidden: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """Logits (B, h, w, V) of every position given the visible codes (`hidden` (B, h, w) masked)."""
        return self.head(self.masked_features(stacked, hidden, conditioning), stacked)[..., 0, :]

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
                condition: torch.Tensor | None = None, hidden: torch.Tensor | None = None, prompt=None) -> torch.Tensor:
        """Codes (B, h, w) -> logits (B, V, h, w) of every position given the codes not `hidden` ((B, h, w)
        bool; default: every position hidden, the first round of sampling)."""
        self.check_codes(codes)
        stacked = self.stacked(codes)
        hidden = torch.ones(codes.shape, dtype=torch.bool, device=codes.device) if hidden is None else hidden.bool()
        if hidden.shape != codes.shape:
            raise UserError(f"hidden must have the shape of codes {tuple(codes.shape)}, got {tuple(hidden.shape)}")
        context = self.context(labels, condition, codes.shape[0], prompt)
        return rearrange(self.masked_logits(stacked, hidden, self.conditioning(context)), "b h w v -> b v h w")

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None,
            condition: torch.Tensor | None = None, generator: torch.Generator | None = None, prompt=None
            ) -> torch.Tensor:
        """The masked-token loss (nats per hidden code): cosine-schedule masks, cross-entropy at hidden positions."""
        self.check_codes(codes)
        stacked = self.stacked(codes)
        batch, height, width = codes.shape
        hidden = random_masks(batch, height * width, codes.device, generator).view(batch, height, width)
        context = self.context(labels, condition, batch, prompt)
        features = self.masked_features(stacked, hidden, self.conditioning(context))  # (B, h, w, C)
        losses = self.head.nll(features, stacked)  # (B, h, w)
        return (losses * hidden).sum() / hidden.sum()

    def validation_scores(self, codes: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None,
                          rows: torch.Tensor, prompt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, V, h, w), weights (B, h, w)): the masked loss's logits at cosine-schedule masks seeded by
        each row's index in the split (the same masks at every step, batch size and process count), and which
        positions it scores (the hidden ones)."""
        batch, height, width = codes.shape
        hidden = torch.cat([random_masks(1, height * width, codes.device, torch.Generator(codes.device).manual_seed(
            VALIDATION_MASK_SEED + int(row))) for row in rows]).view(batch, height, width)
        return self(codes, labels, condition, hidden=hidden, prompt=prompt), hidden

    def log_prob(self, *args, **kwargs) -> torch.Tensor:
        raise UserError(f"arch {self.config.arch!r} is a masked prior: it defines no exact likelihood of a grid (no "
                        "product of conditionals); use an autoregressive arch for log_prob")

    def beam_search(self, *args, **kwargs):
        raise UserError(f"arch {self.config.arch!r} is a masked prior: beam search extends grids in an order it does "
                        "not have; sample it in rounds (steps=...)")

    beam_search_with = beam_search  # what `Pipeline` calls

    def stack_log_prob(self, *args, **kwargs) -> torch.Tensor:
        return self.log_prob()

