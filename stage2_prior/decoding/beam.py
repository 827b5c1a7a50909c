"""Beam search over raster-then-stack order: the most likely grids a beam of partial grids finds."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from stage2_prior.conditioning import Context
from stage2_prior.decoding.guard import guided_rows
from stage2_prior.decoding.sampler import Sampler


@dataclasses.dataclass
class BeamSearchOutput:
    codes: torch.Tensor  # (B, h, w[, D]) the best grid found for each sample
    log_prob: torch.Tensor  # (B,) float64: its total log-probability under the prior (nats), unguided
    score: torch.Tensor  # (B,) float64: the total the search maximised (the guided log-probabilities with guidance)


def beam_search(sampler: Sampler, num_samples: int, context: Context, num_beams: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The best stacked grid (num_samples, h, w, D) of `num_beams` partial grids kept per sample, scored by
    the sum of their (guided) log-probabilities, and that score (num_samples,) float64."""
    options, config = sampler.options, sampler.model.config
    height, width = config.latent_shape
    device = sampler.model.device
    rows = num_samples * num_beams
    beam_context = context.repeat_interleave(num_beams)
    net_context = beam_context.guided(config) if options.guided else beam_context
    steps = sampler.steps(net_context, rows * (2 if options.guided else 1))
    codes = torch.zeros(rows, height, width, config.depth, dtype=torch.long, device=device)
    scores = torch.full((num_samples, num_beams), float("-inf"), dtype=torch.float64, device=device)
    scores[:, 0] = 0.0  # one live beam at first, so the beams never duplicate each other
    for row in range(height):
        for column in range(width):
            for depth in range(config.depth):
                net_codes = torch.cat([codes, codes]) if options.guided else codes
                logits = guided_rows(steps.logits(net_codes, row, column, depth), sampler.scale_at(row * width + column))
                log_probs = F.log_softmax(logits.double(), dim=-1).view(num_samples, num_beams, -1)
                candidates = (scores[:, :, None] + log_probs).flatten(1)  # (n, beams * V)
                scores, chosen = candidates.topk(num_beams, dim=-1)  # (n, beams)
                beam = chosen // config.vocab_size
                source = (torch.arange(num_samples, device=device)[:, None] * num_beams + beam).flatten()
                codes = codes[source]
                codes[:, row, column, depth] = (chosen % config.vocab_size).flatten()
                steps.reorder(torch.cat([source, source + rows]) if options.guided else source)
    best = scores.argmax(-1)  # (n,)
    samples = torch.arange(num_samples, device=device)
    return codes.view(num_samples, num_beams, *codes.shape[1:])[samples, best], scores[samples, best]
