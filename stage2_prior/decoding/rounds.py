"""Masked decoding in rounds (method "rounds"; MaskGIT, Chang et al., CVPR 2022, sec. 3.2).

Every unknown position starts hidden. Round t = 0 .. T-1: one forward of the grid gives the logits of
every position; each hidden position draws a code from its own uniform; its confidence is the log
probability of that code plus Gumbel noise from a second uniform, scaled by confidence_temperature
(1 - (t + 1) / T) (annealed to 0, as MaskGIT's choice temperature); the floor(U cos(pi (t + 1) / 2T))
least confident stay hidden (U: the positions to fill; at least one is revealed per round and none
stay hidden after the last) and the others keep their draws. Known codes (`complete`) are never hidden.

Both uniforms of a draw are fixed by (seed, sample, round, position), so a sample does not depend on
its batch except through float rounding, which the guard removes as for raster priors: a round of a
sample is decided from the batch's logits unless an error of the measured size could change a draw
(its uniform near a CDF edge) or which positions stay hidden (two confidences around the cut within
the error's bound); then that sample's round is decided again from the float64 forward of the sample
alone, the canonical computation.
"""
from __future__ import annotations

import math

import torch

from stage2_prior.conditioning import Context
from stage2_prior.decoding.guard import ABSOLUTE_MARGIN, decide, guided_rows
from stage2_prior.decoding.sampler import Sampler, SamplingStats


def hidden_after(round_index: int, rounds: int, to_fill: torch.Tensor, hidden_now: torch.Tensor) -> torch.Tensor:
    """How many positions stay hidden after round `round_index` (B,): the cosine schedule over the positions to
    fill, at least one fewer than are hidden now, none after the last round."""
    if round_index == rounds - 1:
        return torch.zeros_like(to_fill)
    scheduled = torch.floor(to_fill.double() * math.cos(math.pi / 2 * (round_index + 1) / rounds)).long()
    return torch.minimum(scheduled, (hidden_now - 1).clamp_min(0))


def round_decisions(sampler: Sampler, logits: torch.Tensor, uniforms: torch.Tensor, hidden: torch.Tensor,
                    keep_hidden: torch.Tensor, round_index: int, tolerance: float | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One round for samples (n,): logits (n, N, V), uniforms (n, N, 2), hidden (n, N) -> (codes drawn (n, N),
    still hidden after the round (n, N), which samples' decisions an error of `tolerance` could change (n,))."""
    options = sampler.options
    count, positions, vocab = logits.shape
    drawn, unsure, log_probs = decide(logits.reshape(-1, vocab), uniforms[..., 0].reshape(-1), options, tolerance,
                                      with_log_probs=True)
    drawn, log_probs = drawn.view(count, positions), log_probs.view(count, positions)
    noise_scale = options.confidence_temperature * (1 - (round_index + 1) / options.steps)
    gumbel = -torch.log(-torch.log(uniforms[..., 1].clamp(1e-300, 1 - 1e-16)))  # (n, N)
    confidence = log_probs + noise_scale * gumbel
    confidence = confidence.masked_fill(~hidden, float("inf"))  # what is visible stays visible
    # the keep_hidden[i] least confident hidden positions stay hidden (ties: the earlier position)
    order = torch.sort(confidence, dim=1, stable=True).indices  # (n, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(positions, device=order.device).expand(count, -1))
    still_hidden = rank < keep_hidden[:, None]
    flags = None
    if tolerance is not None:
        flags = (unsure.view(count, positions) & hidden).any(1)
        error = 2 * tolerance / (options.temperature if not options.greedy else 1.0)  # a log-probability's bound
        ranked = confidence.gather(1, order)  # (n, N) ascending
        inside = keep_hidden - 1  # the last position kept hidden, and the first revealed after it
        has_cut = (keep_hidden > 0) & (keep_hidden < hidden.sum(1))
        below = ranked.gather(1, inside.clamp_min(0)[:, None])[:, 0]
        above = ranked.gather(1, keep_hidden.clamp_max(positions - 1)[:, None])[:, 0]
        flags |= has_cut & (above - below <= 2 * error + ABSOLUTE_MARGIN)
    return drawn, still_hidden, flags


def run(sampler: Sampler, context: Context, uniforms: torch.Tensor, known: torch.Tensor,
        known_mask: torch.Tensor) -> tuple[torch.Tensor, SamplingStats]:
    """Stacked codes (B, h, w, 1): known ones kept, the rest filled in `options.steps` rounds from uniforms
    (B, steps * h * w * 2): (round, position, draw or confidence noise)."""
    options, compute, model = sampler.options, sampler.compute, sampler.model
    batch, height, width, _ = known.shape
    positions, rounds = height * width, options.steps
    uniforms = uniforms.to(known.device).view(batch, rounds, positions, 2)
    codes = known.clone().view(batch, positions)
    hidden = ~known_mask.reshape(batch, positions)
    to_fill = hidden.sum(1)
    scales = options.guidance_schedule.factors(rounds) * options.guidance_scale
    net_context = context.guided(model.config) if options.guided else context
    conditioning = compute.conditioning(net_context)
    recomputed = 0
    for round_index in range(rounds):
        keep_hidden = hidden_after(round_index, rounds, to_fill, hidden.sum(1))
        scale = float(scales[round_index]) if options.guided else None
        net_codes = torch.cat([codes, codes]) if options.guided else codes
        net_hidden = torch.cat([hidden, hidden]) if options.guided else hidden
        logits = compute.masked_logits(net_codes.view(-1, height, width, 1), net_hidden.view(-1, height, width),
                                       conditioning)
        logits = guided_rows(logits.flatten(1, 2), scale)  # (B, N, V)
        drawn, still_hidden, flags = round_decisions(sampler, logits, uniforms[:, round_index], hidden, keep_hidden,
                                                     round_index, sampler.tolerance)
        for index in ([] if flags is None else flags.nonzero()[:, 0].tolist()):  # decided again alone, in float64
            recomputed += 1
            alone = slice(index, index + 1)
            canonical = canonical_round_logits(sampler, codes[alone], hidden[alone], context.select(alone), scale,
                                               height, width)
            drawn[alone], still_hidden[alone], _ = round_decisions(sampler, canonical, uniforms[alone, round_index],
                                                                   hidden[alone], keep_hidden[alone], round_index, None)
        revealed = hidden & ~still_hidden
        codes = torch.where(revealed, drawn, codes)
        hidden = still_hidden
    sampler.recomputed += recomputed
    stats = SamplingStats(torch.full((batch,), rounds, dtype=torch.long), int((~known_mask).sum()), recomputed)
    return codes.view(batch, height, width, 1), stats


def canonical_round_logits(sampler: Sampler, codes: torch.Tensor, hidden: torch.Tensor, context: Context,
                           scale: float | None, height: int, width: int) -> torch.Tensor:
    """The float64 guided logits (1, N, V) of one sample's round, each guidance branch its own forward."""
    double = sampler.double
    branches = [context] if scale is None else [context, context.guided(double.config).select(slice(1, 2))]
    logits = [double.masked_logits(codes.view(1, height, width, 1), hidden.view(1, height, width),
                                   double.conditioning(branch)) for branch in branches]
    return guided_rows(torch.cat(logits).flatten(1, 2).double(), scale)
