"""The discretized logistic mixture of PixelCNN++ (Salimans et al. 2017, sec. 2.1-2.2), for a stack of
D pixel channels of K levels at one position.

Per position the network gives M mixture logits, M*D means, M*D log-scales and M*D(D-1)/2 channel
coefficients; channel c's mean is coupled linearly to the values of channels < c (sec. 2.2). Level k
of K stands for the value `level_values(k)` in [-1, 1], the centre of its bin; the edge bins take
the tails (sec. 2.1). Everything is computed in the dtype of the parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOG_SCALE_FLOOR = -7.0  # sec. 2.1: a floor on the scale


def parameter_count(mixtures: int, depth: int) -> int:
    """Per position: M mixture logits, M*D means, M*D log-scales, M*D(D-1)/2 channel coefficients."""
    return mixtures * (1 + 2 * depth + depth * (depth - 1) // 2)


def level_values(codes: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """Pixel levels [0, K) -> the centres of their bins in [-1, 1], in `dtype` (the one helper for
    centres, so an observed level and the table of every level hold the same numbers)."""
    return codes.to(dtype) * (2.0 / (levels - 1)) - 1.0


def split(params: torch.Tensor, mixtures: int, depth: int) -> tuple[torch.Tensor, ...]:
    """params (..., P) -> logit_pi (..., M), means (..., M, D), log_scales (..., M, D), coeffs (..., M, D(D-1)/2)."""
    m, d = mixtures, depth
    logit_pi, rest = params[..., :m], params[..., m:]
    means = rest[..., :m * d].unflatten(-1, (m, d))
    log_scales = rest[..., m * d:2 * m * d].unflatten(-1, (m, d)).clamp_min(LOG_SCALE_FLOOR)
    coeffs = torch.tanh(rest[..., 2 * m * d:].unflatten(-1, (m, d * (d - 1) // 2)))
    return logit_pi, means, log_scales, coeffs


def coupled_means(means: torch.Tensor, coeffs: torch.Tensor, values: torch.Tensor, channel: int) -> torch.Tensor:
    """Mean of channel `channel` per component: mu + sum_{c < channel} coeff * value_c (sec. 2.2).

    means (..., M, D), coeffs (..., M, D(D-1)/2), values (..., D) in [-1, 1] -> (..., M).
    """
    mean = means[..., channel]
    first = channel * (channel - 1) // 2  # coefficients of earlier channels are stored channel by channel
    for previous in range(channel):
        mean = mean + coeffs[..., first + previous] * values[..., None, previous]
    return mean


def discretized_logistic_log_probs(mean: torch.Tensor, log_scale: torch.Tensor, levels: int,
                                   values: torch.Tensor | None = None) -> torch.Tensor:
    """log P(level) of a logistic (mean, scale) discretized to `levels` bins of [-1, 1], with the edge
    bins taking the tails (sec. 2.1). For `values` (bin centres, broadcast with mean) the log-probability
    of those; else of every level, on a new last dimension (..., levels)."""
    if values is None:
        x = level_values(torch.arange(levels, device=mean.device), levels, mean.dtype)  # (K,)
        mean, log_scale = mean[..., None], log_scale[..., None]
    else:
        x = values
    half_bin = 1.0 / (levels - 1)
    inverse_scale = torch.exp(-log_scale)
    upper = inverse_scale * (x - mean + half_bin)
    lower = inverse_scale * (x - mean - half_bin)
    log_cdf_upper = upper - F.softplus(upper)  # log sigmoid(upper)
    log_one_minus_cdf_lower = -F.softplus(lower)  # log (1 - sigmoid(lower))
    # log(sigmoid(u) - sigmoid(l)) without cancellation: sigmoid(u) - sigmoid(l) = e^u (1 - e^(l-u)) / ((1 + e^u)(1 + e^l))
    log_middle = (torch.log((-torch.expm1(lower - upper)).clamp_min(1e-30)) + upper - F.softplus(upper)
                  - F.softplus(lower))
    edge_low = x <= -1.0 + 1e-6
    edge_high = x >= 1.0 - 1e-6
    return torch.where(edge_low, log_cdf_upper, torch.where(edge_high, log_one_minus_cdf_lower, log_middle))


def entry_log_probs(params: torch.Tensor, codes: torch.Tensor, mixtures: int, levels: int) -> torch.Tensor:
    """Mixture parameters (..., P) and the stack (..., D) -> log p(entry d = k | entries < d): (..., D, K).

    The per-entry categorical of the mixture: component weights updated by the entries already seen,
    means coupled linearly to them. Summing the observed entries' values gives the joint
    log-likelihood of the mixture exactly (the chain rule)."""
    depth = codes.shape[-1]
    logit_pi, means, log_scales, coeffs = split(params, mixtures, depth)
    values = level_values(codes, levels, params.dtype)  # (..., D)
    log_weight = F.log_softmax(logit_pi, dim=-1)  # (..., M)
    out = []
    for channel in range(depth):
        mean = coupled_means(means, coeffs, values, channel)  # (..., M)
        every_level = discretized_logistic_log_probs(mean, log_scales[..., channel], levels)  # (..., M, K)
        out.append(torch.logsumexp(log_weight[..., None] + every_level, dim=-2))  # (..., K)
        observed = discretized_logistic_log_probs(mean, log_scales[..., channel], levels,
                                                  values[..., channel, None])  # (..., M)
        log_weight = log_weight + observed
    return torch.stack(out, dim=-2)  # (..., D, K)


def stack_nll(params: torch.Tensor, codes: torch.Tensor, mixtures: int, levels: int) -> torch.Tensor:
    """-log p(stack) per position, straight from the mixture (no per-level table): (...,)."""
    depth = codes.shape[-1]
    logit_pi, means, log_scales, coeffs = split(params, mixtures, depth)
    values = level_values(codes, levels, params.dtype)
    total = F.log_softmax(logit_pi, dim=-1)  # (..., M)
    for channel in range(depth):
        mean = coupled_means(means, coeffs, values, channel)
        total = total + discretized_logistic_log_probs(mean, log_scales[..., channel], levels,
                                                       values[..., channel, None])
    return -torch.logsumexp(total, dim=-1)
