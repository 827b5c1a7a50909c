"""`Sampler`: a prior made ready to draw codes with one `SamplingOptions`.

It holds what drawing needs besides the prior: the network in the options' precision, the float64
copy that decides draws near a boundary, the measured logit tolerances, and (method "graph") the
fixed tensors of its CUDA graphs. Its lifetime is explicit: a Sampler you make holds its own copies
of the weights as they are then (its tolerance was measured on them), so a change to the prior's
weights afterwards (an optimizer step, a load) does not reach it: make a new one. `release()` frees
the copies. `Prior.sample` and `Pipeline.generate` make one for the length of a call, during which
the weights cannot change, and let it run on the prior itself where the precision allows
(`copy_weights=False`). Nothing is kept on the prior.
"""
from __future__ import annotations

import dataclasses

import torch

from stage2_prior.conditioning import Context
from stage2_prior.decoding.guard import (GUARDED_DTYPES, canonical_logits, cast_copy, decide, measure_canonical_tolerance,
                                         measure_masked_tolerance, measure_tolerance)
from stage2_prior.decoding.options import SamplingOptions
from stage2_prior.decoding.steps import CachedSteps, NaiveSteps


class evaluation:
    """Eval mode and inference mode for the duration; the model's training mode comes back after.
    No global setting (cuDNN flags, TF32, grad mode) is changed."""

    def __init__(self, model) -> None:
        self.model = model
        self.inference = torch.inference_mode()

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc):
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)
        return False


@dataclasses.dataclass
class SamplingStats:
    """What a call cost, per sample and in all."""

    sequential_passes: torch.Tensor  # (B,) int64: network passes each sample waited for, one after another
    draws: int = 0  # codes decided (known codes of `complete` excluded)
    recomputed: int = 0  # draws decided again from canonical float64 logits (the exactness guard)


class Sampler:
    """See the module docstring. `options` are resolved for `model` (its default method filled in).
    `guarded=False` (beam search, which draws nothing) measures no tolerance; `copy_weights=False` runs on
    the prior itself where its dtype is the options' precision (for the length of one call)."""

    def __init__(self, model, options: SamplingOptions, guarded: bool = True, copy_weights: bool = True) -> None:
        self.model = model
        self.options = options.resolve(model)
        dtype = getattr(torch, self.options.precision)
        self.graph_pool: dict = {}  # method "graph": the chain inputs at fixed addresses
        with evaluation(model):
            self.compute = cast_copy(model, dtype, always=copy_weights)
            self._double = self.compute if dtype == torch.float64 else None
            self.tolerance = None  # bfloat16: no guard
            if guarded and dtype in GUARDED_DTYPES:
                if self.options.method == "rounds":
                    self.tolerance = measure_masked_tolerance(self.compute, self.double)
                elif self.compute is self.double and self.options.method in ("naive", "jacobi") and not self.options.window:
                    # the batched float64 forward against the canonical one: only float64 rounding differs
                    self.tolerance = measure_canonical_tolerance(self.double)
                else:  # before any state of a run exists: the probe's state may share fixed tensors ("graph")
                    path = "window" if self.options.window else self.options.method
                    self.tolerance = measure_tolerance(self.compute, self.double, path)
                self.tolerance *= 1 + 2 * self.options.guidance_scale
        self._canonical_tolerance: float | None = None
        self.recomputed = 0
        # the guidance scale at each raster position (N,) float64, after the schedule; None: unguided
        self.position_scales = None
        if self.options.guided and model.config.spec.family == "autoregressive":
            blocks = model.parallel_runs or [(position, 1) for position in range(model.config.num_positions)]
            factors = self.options.guidance_schedule.factors(len(blocks))
            self.position_scales = torch.cat([factors[index].expand(count) for index, (_, count) in enumerate(blocks)])
            self.position_scales = self.position_scales * self.options.guidance_scale

    def scale_at(self, positions: int | slice | torch.Tensor) -> float | torch.Tensor | None:
        """The guidance scale at raster positions (a number for one), or None when unguided."""
        if self.position_scales is None:
            return None
        if isinstance(positions, int):
            return float(self.position_scales[positions])
        return self.position_scales[positions]

    @property
    def double(self):
        """The float64 copy of the prior (made when first needed)."""
        if self._double is None:
            self._double = cast_copy(self.model, torch.float64)
        return self._double

    @property
    def canonical_tolerance(self) -> float:
        if self._canonical_tolerance is None:
            self._canonical_tolerance = measure_canonical_tolerance(self.double)
        return self._canonical_tolerance * (1 + 2 * self.options.guidance_scale)

    def release(self) -> None:
        """Free the copies and fixed tensors; the sampler cannot draw after this."""
        self.compute = self._double = None
        self.graph_pool.clear()

    def steps(self, context: Context, batch: int):
        """The logit source of the options' method for a batch of `batch` rows with `context`."""
        if self.options.method == "naive":
            return NaiveSteps(self.compute, context)
        return CachedSteps(self.compute, context, batch, self.options.method, self.graph_pool)

    def exact_codes(self, grids: torch.Tensor, context: Context, draws: torch.Tensor,
                    uniforms: torch.Tensor) -> torch.Tensor:
        """Codes (n,) of draws (n, 3) = (row, column, depth) of grids (n, h, w, D) at uniforms (n,), decided from
        canonical float64 logits: batched, then alone for those float64 rounding could still flip."""
        options = self.options
        self.recomputed += len(grids)
        width = self.model.config.latent_shape[1]
        scales = self.scale_at((draws[:, 0] * width + draws[:, 1]).cpu())  # (n,) or None
        if len(grids) == 1:
            unsure = torch.ones(1, dtype=torch.bool)
            codes = torch.zeros(1, dtype=torch.long, device=grids.device)
        else:
            logits = canonical_logits(self.double, grids, context, draws, options, alone=False, scales=scales)
            codes, unsure = decide(logits, uniforms, options, self.canonical_tolerance)
        for index in unsure.nonzero()[:, 0].tolist():
            alone = slice(index, index + 1)
            logits = canonical_logits(self.double, grids[alone], context.select(alone), draws[alone], options,
                                      alone=True, scales=None if scales is None else scales[alone])
            codes[index] = decide(logits, uniforms[alone], options, None)[0][0]
        return codes
