"""The sequential loop: every code in raster order, then through each position's stack, one draw at a
time for the whole batch (methods "naive", "cached", "compiled", "graph"). A prior whose network reads
nothing of a run of positions (`Prior.parallel_runs`: a scale of VAR) has that run drawn at once, from one pass."""
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
    options, model = sampler.options, sampler.model
    batch, height, width, depth_count = known.shape
    net_context = context.guided(model.config) if options.guided else context
    steps = sampler.steps(net_context, net_context.batch_size if options.guided else batch)
    codes = known.clone()
    net_codes = torch.cat([codes, codes]) if options.guided else codes
    uniforms = uniforms.to(known.device)
    any_known = bool(known_mask.any())
    passes, recomputed_before = 0, sampler.recomputed
    flat_codes, flat_known = codes.view(batch, -1), known_mask.reshape(batch, -1)  # draws in raster-then-stack order
    net_flat = net_codes.view(len(net_codes), -1)

    def decide_draws(logits: torch.Tensor, first: int, count: int) -> None:
        """Decide draws first .. first + count - 1 of every sample from their logits (B, count, V)."""
        index = torch.arange(first, first + count, device=codes.device)
        drawn, unsure = decide(logits.flatten(0, 1), uniforms[:, first:first + count].flatten(), options,
                               sampler.tolerance)
        drawn = drawn.view(batch, count)
        if unsure is not None:
            unsure = unsure.view(batch, count)
            if any_known:
                unsure &= ~flat_known[:, first:first + count]  # a known code is kept whatever is drawn
            rows, columns = unsure.nonzero(as_tuple=True)
            if len(rows):
                position, entry = divmod_tensor(index[columns], depth_count)
                draws = torch.stack([position // width, position % width, entry], dim=1)  # (n, 3)
                drawn[rows, columns] = sampler.exact_codes(codes[rows], context.select(rows), draws,
                                                           uniforms[rows, first + columns])
        if any_known:
            drawn = torch.where(flat_known[:, first:first + count], flat_codes[:, first:first + count], drawn)
        flat_codes[:, first:first + count] = drawn
        if options.guided:
            net_flat[:, first:first + count] = torch.cat([drawn, drawn])

    blocks = model.parallel_runs or [(position, 1) for position in range(height * width)]
    for first, count in blocks:
        if count > 1:  # a run whose features read only earlier positions: one pass, every draw at once
            logits = guided_rows(steps.block_logits(net_codes, first, count), scale_rows(sampler, first, count))
            passes += 1
            if on_logits is not None:
                for offset in range(count):
                    on_logits(*divmod(first + offset, width), 0, logits[:, offset])
            decide_draws(logits, first, count)  # (B, count, V); stacks are drawn one at a time
            continue
        row, column = divmod(first, width)
        for depth in range(depth_count):
            logits = guided_rows(steps.logits(net_codes, row, column, depth), sampler.scale_at(first))  # (B, V)
            passes += depth == 0 or steps.passes_per_draw
            if on_logits is not None:
                on_logits(row, column, depth, logits)
            decide_draws(logits[:, None], first * depth_count + depth, 1)
    stats = SamplingStats(torch.full((batch,), passes, dtype=torch.long), int((~known_mask).sum()),
                          sampler.recomputed - recomputed_before)
    return codes, stats


def scale_rows(sampler: Sampler, first: int, count: int) -> torch.Tensor | None:
    """The guidance scales of positions first .. first + count - 1 as (1, count, 1), or None when unguided."""
    scales = sampler.scale_at(slice(first, first + count))
    return None if scales is None else scales.view(1, count, 1)


def divmod_tensor(values: torch.Tensor, divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    return values // divisor, values % divisor
