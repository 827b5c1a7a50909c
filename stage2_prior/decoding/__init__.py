"""How a prior's codes are produced, given the prior and one frozen `SamplingOptions`.

Reading order: `options` (the options, seeds and uniforms), `steps` (logits for one draw: naive, or
an arch's incremental state, compiled or in CUDA graphs), `guard` (the decision rule and the exact
float64 recomputation), `sampler` (a prior made ready to draw: copies, tolerances), then the
decoders: `sequential` (one draw at a time), `jacobi` (every draw at once, to the sequential sample's
fixed point), `beam` (beam search), `rounds` (masked priors: MaskGIT's confidence-ordered rounds).
"""
from __future__ import annotations

import torch

from stage2_prior.conditioning import Context
from stage2_prior.decoding import jacobi, rounds, sequential
from stage2_prior.decoding.beam import BeamSearchOutput, beam_search
from stage2_prior.decoding.guard import cast_copy, decide
from stage2_prior.decoding.options import (METHODS, PRECISIONS, SEED_STRIDE, SamplingOptions, check_num_beams,
                                           check_num_samples, resolve_seed, sample_uniforms, sampling_options)
from stage2_prior.decoding.sampler import Sampler, SamplingStats, evaluation

__all__ = ["BeamSearchOutput", "METHODS", "PRECISIONS", "SEED_STRIDE", "Sampler", "SamplingOptions", "SamplingStats",
           "beam_search", "cast_copy", "check_num_beams", "check_num_samples", "decide", "draw", "evaluation",
           "resolve_seed", "sample_uniforms", "sampling_options"]


def draw(sampler: Sampler, num_samples: int, context: Context, seed: int, sample_offset: int = 0,
         known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, SamplingStats]:
    """Stacked codes (num_samples, h, w, D) and what they cost. Sample k comes from the uniforms of
    (seed, sample_offset + k); `known` codes (stacked) are kept where `known_mask` is True. Inputs are
    checked by the caller (`Prior.sample`, `Pipeline.generate`)."""
    model = sampler.model
    config = model.config
    height, width = config.latent_shape
    draws = height * width * config.depth
    if sampler.options.method == "rounds":  # per round and position: the draw's uniform and its confidence noise's
        draws *= sampler.options.steps * 2
    uniforms = sample_uniforms(seed, sample_offset, num_samples, draws)
    shape = (num_samples, height, width, config.depth)
    if known is None:
        known = torch.zeros(shape, dtype=torch.long, device=model.device)
        known_mask = torch.zeros(shape, dtype=torch.bool, device=model.device)
    decoder = {"jacobi": jacobi.run_windowed if sampler.options.window else jacobi.run,
               "rounds": rounds.run}.get(sampler.options.method, sequential.run)
    with evaluation(model):
        return decoder(sampler, context, uniforms, known.to(model.device).long(), known_mask.to(model.device))
