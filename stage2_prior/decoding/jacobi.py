"""Exact parallel decoding (method "jacobi"): the sequential sample as the fixed point of a parallel iteration.

Every draw of the sequential sampler is a function of the codes before it: code[p] = E_p(codes < p),
the exact decision (the guard's) from p's logits at p's own uniform. So the sequential sample is the
unique fixed point of codes = E(codes) with E applied to every draw at once, and iterating it from
any start reaches that point: after pass t the first t draws are final (by induction over raster
order: draw 0 reads nothing; draw k is final once the draws before it are). Each pass is one forward
of the whole grid, in parallel over every position; the loop stops at the first pass that changes
nothing, after at most one pass per draw and one more. Song et al. (ICML 2021, "Accelerating
Feedforward Computation via Parallel Nonlinear Equation Solving", sec. 3) solve autoregressive
sampling this way with the sample's noise fixed; here the noise is each draw's seeded uniform, so
the fixed point is the sequential sample itself, bit for bit, not a sample from the same distribution.

Exactness. A pass decides each draw from the computed logits (the sampler's precision, the full
forward of the batch), and the draws the guard flags (float error could have flipped them) are
decided again in the same pass from the canonical float64 computation (`Sampler.exact_codes`, all of
them batched). So every pass applies the exact E, and the point it stops at is the sequential sample.

Each sample stops on its own: a sample whose pass changed nothing leaves the batch, so settled samples
cost no more work. `SamplingStats.sequential_passes` counts each sample's passes.
"""
from __future__ import annotations

import torch

from stage2_prior.conditioning import Context
from stage2_prior.decoding.guard import decide
from stage2_prior.decoding.sampler import Sampler, SamplingStats

DECIDE_ROWS = 1 << 15  # draws decided at once: bounds the (rows, V) temporaries of the decision


def full_logits(sampler: Sampler, codes: torch.Tensor, context: Context) -> torch.Tensor:
    """Guided logits (B, h, w, D, V) of every draw of stacked codes (B, h, w, D), in one forward."""
    model, options = sampler.compute, sampler.options
    if options.guided:
        net_context, net_codes = context.guided(model.config.null_class), torch.cat([codes, codes])
    else:
        net_context, net_codes = context, codes
    logits = model.stack_logits(net_codes, model.conditioning(net_context))  # (B or 2B, h, w, D, V)
    if not options.guided:
        return logits
    cond, uncond = logits.chunk(2)
    return cond + options.guidance_scale * (cond - uncond)


def decide_all(sampler: Sampler, logits: torch.Tensor, uniforms: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and unsure flags (both the shape of uniforms) for logits (..., V) at uniforms (...)."""
    rows = logits.reshape(-1, logits.shape[-1])
    flat = uniforms.reshape(-1)
    codes, unsure = [], []
    for start in range(0, len(rows), DECIDE_ROWS):
        drawn, flagged = decide(rows[start:start + DECIDE_ROWS], flat[start:start + DECIDE_ROWS], sampler.options,
                                sampler.tolerance)
        codes.append(drawn)
        unsure.append(flagged)
    codes = torch.cat(codes).view(uniforms.shape)
    return codes, None if sampler.tolerance is None else torch.cat(unsure).view(uniforms.shape)


def run(sampler: Sampler, context: Context, uniforms: torch.Tensor, known: torch.Tensor,
        known_mask: torch.Tensor) -> tuple[torch.Tensor, SamplingStats]:
    """Stacked codes (B, h, w, D): known ones kept, the rest the fixed point of the parallel iteration
    (the sequential sample), from uniforms (B, h*w*D) in raster-then-stack order."""
    batch, height, width, depth = known.shape
    draws = height * width * depth
    uniforms = uniforms.to(known.device).view(batch, height, width, depth)
    codes = known.clone()  # the start: known codes, zero elsewhere (any start reaches the same point)
    passes = torch.zeros(batch, dtype=torch.long, device=known.device)
    active = torch.arange(batch, device=known.device)
    recomputed_before = sampler.recomputed
    while len(active):
        current, fixed = codes[active], known_mask[active]
        logits = full_logits(sampler, current, context.select(active))  # (A, h, w, D, V)
        drawn, unsure = decide_all(sampler, logits, uniforms[active])
        if unsure is not None and bool((unsure & ~fixed).any()):  # decided again exactly, in this very pass
            where = (unsure & ~fixed).nonzero()  # (n, 4): row in active, row, column, depth
            samples, positions = active[where[:, 0]], where[:, 1:]
            drawn[where[:, 0], positions[:, 0], positions[:, 1], positions[:, 2]] = sampler.exact_codes(
                current[where[:, 0]], context.select(samples), positions,
                uniforms[samples, positions[:, 0], positions[:, 1], positions[:, 2]])
        drawn = torch.where(fixed, current, drawn)
        changed = (drawn != current).flatten(1).any(1)  # (A,)
        codes[active] = drawn
        passes[active] += 1
        if int(passes[active].max()) > draws + 1:  # impossible for a causal network: each pass settles a draw
            row = int(changed.nonzero()[0, 0])
            position = int((drawn[row] != current[row]).flatten().nonzero()[0, 0])
            raise RuntimeError(f"jacobi decoding of sample {int(active[row])} still changed draw {position} after "
                               f"{int(passes[active[row]])} passes over {draws} draws: the network sees a later code; "
                               "please report it")
        active = active[changed]  # a pass that changed nothing: that sample has reached its fixed point
    return codes, SamplingStats(passes.cpu(), int((~known_mask).sum()), sampler.recomputed - recomputed_before)


def run_windowed(sampler: Sampler, context: Context, uniforms: torch.Tensor, known: torch.Tensor,
                 known_mask: torch.Tensor) -> tuple[torch.Tensor, SamplingStats]:
    """Windowed Jacobi: the same fixed point, iterated over `options.window` positions at a time on top of
    the arch's incremental state of the settled positions before them.

    A pass computes the window's features from the state (`IncrementalState.window`) and redraws every
    draw in it. The draws up to the first one that changed, and that one, have settled (each was
    computed from settled codes), so the window's first draw settles in every pass; the state then
    advances over the settled positions (`commit`) and the window slides. The batch slides together, by
    the positions every sample has settled."""
    options, model, config = sampler.options, sampler.compute, sampler.model.config
    batch, height, width, depth = known.shape
    positions = height * width
    uniforms = uniforms.to(known.device).view(batch, positions, depth)
    codes = known.clone()
    flat, fixed = codes.view(batch, positions, depth), known_mask.view(batch, positions, depth)
    net_context = context.guided(config.null_class) if options.guided else context
    state = model.start(len(net_context.labels) if options.guided else batch, model.conditioning(net_context))
    start, passes, recomputed_before = 0, 0, sampler.recomputed
    while start < positions:
        count = min(options.window, positions - start)
        current = flat[:, start:start + count].clone()  # (B, n, D)
        net_codes = torch.cat([codes, codes]) if options.guided else codes
        features = state.window(net_codes, start, count)  # (B or 2B, n, C)
        logits = model.head(features, net_codes.view(len(net_codes), positions, depth)[:, start:start + count])
        if options.guided:
            cond, uncond = logits.chunk(2)
            logits = cond + options.guidance_scale * (cond - uncond)  # (B, n, D, V)
        drawn, unsure = decide_all(sampler, logits, uniforms[:, start:start + count])
        window_fixed = fixed[:, start:start + count]
        if unsure is not None and bool((unsure & ~window_fixed).any()):  # decided again exactly, in this pass
            where = (unsure & ~window_fixed).nonzero()  # (n, 3): sample, window position, depth
            position = where[:, 1] + start
            draws = torch.stack([position // width, position % width, where[:, 2]], dim=1)
            drawn[where[:, 0], where[:, 1], where[:, 2]] = sampler.exact_codes(
                codes[where[:, 0]], context.select(where[:, 0]), draws, uniforms[where[:, 0], where[:, 1] + start,
                                                                                  where[:, 2]])
        drawn = torch.where(window_fixed, current, drawn)
        flat[:, start:start + count] = drawn
        changed = (drawn != current).flatten(1)  # (B, n * D)
        first = torch.where(changed.any(1), changed.float().argmax(1), torch.full_like(changed[:, 0], count * depth,
                                                                                     dtype=torch.long))
        settled_draws = torch.clamp(first + 1, max=count * depth)  # (B,): up to and with the first change
        advance = int(settled_draws.min()) // depth  # whole positions every sample has settled
        passes += 1
        if passes > positions * depth + 1:  # impossible for a causal network: each pass settles a draw
            raise RuntimeError(f"windowed jacobi decoding still changed position {start} after {passes} passes over "
                               f"{positions * depth} draws: the network sees a later code; please report it")
        if advance:
            net_codes = torch.cat([codes, codes]) if options.guided else codes
            state.commit(net_codes, start, advance)
            start += advance
    return codes, SamplingStats(torch.full((batch,), passes, dtype=torch.long), int((~known_mask).sum()),
                                sampler.recomputed - recomputed_before)
