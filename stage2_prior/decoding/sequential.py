"""The sequential loop: every code in raster order, then through each position's stack, one draw at a
time for the whole batch (methods "naive", "cached", "compiled", "graph")."""
from __future__ import annotations

from collections.abc import Callable

import torch

from stage2_prior.conditioning import Context
from stage2_prior.decoding.guard import decide, guided_rows
from stage2_prior.decoding.sampler import Sampler, SamplingStats


def run(sampler: Sampler, context: Context, uniforms: torch.Tensor, known: torch.Tensor, known_mask: torch.Tensor,
        on_logits: Callable[[int, int, int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, SamplingStats]:
    """Stacked codes (B, h, w, D): known ones kept, the rest drawn in order from `uniforms` (B, h*w*D).
    `on_logits(row, column, depth, logits)` sees the logits of every draw (the tests compare them with
    the full forward)."""
    options, config = sampler.options, sampler.model.config
    batch, height, width, depth_count = known.shape
    net_context = context.guided(config.null_class) if options.guided else context
    steps = sampler.steps(net_context, len(net_context.labels) if options.guided else batch)
    codes = known.clone()
    net_codes = torch.cat([codes, codes]) if options.guided else codes
    uniforms = uniforms.to(known.device)
    any_known = bool(known_mask.any())
    passes, recomputed_before = 0, sampler.recomputed
    for row in range(height):
        for column in range(width):
            for depth in range(depth_count):
                logits = guided_rows(steps.logits(net_codes, row, column, depth), options.guidance_scale)  # (B, V)
                passes += depth == 0 or steps.passes_per_draw
                if on_logits is not None:
                    on_logits(row, column, depth, logits)
                draw_index = (row * width + column) * depth_count + depth
                drawn, unsure = decide(logits, uniforms[:, draw_index], options, sampler.tolerance)
                if unsure is not None and any_known:
                    unsure &= ~known_mask[:, row, column, depth]  # a known code is kept whatever is drawn
                if unsure is not None and bool(unsure.any()):
                    index = unsure.nonzero()[:, 0]
                    draws = torch.tensor([[row, column, depth]], device=codes.device).expand(len(index), 3)
                    drawn[index] = sampler.exact_codes(codes[index], context.select(index), draws,
                                                       uniforms[index, draw_index])
                chosen = drawn
                if any_known:
                    chosen = torch.where(known_mask[:, row, column, depth], codes[:, row, column, depth], drawn)
                codes[:, row, column, depth] = chosen
                if options.guided:
                    net_codes[:, row, column, depth] = torch.cat([chosen, chosen])
    stats = SamplingStats(torch.full((batch,), passes, dtype=torch.long), int((~known_mask).sum()),
                          sampler.recomputed - recomputed_before)
    return codes, stats
