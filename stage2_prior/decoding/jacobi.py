"""Exact parallel decoding (method "jacobi"): the sequential sample as the fixed point of a parallel iteration.

Every draw of the sequential sampler is a function of the codes before it: code[i] = E_i(codes before i),
the exact decision (the guard's) from i's logits at i's own uniform. So the sequential sample is the one
fixed point of codes = E(codes) with E applied to every draw at once, and iterating from any start
reaches it. Song et al. (ICML 2021, "Accelerating Feedforward Computation via Parallel Nonlinear
Equation Solving", sec. 3) solve autoregressive sampling this way with the sample's noise fixed; here
the noise is each draw's seeded uniform, so the fixed point is the sequential sample itself, bit for
bit, not a sample of the same distribution.

A pass computes every draw's logits at once (one forward of the grid; for an arch whose head orders a
position's stack, one forward and then the head entry by entry, so a pass settles whole positions) and
redraws every draw from its uniform. Each sample keeps its settled prefix: the draws before the first
one that changed in a pass were computed from settled codes and did not change, so they are settled,
and so is the first changed draw itself (and, head-ordered, the rest of its position). Every pass
settles at least one more draw, so a sample needs at most one pass per draw, and it leaves the batch
when all its draws have settled.

Exactness. Draws are decided from the computed logits (the sampler's precision); those the guard flags
(float error could have flipped them) are decided again from the canonical float64 computation
(`Sampler.exact_codes`) when they reach the settled region, each once; one that comes out differently
ends the region there. So every settled draw is the exact E of settled codes: the result is the
sequential sample. A settled draw that a later pass would change (in float32 or float64, where
decisions are reproducible) can only mean the network reads a later code: an internal error names it.
"""
from __future__ import annotations

import torch

from stage2_prior.conditioning import Conditioning, Context
from stage2_prior.decoding.guard import decide, guided_rows
from stage2_prior.decoding.sampler import Sampler, SamplingStats

DECIDE_ROWS = 1 << 15  # draws decided at once: bounds the (rows, V) temporaries of the decision
EXACT_GRIDS = 64  # grids re-decided exactly in one float64 forward: bounds its logits' memory


def decide_all(sampler: Sampler, logits: torch.Tensor, uniforms: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and flags (both the shape of uniforms) for logits (..., V) at uniforms (...)."""
    rows, flat = logits.reshape(-1, logits.shape[-1]), uniforms.reshape(-1)
    codes, flags = [], []
    for start in range(0, len(rows), DECIDE_ROWS):
        drawn, flagged = decide(rows[start:start + DECIDE_ROWS], flat[start:start + DECIDE_ROWS], sampler.options,
                                sampler.tolerance)
        codes.append(drawn)
        flags.append(flagged)
    codes = torch.cat(codes).view(uniforms.shape)
    return codes, None if sampler.tolerance is None else torch.cat(flags).view(uniforms.shape)


def head_ordered(config) -> bool:
    """Whether the head orders a position's stack (the network's features do not read it)."""
    return config.depth > 1 and config.channel_groups == 1


def draw_positions(sampler: Sampler, features: torch.Tensor | None, codes: torch.Tensor, conditioning: Conditioning | None,
                   uniforms: torch.Tensor, fixed: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass over positions: new codes and flags (B, n, D) for the codes (B, n, D) of n positions from
    raster position `first` (a grid flattened, or a window), known ones (`fixed`) kept. `features` (B or
    2B, n, C) are the network's features there (head-ordered archs: the head then decides the entries in
    turn); None: the whole grid's logits come from one full forward (channel groups, or one code per position)
    on `conditioning` (the network's, for the B or 2B rows)."""
    model, options = sampler.compute, sampler.options
    count = codes.shape[1]
    scales = sampler.scale_at(slice(first, first + count))  # (n,) at each position, or None
    scales = None if scales is None else scales.to(codes.device).view(1, count, 1, 1)
    if features is None:
        height, width = model.config.latent_shape
        grid = codes.view(len(codes), height, width, -1)
        net_grid = torch.cat([grid, grid]) if options.guided else grid
        logits = model.stack_logits(net_grid, conditioning).flatten(1, 2)  # (B or 2B, n, D, V)
        drawn, flags = decide_all(sampler, guided_rows(logits, scales), uniforms)
        return torch.where(fixed, codes, drawn), flags
    new = codes.clone()
    flags = torch.zeros_like(fixed) if sampler.tolerance is not None else None
    for depth in range(codes.shape[-1]):  # the head reads the entries decided before it in this pass
        net_codes = torch.cat([new, new]) if options.guided else new
        logits = guided_rows(model.head.entry(features, net_codes, depth), None if scales is None else scales[..., 0])
        drawn, flagged = decide_all(sampler, logits, uniforms[..., depth])
        new[..., depth] = torch.where(fixed[..., depth], codes[..., depth], drawn)
        if flags is not None:
            flags[..., depth] = flagged
    return new, flags


def settle(sampler: Sampler, grids: torch.Tensor, context: Context, uniforms: torch.Tensor, old: torch.Tensor,
           new: torch.Tensor, flags: torch.Tensor | None, fixed: torch.Tensor, settled: torch.Tensor,
           offset: int = 0) -> torch.Tensor:
    """The settled prefix after a pass, per sample (B,) in draws of the flattened (B, n * D) codes `old`
    (before the pass) and `new` (after it; corrected in place where an exact decision differs). `grids`
    (B, h, w, D) are the whole grids after the pass, which exact decisions read (every code before a
    candidate there has settled); the window starts at draw `offset` of the grid."""
    batch, draws = new.shape
    depth = sampler.model.config.depth
    index = torch.arange(draws, device=new.device)
    pending = index[None] >= settled[:, None]  # (B, n * D): not yet settled
    if sampler.tolerance is not None and bool(((new != old) & ~pending & ~flags_or_zero(flags, new)).any()):
        row, draw = ((new != old) & ~pending).nonzero()[0].tolist()
        raise RuntimeError(f"jacobi decoding: draw {draw + offset} of sample {row} had settled and changed in a later "
                           "pass: the network reads a later code; please report it")
    new[~pending] = old[~pending]  # settled draws are final (in bfloat16 a new batch may round them otherwise)
    changed = (new != old) & pending
    first = torch.where(changed.any(1), changed.float().argmax(1), torch.full_like(settled, draws - 1))
    if head_ordered(sampler.model.config):  # the rest of the first changed position was decided from it
        first = torch.where(changed.any(1), (first // depth + 1) * depth - 1, first)
    end = first.clone()  # (B,): the last settled draw, if every flagged draw up to it is confirmed
    if flags is not None:
        candidates = flags & pending & ~fixed & (index[None] <= end[:, None])
        rows, draws_at = candidates.nonzero(as_tuple=True)
        if len(rows):
            positions = (draws_at + offset) // depth
            width = grids.shape[2]
            draws_3 = torch.stack([positions // width, positions % width, (draws_at + offset) % depth], dim=1)
            exact = torch.cat([sampler.exact_codes(grids[rows[start:start + EXACT_GRIDS]],
                                                   context.select(rows[start:start + EXACT_GRIDS]),
                                                   draws_3[start:start + EXACT_GRIDS],
                                                   uniforms_at(uniforms, rows, draws_at)[start:start + EXACT_GRIDS])
                               for start in range(0, len(rows), EXACT_GRIDS)])
            wrong = exact != new[rows, draws_at]
            if bool(wrong.any()):  # the first wrong draw of each sample takes its exact value and ends the region
                mismatch = torch.full((batch, draws), draws, dtype=torch.long, device=new.device)
                mismatch[rows[wrong], draws_at[wrong]] = draws_at[wrong]
                cut = mismatch.min(1).values  # (B,)
                corrected = torch.zeros_like(candidates)
                corrected[rows[wrong], draws_at[wrong]] = True
                take = corrected & (index[None] == cut[:, None])
                new[take] = exact[take[rows, draws_at]]
                end = torch.minimum(end, cut)
    return end + 1


def flags_or_zero(flags: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, dtype=torch.bool) if flags is None else flags


def uniforms_at(uniforms: torch.Tensor, rows: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """uniforms (B, n, D) at flattened draws (n * D indices) of rows."""
    return uniforms.flatten(1)[rows, draws]


def run(sampler: Sampler, context: Context, uniforms: torch.Tensor, known: torch.Tensor,
        known_mask: torch.Tensor) -> tuple[torch.Tensor, SamplingStats]:
    """Stacked codes (B, h, w, D): known ones kept, the rest the fixed point of the parallel iteration
    (the sequential sample), from uniforms (B, h*w*D) in raster-then-stack order."""
    model, options = sampler.compute, sampler.options
    batch, height, width, depth = known.shape
    positions, draws = height * width, height * width * depth
    uniforms = uniforms.to(known.device).view(batch, positions, depth)
    codes = known.clone()  # the start: known codes, zero elsewhere (any start reaches the same point)
    flat, fixed = codes.view(batch, positions, depth), known_mask.reshape(batch, positions, depth)
    settled = torch.zeros(batch, dtype=torch.long, device=known.device)
    passes = torch.zeros_like(settled)
    active = torch.arange(batch, device=known.device)
    recomputed_before = sampler.recomputed
    # the network's conditioning (a caption's encoding, say) once per run; each pass takes its samples' rows
    conditioning = model.conditioning(context.guided(model.config) if options.guided else context)
    while len(active):
        current, sample_context = flat[active], context.select(active)
        rows = torch.cat([active, active + batch]) if options.guided else active  # the unconditioned half after
        features, pass_conditioning = None, conditioning.select(rows)
        if head_ordered(model.config):
            grid = codes[active]
            net_grid = torch.cat([grid, grid]) if options.guided else grid
            features = model.features(net_grid, pass_conditioning).flatten(2).transpose(1, 2)
        new, flags = draw_positions(sampler, features, current, pass_conditioning, uniforms[active], fixed[active])
        after = new.view(-1, height, width, depth)
        new, old = new.flatten(1), current.flatten(1)
        settled[active] = settle(sampler, after, sample_context, uniforms[active], old, new,
                                 None if flags is None else flags.flatten(1), fixed[active].flatten(1),
                                 settled[active])
        flat[active] = new.view(-1, positions, depth)
        passes[active] += 1
        active = active[settled[active] < draws]
    return codes, SamplingStats(passes.cpu(), int((~known_mask).sum()), sampler.recomputed - recomputed_before)


def run_windowed(sampler: Sampler, context: Context, uniforms: torch.Tensor, known: torch.Tensor,
                 known_mask: torch.Tensor) -> tuple[torch.Tensor, SamplingStats]:
    """Windowed Jacobi: the same fixed point, iterated over `options.window` positions at a time on top of
    the arch's incremental state of the settled positions before them (`IncrementalState.window` and
    `commit`). A pass settles the window's draws up to its first change, as `run` does; the state then
    advances over the positions every sample of the batch has settled, and the window slides. The batch
    slides together: its samples share the state, so each reports the batch's passes."""
    options, model, config = sampler.options, sampler.compute, sampler.model.config
    batch, height, width, depth = known.shape
    positions = height * width
    uniforms = uniforms.to(known.device).view(batch, positions, depth)
    codes = known.clone()
    flat, fixed = codes.view(batch, positions, depth), known_mask.reshape(batch, positions, depth)
    net_context = context.guided(config) if options.guided else context
    state = model.start(net_context.batch_size if options.guided else batch, model.conditioning(net_context))
    start, passes, recomputed_before = 0, 0, sampler.recomputed
    settled = torch.zeros(batch, dtype=torch.long, device=known.device)  # draws settled inside the window
    while start < positions:
        count = min(options.window, positions - start)
        window = slice(start, start + count)
        net_codes = torch.cat([codes, codes]) if options.guided else codes
        features = state.window(net_codes, start, count)  # (B or 2B, n, C)
        current = flat[:, window]
        new, flags = draw_positions(sampler, features, current, None, uniforms[:, window], fixed[:, window],
                                    first=start)
        after = codes.clone()
        after.view(batch, positions, depth)[:, window] = new
        new, old = new.flatten(1), current.flatten(1)
        settled = settle(sampler, after, context, uniforms[:, window], old, new,
                         None if flags is None else flags.flatten(1), fixed[:, window].flatten(1), settled,
                         offset=start * depth)
        flat[:, window] = new.view(batch, count, depth)
        passes += 1
        advance = int(settled.min()) // depth  # whole positions every sample has settled
        if advance:
            net_codes = torch.cat([codes, codes]) if options.guided else codes
            state.commit(net_codes, start, advance)
            start += advance
            settled = (settled - advance * depth).clamp_min(0)
    return codes, SamplingStats(torch.full((batch,), passes, dtype=torch.long), int((~known_mask).sum()),
                                sampler.recomputed - recomputed_before)
