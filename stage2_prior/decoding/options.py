"""How codes are chosen: `SamplingOptions`, made and checked once at the entry point and passed down whole,
and the uniforms every draw comes from.

Sample k of a call is drawn from uniforms seeded by (seed, sample_offset + k) alone, one per code in
raster-then-stack order, so no sample depends on its batch, the method or the process count.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from shared.errors import UserError

PRECISIONS = ("float64", "float32", "bfloat16")
GUIDANCE_SCHEDULES = ("constant", "linear", "power:P", "interval:A:B")
CONFIDENCE_TEMPERATURE = 4.5  # MaskGIT's choice temperature: the confidence noise of the first round
# Every way a prior's codes can be drawn (the raster decoders, and "rounds" for masked priors); an arch offers those
# its parts allow (Prior.sampling_methods).
METHODS = ("cached", "naive", "compiled", "graph", "jacobi", "rounds")
SEED_STRIDE = 0x9E3779B97F4A7C15 % (2 ** 61)  # spreads (seed, index) pairs over generator seeds


@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
    """How the guidance scale s moves over a decoder's sequential steps, at progress t = step / (steps - 1)
    (raster archs: positions; VAR: scales; MaskGIT: rounds): "constant" s; "linear" s t (VAR ramps its scale
    over scales this way, Tian et al. 2024; MAR over tokens); "power:P" s t^P; "interval:A:B" s for t in
    [A, B] and 0 elsewhere (guidance on an interval, as LlamaGen's cfg_interval and Kynkaanniemi et al. 2024)."""

    kind: str = "constant"
    power: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def parse(cls, text: str) -> "GuidanceSchedule":
        name, *values = str(text).split(":")
        try:
            numbers = [float(value) for value in values]
        except ValueError:
            numbers = None
        if name == "constant" and not values:
            return cls()
        if name == "linear" and not values:
            return cls("power", 1.0)
        if name == "power" and numbers is not None and len(numbers) == 1 and numbers[0] > 0:
            return cls("power", numbers[0])
        if name == "interval" and numbers is not None and len(numbers) == 2 and 0 <= numbers[0] <= numbers[1] <= 1:
            return cls("interval", interval=(numbers[0], numbers[1]))
        raise UserError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)} (P > 0, 0 <= A <= B <= 1), "
                        f"got {text!r}")

    def factors(self, steps: int) -> torch.Tensor:
        """The share of the scale at each of `steps` sequential steps: (steps,) float64 in [0, 1]."""
        progress = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
        if self.kind == "power":
            return progress ** self.power
        if self.kind == "interval":
            low, high = self.interval
            return ((progress >= low) & (progress <= high)).double()
        return torch.ones(steps, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How each code is chosen from its logits, and how the logits are computed."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 0.0  # classifier-free guidance: cond + s * (cond - uncond)
    greedy: bool = False  # the most likely code (temperature 0)
    precision: str = "float64"  # the dtype the network runs in while sampling
    method: str | None = None  # None: the prior's default (its first sampling method)
    window: int | None = None  # method "jacobi": iterate over this many positions at a time, on the arch's cache
    guidance_schedule: GuidanceSchedule = GuidanceSchedule()  # how the guidance scale moves over the steps
    steps: int | None = None  # masked priors: rounds of parallel decoding (None: the prior's default)
    confidence_temperature: float = CONFIDENCE_TEMPERATURE  # masked priors: the first round's noise, annealed to 0

    @classmethod
    def build(cls, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
              guidance_scale: float = 0.0, strategy: str = "sample", precision: str = "float64",
              method: str | None = None, window: int | None = None, guidance_schedule: str = "constant",
              steps: int | None = None, confidence_temperature: float = CONFIDENCE_TEMPERATURE) -> "SamplingOptions":
        """Options from the user's values, checked (one-line UserErrors naming the fix)."""
        if strategy not in ("sample", "greedy"):
            raise UserError(f"strategy must be 'sample' or 'greedy', got {strategy!r} (beam search: "
                            "prior.beam_search(num_beams=...))")
        if not temperature >= 0 or math.isinf(temperature):
            raise UserError(f"temperature must be positive (or 0 for greedy), got {temperature}")
        greedy = strategy == "greedy" or temperature == 0
        if greedy and (top_k is not None or top_p is not None):
            raise UserError("greedy decoding (temperature=0) takes the most likely code: drop top_k and top_p")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise UserError(f"top_k must be an integer of at least 1 (or None), got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise UserError(f"top_p must lie in (0, 1] (or None), got {top_p}")
        if not guidance_scale >= 0 or math.isinf(guidance_scale):
            raise UserError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if method is not None and method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise UserError(f"window must be an integer of at least 1 (positions per Jacobi window), got {window!r}")
            if method != "jacobi":
                used = "the default method" if method is None else f"method={method!r}"
                raise UserError(f"a window is a setting of method='jacobi' (windowed Jacobi decoding), not of "
                                f"{used}: pass method='jacobi' or drop the window")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise UserError(f"steps must be an integer of at least 1 (rounds of a masked prior), got {steps!r}")
        if guidance_schedule != "constant" and guidance_scale == 0:
            raise UserError(f"a guidance schedule needs --guidance-scale (guidance_scale > 0): it moves that scale over "
                            f"the steps; pass one or drop guidance_schedule {guidance_schedule!r}")
        if not confidence_temperature >= 0 or math.isinf(confidence_temperature):
            raise UserError(f"confidence_temperature must be >= 0, got {confidence_temperature}")
        return cls(1.0 if greedy else temperature, top_k, top_p, guidance_scale, greedy, precision, method, window,
                   GuidanceSchedule.parse(guidance_schedule), steps, confidence_temperature)

    def resolve(self, model) -> "SamplingOptions":
        """These options for `model`, its default method (and a masked prior's default steps) filled in:
        UserError for what it cannot do."""
        methods = model.sampling_methods
        method = self.method or methods[0]
        steps = self.steps
        if model.config.spec.family == "masked":
            steps = steps or min(model.default_steps, model.config.num_positions)
            if steps > model.config.num_positions:
                raise UserError(f"steps {steps} is more rounds than the {model.config.num_positions} positions to fill; "
                                f"pass steps between 1 and {model.config.num_positions}")
        elif steps is not None or self.confidence_temperature != CONFIDENCE_TEMPERATURE:
            raise UserError(f"steps and confidence_temperature are settings of masked priors (rounds of parallel "
                            f"decoding); arch {model.config.arch!r} draws its codes in order: drop them")
        if method not in methods:
            what = {"cached": "cached sampler", "compiled": "compiled step", "graph": "compiled step"}.get(method, method)
            raise UserError(f"arch {model.config.arch!r} has no {what}; its methods are {', '.join(methods)}")
        if self.window is not None and not (model.state_class() and model.state_class().has_window()):
            raise UserError(f"arch {model.config.arch!r} has no windowed step (it needs its cache to compute several "
                            "positions at once); use method='jacobi' without a window")
        if method == "graph" and model.device.type != "cuda":
            raise UserError("method='graph' captures the per-position step in a CUDA graph and needs the model on a "
                            "CUDA device; on this machine use method='cached'")
        config = model.config
        if self.guidance_scale > 0 and config.null_class is None and not config.caption_dropout:
            if config.num_classes is None and config.text_encoder is None:
                raise UserError("guidance_scale needs a class- or text-conditional prior; this one is unconditional: "
                                "pass guidance_scale=0")
            dropout = "--label-dropout 0.1" if config.text_encoder is None else "--caption-dropout 0.1"
            raise UserError(f"this prior was trained without {dropout.split()[0][2:].replace('-', ' ')}, so it has "
                            f"no unconditional branch for guidance: pass guidance_scale=0, or train with {dropout}")
        return dataclasses.replace(self, method=method, steps=steps)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 0


def check_num_beams(num_beams, method: str | None = None) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if method == "jacobi":
        raise UserError("beam search keeps partial grids in raster order, and method='jacobi' draws every code at "
                        "once: use method 'cached' or 'naive' for beam search, or sample without num_beams")


def check_num_samples(num_samples, name: str = "the number of samples") -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"{name} must be an integer of at least 1, got {num_samples!r}")


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """`seed`, or one drawn from `generator` (the global generator when None, which this draw advances)."""
    if seed is not None:
        return seed
    return int(torch.randint(0, 2 ** 62, (), generator=generator))


def sample_uniforms(seed: int, first_index: int, num_samples: int, num_draws: int) -> torch.Tensor:
    """Uniforms (num_samples, num_draws) in float64: row k comes from (seed, first_index + k) alone."""
    rows = []
    for index in range(first_index, first_index + num_samples):
        generator = torch.Generator().manual_seed((seed * SEED_STRIDE + index) % (2 ** 63))
        rows.append(torch.rand(num_draws, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, num_draws, dtype=torch.float64)


# The keyword arguments of the sampling entry points that build a SamplingOptions, with their defaults.
SAMPLING_KEYWORDS = dict(temperature=1.0, top_k=None, top_p=None, guidance_scale=0.0, strategy="sample",
                         precision="float64", method=None, window=None, guidance_schedule="constant", steps=None,
                         confidence_temperature=CONFIDENCE_TEMPERATURE)


def sampling_options(options: SamplingOptions | None, **keywords: Any) -> SamplingOptions:
    """`options`, or the options the sampling keywords describe (not both), their values checked; a
    `Sampler` checks them against a prior."""
    if options is None:
        return SamplingOptions.build(**keywords)
    changed = [name for name, value in keywords.items() if value != SAMPLING_KEYWORDS[name]]
    if changed:
        raise UserError(f"pass either options or the sampling keywords, not both (got {', '.join(changed)})")
    return options
