"""The exactness guard: one decision from logits, and when float error could have changed it.

Every method computes logits that differ from the full forward's by rounding, and batch size changes
rounding too. A draw can only come out differently when an error that large could move a CDF boundary
(or a top-k / top-p cut, or a greedy tie) across its uniform. So each decision is made from the
computed logits unless its uniform lies within the bound of such a boundary; the bound comes from
`measure_tolerance`, the largest error of this model's logits on probe grids times SAFETY. Those
draws are decided again from float64 logits of a canonical computation (`canonical_logits`): the
full forward of that sample's rows up to the draw, with every code at or after it zeroed, in float64.
It does not depend on the method, the batch or the process, so every run makes the same decision.
Recomputations are batched; a batched decision that float64 rounding alone could flip is recomputed
for that sample alone, the computation every release has used.

The bounds (`decide`): with every logit off by at most e, a probability ratio moves by at most a
factor exp(2e) and the odds S / (1 - S) of a partial sum S of probabilities by the same factor, so S
moves by at most expm1(2e) S (1 - S). The guard flags a draw within twice that of a boundary.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from stage2_prior.conditioning import Context, encode_prompts
from stage2_prior.decoding.options import SamplingOptions
from stage2_prior.decoding.steps import CachedSteps

SAFETY = 8.0  # the tolerance is this many times the largest error measured on probe grids
GUARDED_DTYPES = (torch.float64, torch.float32)  # bfloat16: no exactness promised, no float64 recomputation
EDGE_OFFSETS = torch.tensor([0, 1])  # a drawn code's lower and upper CDF edge in the zero-padded CDF
EDGE_SIGNS = torch.tensor([-1.0, 1.0])  # the target lies above the lower edge and below the upper one
ABSOLUTE_MARGIN = 1e-12  # float64 rounding of the sums themselves


def decide(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions,
           tolerance: float | None, with_log_probs: bool = False) -> tuple[torch.Tensor, ...]:
    """Codes (B,) from logits (B, V) by inverse CDF at uniforms (B,) after temperature, top-k and
    top-p (or the argmax when greedy); and, with `tolerance` (a bound on the error of each logit),
    which decisions an error that large could have flipped (B,) bool. `with_log_probs` adds each drawn
    code's log-probability (B,) float64 under the distribution it was drawn from (greedy: the softmax)."""
    scores = logits.double()
    vocab = scores.shape[-1]
    check = tolerance is not None
    unsure = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device) if check else None
    if options.greedy:
        codes = scores.argmax(-1)
        if check and vocab > 1:
            best_two = scores.topk(2, dim=-1).values
            unsure |= best_two[:, 0] - best_two[:, 1] <= 2 * tolerance
        if with_log_probs:
            return codes, unsure, F.log_softmax(scores, dim=-1).gather(-1, codes[:, None])[:, 0]
        return codes, unsure
    if options.temperature != 1:
        scores = scores / options.temperature
    error = (tolerance or 0.0) / options.temperature  # bound on the error of each scaled logit
    margin = 2.0 * math.expm1(2.0 * error)  # twice the factor by which odds can move (module docstring)
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
            has_next = (last[:, 0] + 1) < vocab
            kept_mass, next_mass = before.gather(-1, last)[:, 0], before.gather(-1, following)[:, 0]
            # the last kept code could drop out, or the next one come in, if the mass before it crossed top_p
            unsure |= options.top_p - kept_mass <= margin * kept_mass * (1 - kept_mass) + ABSOLUTE_MARGIN
            unsure |= has_next & (next_mass - options.top_p <= margin * next_mass * (1 - next_mass) + ABSOLUTE_MARGIN)
            # or the two could trade places: their logits within 2e of each other (a factor 2 to spare)
            unsure |= has_next & (ranked.gather(-1, last)[:, 0] <= ranked.gather(-1, following)[:, 0]
                                  * math.exp(4.0 * error))
    cumulative = probabilities.cumsum(dim=-1)  # (B, V)
    total = cumulative[:, -1]
    targets = uniforms.to(cumulative) * total
    codes = torch.searchsorted(cumulative, targets[:, None], right=True).squeeze(1).clamp_max(vocab - 1)
    if check:
        # the CDF just below and at the drawn code, (B, 2); a column of zeros in front gives code 0's lower edge
        edges = F.pad(cumulative, (1, 0)).gather(-1, codes[:, None] + EDGE_OFFSETS.to(codes.device))
        distances = (edges - targets[:, None]) * EDGE_SIGNS.to(edges)  # (B, 2): how far inside each edge
        bounds = margin * edges * (total[:, None] - edges) / total[:, None] + ABSOLUTE_MARGIN
        unsure |= (distances <= bounds).any(-1)
    if with_log_probs:
        return codes, unsure, torch.log(probabilities.gather(-1, codes[:, None])[:, 0] / total)
    return codes, unsure


def guided(logits: list[torch.Tensor], scale: float) -> torch.Tensor:
    """cond, or cond + s * (cond - uncond) with classifier-free guidance (Ho & Salimans 2022, eq. 6)."""
    if len(logits) == 1:
        return logits[0]
    cond, uncond = logits
    return cond + scale * (cond - uncond)


def guided_rows(logits: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """Logits of a guided batch (2B, ...): its first half conditional, its second unconditional -> (B, ...)
    at `scale` (a number, or a tensor broadcasting against the halves: one per row or position). None: an
    unguided batch, returned as it is."""
    return logits if scale is None else guided(list(logits.chunk(2)), scale)


def cast_copy(model, dtype: torch.dtype, always: bool = False):
    """A copy of `model` in `dtype` (same weights, eval mode), or `model` itself if it has `dtype` and not
    `always`. Nothing is kept on the model: a copy lives as long as whoever asked for it holds it."""
    if next(model.parameters()).dtype == dtype and not always:
        return model
    with torch.inference_mode(False), torch.no_grad():  # a normal (not inference-mode) copy
        twin = copy.deepcopy(model)
        for parameter in twin.parameters():
            parameter.grad = None
        return twin.to(dtype=dtype).eval()


def probe(model, count: int = 2) -> tuple[torch.Tensor, Context]:
    """Fixed random grids (count, h, w, D) and their conditions, for measuring errors."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    height, width = config.latent_shape
    codes = torch.randint(0, config.vocab_size, (count, height, width, config.depth), generator=generator)
    labels = torch.arange(count) % config.num_classes if config.num_classes else None
    code_map = None
    if config.condition_grid is not None:
        code_map = torch.randint(0, config.condition_vocab_size, (count, *config.condition_grid), generator=generator)
    text = None
    if config.text_encoder is not None:  # captions of different lengths, the null one among them
        text = encode_prompts(config, [("a probe caption " * (k + 1)).strip() if k % 3 else None for k in range(count)],
                              warn_truncated=False)
    device = model.device
    return codes.to(device), Context(*(None if value is None else value.to(device) for value in (labels, code_map, text)))


def measure_tolerance(model, double, method: str) -> float:
    """SAFETY x the largest difference between `model`'s logits and `double`'s (its float64 copy) on probe
    grids: the full forward on two grids (unless `model` is `double`), and for the cached methods the cached
    steps over the first rows, against `double`'s forward of those rows."""
    config = model.config
    codes, context = probe(model)
    height, width = config.latent_shape
    error, scale = 0.0, 1.0
    if model is not double:
        reference = double.stack_logits(codes, double.conditioning(context))  # (2, h, w, D, V)
        error = (model.stack_logits(codes, model.conditioning(context)).double() - reference).abs().max().item()
        scale = max(scale, reference.abs().max().item())
    if method in ("cached", "compiled", "graph"):
        positions = min(height * width, max(2 * width, 16))
        rows = -(-positions // width)
        reference = double.stack_logits(codes[:, :rows], double.conditioning(context, rows))  # (2, rows, w, D, V)
        scale = max(scale, reference.abs().max().item())
        steps = CachedSteps(model, context, 2, method, {})
        for position in range(positions):
            row, column = divmod(position, width)
            for depth in range(config.depth):
                logits = steps.logits(codes, row, column, depth).double()
                error = max(error, (logits - reference[:, row, column, depth]).abs().max().item())
    if method == "window":
        window, window_scale = window_error(model, double, codes, context)
        error, scale = max(error, window), max(scale, window_scale)
    if error > 1e-3 * scale:
        # rounding in float32 stays orders of magnitude below this: the incremental computation is wrong
        raise RuntimeError(f"the {method} logits of arch {config.arch!r} differ from the full forward by {error:.3g}: "
                           "a bug in its incremental state, please report it")
    dtype = next(model.parameters()).dtype
    return SAFETY * error + 64 * torch.finfo(dtype).eps * scale


def window_error(model, double, codes: torch.Tensor, context: Context, count: int = 4) -> tuple[float, float]:
    """The largest difference between `model`'s windowed logits (`IncrementalState.window`, windows of
    `count` positions slid over the first rows, committed as they go) and `double`'s full forward, and
    the largest of those logits."""
    height, width = model.config.latent_shape
    positions = min(height * width, max(2 * width, 16))
    rows = -(-positions // width)
    reference = double.stack_logits(codes[:, :rows], double.conditioning(context, rows)).flatten(1, 2)  # (2, P, D, V)
    state = model.start(len(codes), model.conditioning(context))
    error = 0.0
    for start in range(0, positions, count):
        size = min(count, positions - start)
        features = state.window(codes, start, size)  # (2, n, C)
        logits = model.head(features, codes.flatten(1, 2)[:, start:start + size])  # (2, n, D, V)
        error = max(error, (logits.double() - reference[:, start:start + size]).abs().max().item())
        state.commit(codes, start, size)
    return error, max(1.0, reference.abs().max().item())


def prefixes(grids: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Grids (n, h, w, D) cut to the rows up to the lowest draw, with every code at or after each grid's
    draw (n, 3) = (row, column, depth) zeroed: (n, max row + 1, w, D)."""
    rows = int(draws[:, 0].max()) + 1
    _, _, width, depth = grids.shape
    cut = grids[:, :rows].clone()
    index = torch.arange(rows * width * depth, device=grids.device).view(1, rows, width, depth)
    draw_index = ((draws[:, 0] * width + draws[:, 1]) * depth + draws[:, 2]).view(-1, 1, 1, 1)
    return cut.masked_fill(index >= draw_index.to(grids.device), 0)


def canonical_logits(double, grids: torch.Tensor, context: Context, draws: torch.Tensor,
                     options: SamplingOptions, alone: bool, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 guided logits (n, V) of grid i (n, h, w, D) at draw i (n, 3), from its prefix (`prefixes`),
    guided at `scales` (n,) (the schedule's scale at each draw; None: unguided). `alone`: n is 1 and each
    guidance branch is its own forward over the rows up to the draw (the canonical computation itself); else
    one forward of every grid and branch together."""
    net_context = context.guided(double.config) if options.guided else context
    cut = prefixes(grids, draws)
    if alone:
        branches = [double.stack_logits(cut, double.conditioning(net_context.select(slice(k, k + 1)), cut.shape[1]))
                    for k in range(net_context.batch_size if options.guided else 1)]
        logits = torch.cat(branches)  # (1 or 2, rows, w, D, V)
    else:
        net_cut = torch.cat([cut, cut]) if options.guided else cut
        logits = double.stack_logits(net_cut, double.conditioning(net_context, cut.shape[1]))
    rows = torch.arange(len(logits), device=logits.device)
    net_draws = torch.cat([draws, draws]) if options.guided else draws
    at_draws = logits[rows, net_draws[:, 0], net_draws[:, 1], net_draws[:, 2]]  # (n or 2n, V)
    return guided_rows(at_draws.double(), None if scales is None else scales.to(at_draws)[:, None])


def measure_canonical_tolerance(double) -> float:
    """SAFETY x the largest float64 difference between the batched canonical logits and those of each
    sample alone, on probe draws (and 64 ulps of the logits' scale): the bound below which a batched
    recomputation is trusted."""
    codes, context = probe(double)
    height, width = double.config.latent_shape
    draws = torch.tensor([[height - 1, width - 1, 0], [height // 2, width // 2, 0]], device=codes.device)
    options = SamplingOptions()
    together = canonical_logits(double, codes, context, draws, options, alone=False)
    alone = torch.cat([canonical_logits(double, codes[k:k + 1], context.select(slice(k, k + 1)), draws[k:k + 1],
                                        options, alone=True) for k in range(len(codes))])
    scale = max(1.0, alone.abs().max().item())
    return SAFETY * (together - alone).abs().max().item() + 64 * torch.finfo(torch.float64).eps * scale


def measure_masked_tolerance(model, double) -> float:
    """SAFETY x the largest difference between `model`'s batched masked logits (`MaskedPrior.masked_logits`)
    on probe grids with random hidden positions and `double`'s for each grid alone, plus 64 ulps of `model`'s
    dtype at the logits' scale: the bound within which a round of masked decoding trusts the batch."""
    codes, context = probe(model)
    hidden = torch.rand(codes.shape[:3], generator=torch.Generator().manual_seed(1)).to(codes.device) < 0.5
    together = model.masked_logits(codes, hidden, model.conditioning(context)).double()
    alone = torch.cat([double.masked_logits(codes[k:k + 1], hidden[k:k + 1],
                                            double.conditioning(context.select(slice(k, k + 1))))
                       for k in range(len(codes))]).double()
    scale = max(1.0, alone.abs().max().item())
    dtype = next(model.parameters()).dtype
    return SAFETY * (together - alone).abs().max().item() + 64 * torch.finfo(dtype).eps * scale
