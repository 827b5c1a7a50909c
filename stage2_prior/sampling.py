"""The one sampling loop, shared by every prior arch.

Codes are drawn in raster order, then through each position's stack. Entry (p, d) of sample k is the
inverse CDF of the (filtered) distribution at a uniform u[k, p * D + d] from a generator seeded by
(seed, k), so any batch split or process count draws the same codes. Two ways give the logits:
- "naive": one full forward of the network per code (the reference);
- "cached": the arch's incremental state (`Prior.start` / `Prior.step_features`), e.g. the Gated
  PixelCNN's per-row vertical stack and per-position horizontal stack, or a transformer's KV cache.

Exactness. The two ways compute logits that differ by rounding, and batch size changes rounding too.
A draw can only come out differently when a rounding error could move a CDF boundary (or a top-k /
top-p cut, or a greedy tie) across the uniform. So every decision is made from the computed logits
unless the uniform lies within a bound of such a boundary; the bound is the error that
`logit_tolerance` measures for this model (times a safety factor). Those draws are decided again
from float64 logits that a canonical computation gives: one full forward of that sample alone, in
float64, over the rows up to the position, with everything after it zeroed. That computation does
not depend on the method, the batch or the process, so every run makes the same decision; the tests
check the bound at trained scale.

Precision. By default the network runs in float64 while sampling. In float32 a trained-scale prior
(logit spread about 6) has logit errors near 5e-4, which puts 1-6% of draws within reach of a
boundary, each needing the canonical recomputation; in float64 that happens about once per 10^9
draws. `precision="float32"` gives the same codes, faster where recomputations are rare (small or
untrained models, large batches on a GPU). `precision="bfloat16"` is for speed on a GPU and promises
no exactness: its logit errors (about 1e-2 relative) would send most draws to the recomputation, so
it draws straight from its own logits, and the codes may differ between methods and batch sizes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from shared.errors import UserError

SEED_STRIDE = 0x9E3779B97F4A7C15 % (2 ** 61)  # spreads (seed, index) pairs over generator seeds
SAFETY = 8.0  # the tolerance is this many times the largest float32 error measured on probe grids
METHODS = ("cached", "naive", "compiled", "graph")
EDGE_OFFSETS = torch.tensor([0, 1])  # a drawn code's lower and upper CDF edge in the zero-padded CDF
EDGE_SIGNS = torch.tensor([-1.0, 1.0])  # the target lies above the lower edge and below the upper one
PRECISIONS = ("float64", "float32", "bfloat16")
GUARDED_DTYPES = (torch.float64, torch.float32)  # bfloat16: no exactness promised, no float64 recomputation


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How each code is chosen from its logits."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 0.0  # classifier-free guidance: cond + s * (cond - uncond)
    greedy: bool = False  # the most likely code (temperature 0)
    precision: str = "float64"  # the dtype the network runs in while sampling

    @classmethod
    def build(cls, temperature: float, top_k: int | None, top_p: float | None, guidance_scale: float,
              strategy: str, precision: str = "float64") -> "SamplingOptions":
        if strategy not in ("sample", "greedy"):
            raise UserError(f"strategy must be 'sample' or 'greedy', got {strategy!r} (beam search: "
                            "prior.beam_search(num_beams=...))")
        if not temperature >= 0 or math.isinf(temperature):
            raise UserError(f"temperature must be positive (or 0 for greedy), got {temperature}")
        greedy = strategy == "greedy" or temperature == 0
        if greedy and (top_k is not None or top_p is not None):
            raise UserError("greedy decoding (temperature=0) takes the most likely code: drop top_k and top_p")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k must be at least 1 (or None), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise UserError(f"top_p must lie in (0, 1] (or None), got {top_p}")
        if not guidance_scale >= 0 or math.isinf(guidance_scale):
            raise UserError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        return cls(1.0 if greedy else temperature, top_k, top_p, guidance_scale, greedy, precision)

    def check_for(self, model) -> None:
        if self.guidance_scale > 0:
            if model.config.num_classes is None:
                raise UserError("guidance_scale needs a class-conditional prior; this one is unconditional: "
                                "pass guidance_scale=0")
            if model.config.null_class is None:
                raise UserError("this prior was trained without label dropout, so it has no unconditional "
                                "branch for guidance: pass guidance_scale=0, or train with --label-dropout 0.1")


def sample_uniforms(seed: int, first_index: int, num_samples: int, num_draws: int) -> torch.Tensor:
    """Uniforms (num_samples, num_draws) in float64: row k comes from (seed, first_index + k) alone."""
    rows = []
    for index in range(first_index, first_index + num_samples):
        generator = torch.Generator().manual_seed((seed * SEED_STRIDE + index) % (2 ** 63))
        rows.append(torch.rand(num_draws, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, num_draws, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# One decision: a code from logits, and whether float32 error could have changed it
# ------------------------------------------------------------------------------------------------

def decide(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions,
           tolerance: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (B,) from logits (B, V) by inverse CDF at uniforms (B,) after temperature, top-k and
    top-p (or the argmax when greedy); and, with `tolerance` (the largest error of a logit), which
    decisions an error that large could have flipped (B,) bool."""
    scores = logits.double()
    vocab = scores.shape[-1]
    check = tolerance is not None
    unsure = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device) if check else None
    if options.greedy:
        codes = scores.argmax(-1)
        if check and vocab > 1:
            best_two = scores.topk(2, dim=-1).values
            unsure |= best_two[:, 0] - best_two[:, 1] <= 2 * tolerance
        return codes, unsure
    if options.temperature != 1:
        scores = scores / options.temperature
    error = (tolerance or 0.0) / options.temperature  # bound on the error of each scaled logit
    relative = 2.0 * math.expm1(2.0 * error)  # bound on the relative error of a probability (with a margin)
    if options.top_k is not None and options.top_k < vocab:
        ranked = scores.topk(options.top_k + 1, dim=-1).values  # (B, k + 1)
        kth = ranked[:, options.top_k - 1:options.top_k]
        scores = scores.masked_fill(scores < kth, float("-inf"))
        if check:
            unsure |= ranked[:, options.top_k - 1] - ranked[:, options.top_k] <= 2 * error
    probabilities = torch.softmax(scores, dim=-1)  # (B, V)
    if options.top_p is not None and options.top_p < 1:
        ranked, order = probabilities.sort(dim=-1, descending=True)
        before = ranked.cumsum(dim=-1) - ranked  # mass of the codes ranked above each
        keep = before < options.top_p  # the smallest set reaching top_p
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, ranked.masked_fill(~keep, 0.0))
        if check:
            last = keep.sum(-1, keepdim=True) - 1  # (B, 1) rank of the last kept code
            following = (last + 1).clamp_max(vocab - 1)
            margin = relative + 1e-12
            unsure |= (options.top_p - before.gather(-1, last)[:, 0]) <= margin
            has_next = (last[:, 0] + 1) < vocab
            unsure |= has_next & ((before.gather(-1, following)[:, 0] - options.top_p) <= margin)
            gap = ranked.gather(-1, last)[:, 0] - ranked.gather(-1, following)[:, 0]
            unsure |= has_next & (gap <= relative * ranked.gather(-1, last)[:, 0])
    cumulative = probabilities.cumsum(dim=-1)  # (B, V)
    total = cumulative[:, -1]
    targets = uniforms.to(cumulative) * total
    codes = torch.searchsorted(cumulative, targets[:, None], right=True).squeeze(1).clamp_max(vocab - 1)
    if check:
        # the CDF just below and at the drawn code, (B, 2); a column of zeros in front gives code 0's lower edge
        edges = F.pad(cumulative, (1, 0)).gather(-1, codes[:, None] + EDGE_OFFSETS.to(codes.device))
        distances = (edges - targets[:, None]) * EDGE_SIGNS.to(edges)  # (B, 2): how far inside each edge
        # a CDF value F moves by at most relative * min(F, total - F) when every logit moves by `error`
        bounds = relative * torch.minimum(edges, total[:, None] - edges) + 1e-12
        unsure |= (distances <= bounds).any(-1)
    return codes, unsure


# ------------------------------------------------------------------------------------------------
# Logits for one code: naive, cached, and the canonical float64 recomputation
# ------------------------------------------------------------------------------------------------

class NaiveSteps:
    """The reference: one full forward of the network per code."""

    def __init__(self, model, labels: torch.Tensor | None, condition: torch.Tensor | None) -> None:
        self.model, self.labels, self.condition = model, labels, condition

    def logits(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        model = self.model
        features = model.features(codes, self.labels, self.condition)
        return model.head_logits(features, codes)[:, :, row, column, depth]  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        self.labels = None if self.labels is None else self.labels[index]
        self.condition = None if self.condition is None else self.condition[index]


class CachedSteps:
    """The arch's incremental state: features at one position from what earlier positions left behind.
    Methods "compiled" and "graph" run the arch's per-position step compiled (CUDA graphs for "graph")."""

    def __init__(self, model, labels: torch.Tensor | None, condition: torch.Tensor | None, batch: int,
                 method: str = "cached") -> None:
        self.model = model
        self.state = model.start(batch, labels, condition)
        if method in ("compiled", "graph"):
            model.compile_steps(self.state, method)
        self.features: torch.Tensor | None = None

    def logits(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        model = self.model
        if depth == 0 or model.config.channel_groups > 1:
            self.features = model.step_features(self.state, codes, row, column, depth)  # (B, C)
        return model.head_step(self.features, codes[:, row, column], depth)  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        self.state.reorder(index)
        self.features = None if self.features is None else self.features[index]


def make_steps(model, method: str, labels, condition, batch: int):
    if method == "naive":
        return NaiveSteps(model, labels, condition)
    return CachedSteps(model, labels, condition, batch, method)


class Exact:
    """Float64 logits of one sample at one code, computed the same way by every sampler (see the module
    docstring), and the float32 error bound that decides when they are needed."""

    def __init__(self, model) -> None:
        self.model = model
        self._double = None

    @property
    def double(self):
        if self._double is None:
            self._double = float64_copy(self.model)
        return self._double

    def logits(self, codes: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None,
               row: int, column: int, depth: int, options: SamplingOptions) -> torch.Tensor:
        """Codes (1, h, w, D) with everything before (row, column, depth) drawn -> guided logits (1, V) float64."""
        model = self.double
        prefix = codes[:, :row + 1].clone()
        prefix[:, row, column, depth:] = 0
        prefix[:, row, column + 1:] = 0
        condition = None if condition is None else condition.to(model.device)
        labels_list = [labels]
        if options.guidance_scale > 0:
            labels_list.append(torch.full_like(labels, model.config.null_class))
        outputs = []
        for these_labels in labels_list:
            features = model.features(prefix, these_labels, condition)
            outputs.append(model.head_logits(features, prefix)[:, :, row, column, depth])
        return guided(outputs, options.guidance_scale)


def float64_copy(model):
    return cast_copy(model, torch.float64)


def cast_copy(model, dtype: torch.dtype):
    """`model` itself if it has `dtype`, else a copy in `dtype` (same weights, eval mode), kept on the
    model until its weights change."""
    if next(model.parameters()).dtype == dtype:
        return model
    key = weights_key(model)
    cached = model.__dict__.get(f"_copy_{dtype}")
    if cached is not None and cached[0] == key:
        return cached[1]
    # a normal (not inference-mode) copy, whose initialisation does not move the caller's RNG stream
    with torch.inference_mode(False), torch.no_grad(), torch.random.fork_rng(devices=[]):
        copy = type(model)(model.config)
        copy.load_state_dict({name: tensor.clone() for name, tensor in model.state_dict().items()})
        copy = copy.to(device=model.device, dtype=dtype).eval()
    model.__dict__[f"_copy_{dtype}"] = (key, copy)
    return copy


def weights_key(model) -> tuple:
    return tuple((tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version, tensor.dtype)
                 for tensor in model.state_dict().values())


def logit_tolerance(model, method: str) -> float:
    """SAFETY x the largest difference between this model's logits and float64 logits on probe grids:
    the full forward on two random grids, and (method "cached") the cached steps on their first rows."""
    with evaluation(model):
        return _logit_tolerance(model, method)


def _logit_tolerance(model, method: str) -> float:
    key = (weights_key(model), method, torch.are_deterministic_algorithms_enabled(),
           torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    cached = model.__dict__.get("_tolerance")
    if cached is not None and cached[0] == key:
        return cached[1]
    config = model.config
    generator = torch.Generator().manual_seed(0)
    height, width = config.latent_shape
    codes = torch.randint(0, config.vocab_size, (2, height, width, config.depth), generator=generator)
    codes = codes.to(model.device)
    labels = (torch.arange(2, device=model.device) % config.num_classes if config.num_classes else None)
    condition = None
    if config.condition_shape is not None:
        shape = tuple(config.condition_shape)
        shape = shape[:2] if len(shape) == 3 and shape[2] == 1 else shape
        condition = torch.randint(0, config.condition_vocab_size, (2, *shape), generator=generator).to(model.device)
    double = float64_copy(model)
    reference = double.head_logits(double.features(codes, labels, condition), codes)  # (2, V, h, w, D)
    full = model.head_logits(model.features(codes, labels, condition), codes).double()
    error = (full - reference).abs().max().item()
    if method != "naive" and model.cached_sampling:
        steps = CachedSteps(model, labels, condition, 2, method)
        positions = min(height * width, max(2 * width, 16))
        for position in range(positions):
            row, column = divmod(position, width)
            for depth in range(config.depth):
                logits = steps.logits(codes, row, column, depth).double()
                error = max(error, (logits - reference[:, :, row, column, depth]).abs().max().item())
    dtype = next(model.parameters()).dtype
    scale = max(1.0, reference.abs().max().item())
    if dtype in (torch.float32, torch.float64) and error > 1e-3 * scale:
        # rounding in float32 stays orders of magnitude below this: the incremental computation is wrong
        raise RuntimeError(f"the {method} logits of arch {config.arch!r} differ from the full forward by {error:.3g}: "
                           "a bug in its incremental state, please report it")
    tolerance = SAFETY * error + 64 * torch.finfo(dtype).eps * scale
    model.__dict__["_tolerance"] = (key, tolerance)
    return tolerance


def guided(logits: list[torch.Tensor], scale: float) -> torch.Tensor:
    """cond, or cond + s * (cond - uncond) with classifier-free guidance (Ho & Salimans 2022, eq. 6)."""
    if len(logits) == 1:
        return logits[0]
    cond, uncond = logits
    return cond + scale * (cond - uncond)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def check_method(model, method: str | None) -> str:
    method = method or ("cached" if model.cached_sampling else "naive")
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "naive" and not model.cached_sampling:
        raise UserError(f"arch {model.config.arch!r} has no cached sampler; use method='naive'")
    if method == "graph" and model.device.type != "cuda":
        raise UserError("method='graph' captures the per-position step in a CUDA graph and needs the model on a "
                        "CUDA device; on this machine use method='cached'")
    return method


def sample_codes(model, num_samples: int, labels, condition, options: SamplingOptions,
                 generator: torch.Generator | None, method: str | None, seed: int | None, sample_offset: int,
                 known_codes: torch.Tensor | None = None, known_mask: torch.Tensor | None = None) -> torch.Tensor:
    """See `Prior.sample` and `Prior.complete`."""
    if num_samples < 1:
        raise UserError(f"the number of samples must be at least 1, got {num_samples}")
    method = check_method(model, method)
    options.check_for(model)
    labels = model.check_labels(labels, num_samples)
    condition = model.check_condition(condition, num_samples)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
    config = model.config
    height, width = config.latent_shape
    uniforms = sample_uniforms(seed, sample_offset, num_samples, height * width * config.depth)
    device = model.device
    shape = (num_samples, *model.code_shape)
    if known_codes is None:
        known_codes = torch.zeros(shape, dtype=torch.long, device=device)
        known_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    with evaluation(model):
        compute = cast_copy(model, getattr(torch, options.precision))
        codes = run(compute, method, labels, condition, uniforms, model.stacked(known_codes.to(device).long()),
                    model.stacked(known_mask.to(device)), options)
    return model.public(codes)


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


def run(model, method: str, labels, condition, uniforms: torch.Tensor, known: torch.Tensor, known_mask: torch.Tensor,
        options: SamplingOptions, on_logits: Callable[[int, int, int, torch.Tensor], None] | None = None
        ) -> torch.Tensor:
    """Stacked codes (B, h, w, D): known ones kept, the rest drawn in order. `on_logits(row, column,
    depth, logits)` sees the logits of every draw (the tests compare them with the full forward)."""
    config = model.config
    batch, height, width, depth_count = known.shape
    guidance = options.guidance_scale > 0
    net_labels, net_condition = labels, condition
    if guidance:  # the conditional and unconditional branches share one cached state of 2B rows
        net_labels = torch.cat([labels, torch.full_like(labels, config.null_class)])
        net_condition = None if condition is None else torch.cat([condition, condition])
    tolerance = None  # bfloat16: no guard
    if next(model.parameters()).dtype in GUARDED_DTYPES:
        # before this run's state exists: the probe's state may share its fixed tensors (method "graph")
        tolerance = logit_tolerance(model, method) * (1 + 2 * options.guidance_scale)
    steps = make_steps(model, method, net_labels, net_condition, batch * (2 if guidance else 1))
    exact = Exact(model)
    codes = known.clone()
    net_codes = torch.cat([codes, codes]) if guidance else codes
    uniforms = uniforms.to(known.device)
    any_known = bool(known_mask.any())
    for row in range(height):
        for column in range(width):
            for depth in range(depth_count):
                logits = steps.logits(net_codes, row, column, depth)  # (B or 2B, V)
                logits = guided(list(logits.chunk(2)) if guidance else [logits], options.guidance_scale)
                if on_logits is not None:
                    on_logits(row, column, depth, logits)
                draw_index = (row * width + column) * depth_count + depth
                drawn, unsure = decide(logits, uniforms[:, draw_index], options, tolerance)
                for sample in [] if unsure is None else unsure.nonzero()[:, 0].tolist():
                    exact_logits = exact.logits(codes[sample:sample + 1], None if labels is None else
                                                labels[sample:sample + 1], None if condition is None else
                                                condition[sample:sample + 1], row, column, depth, options)
                    drawn[sample] = decide(exact_logits, uniforms[sample:sample + 1, draw_index], options, None)[0][0]
                chosen = drawn
                if any_known:
                    chosen = torch.where(known_mask[:, row, column, depth], codes[:, row, column, depth], drawn)
                codes[:, row, column, depth] = chosen
                if guidance:
                    net_codes[:, row, column, depth] = torch.cat([chosen, chosen])
    return codes


def check_num_beams(num_beams) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"num_beams must be an integer >= 1, got {num_beams!r}")


def beam_search(model, num_samples: int, labels, condition, num_beams: int, guidance_scale: float,
                method: str | None, precision: str = "float64"):
    """See `Prior.beam_search`."""
    from stage2_prior.prior import BeamSearchOutput

    check_num_beams(num_beams)
    if num_samples < 1:
        raise UserError(f"the number of samples must be at least 1, got {num_samples}")
    method = check_method(model, method)
    options = SamplingOptions.build(1.0, None, None, guidance_scale, "sample", precision)
    options.check_for(model)
    labels = model.check_labels(labels, num_samples)
    condition = model.check_condition(condition, num_samples)
    config = model.config
    height, width = config.latent_shape
    device = model.device
    rows = num_samples * num_beams
    beam_labels = None if labels is None else labels.repeat_interleave(num_beams)
    beam_condition = None if condition is None else condition.repeat_interleave(num_beams, dim=0)
    with evaluation(model):
        compute = cast_copy(model, getattr(torch, precision))
        guidance = guidance_scale > 0
        net_labels, net_condition = beam_labels, beam_condition
        if guidance:
            net_labels = torch.cat([beam_labels, torch.full_like(beam_labels, config.null_class)])
            net_condition = None if beam_condition is None else torch.cat([beam_condition, beam_condition])
        steps = make_steps(compute, method, net_labels, net_condition, rows * (2 if guidance else 1))
        codes = torch.zeros(rows, height, width, config.depth, dtype=torch.long, device=device)
        scores = torch.full((num_samples, num_beams), float("-inf"), dtype=torch.float64, device=device)
        scores[:, 0] = 0.0  # one live beam at first, so the beams never duplicate each other
        for row in range(height):
            for column in range(width):
                for depth in range(config.depth):
                    net_codes = torch.cat([codes, codes]) if guidance else codes
                    logits = steps.logits(net_codes, row, column, depth)
                    logits = guided(list(logits.chunk(2)) if guidance else [logits], guidance_scale)
                    log_probs = F.log_softmax(logits.double(), dim=-1).view(num_samples, num_beams, -1)
                    candidates = (scores[:, :, None] + log_probs).flatten(1)  # (n, beams * V)
                    scores, chosen = candidates.topk(num_beams, dim=-1)  # (n, beams)
                    beam = chosen // config.vocab_size
                    source = (torch.arange(num_samples, device=device)[:, None] * num_beams + beam).flatten()
                    codes = codes[source]
                    codes[:, row, column, depth] = (chosen % config.vocab_size).flatten()
                    steps.reorder(torch.cat([source, source + rows]) if guidance else source)
        best = scores.argmax(-1)  # (n,)
        winners = codes.view(num_samples, num_beams, *codes.shape[1:])[torch.arange(num_samples, device=device), best]
    winners = model.public(winners)
    return BeamSearchOutput(winners, model.log_prob(winners, labels, condition))
