"""Sampling from the prior: the naive reference and the exact cached sampler.

Both draw position p of sample k as the inverse CDF of the (filtered) distribution at a uniform
u[k, p] taken from a generator seeded by (seed, k), so the two methods, and any batch split, give
the same codes.

The cached sampler (after Fast PixelCNN++, Ramachandran et al. 2017, sec. 3) exploits the gated
stack's structure. The vertical stack at row i needs only rows < i, so it is computed a row at a
time, one small conv per layer, as soon as the row above is complete; its contribution to the
horizontal stack (the vertical-to-horizontal link plus the class bias) is kept for the row. The
horizontal stack and the output head then cost, per position, one (k//2 + 1)-wide window per
layer: a few (B, C) x (C, 2C) products instead of a full forward over the grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.errors import UserError
from stage2_prior.layers import gate

SEED_STRIDE = 0x9E3779B97F4A7C15 % (2 ** 61)  # spreads (seed, index) pairs over generator seeds


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must lie in (0, 1] (or None), got {top_p}")


def sample_uniforms(seed: int, first_index: int, num_samples: int, num_positions: int) -> torch.Tensor:
    """Uniforms (num_samples, num_positions): row k comes from (seed, first_index + k) alone."""
    rows = []
    for index in range(first_index, first_index + num_samples):
        generator = torch.Generator().manual_seed((seed * SEED_STRIDE + index) % (2 ** 63))
        rows.append(torch.rand(num_positions, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, num_positions, dtype=torch.float64)


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int | None,
         top_p: float | None) -> torch.Tensor:
    """Codes (B,) from logits (B, V) by inverse CDF at uniforms (B,), after temperature, top-k, top-p."""
    logits = logits.double() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probabilities.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the codes ranked above each
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # keeps the smallest set reaching top_p
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probs)
    cumulative = probabilities.cumsum(dim=-1)  # (B, V)
    targets = uniforms.to(cumulative) * cumulative[:, -1]
    codes = torch.searchsorted(cumulative, targets[:, None], right=True).squeeze(1)
    return codes.clamp_max(logits.shape[-1] - 1)


def sample_codes(model, num_samples: int, labels, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None, method: str | None, seed: int | None, sample_offset: int,
                 known_codes: torch.Tensor | None = None, known_mask: torch.Tensor | None = None) -> torch.Tensor:
    """See `GatedPixelCNN.sample` and `.complete`."""
    if num_samples < 1:
        raise UserError(f"the number of samples must be at least 1, got {num_samples}")
    check_sampling_options(temperature, top_k, top_p)
    method = method or ("cached" if model.config.arch == "gated" else "naive")
    if method not in ("cached", "naive"):
        raise UserError(f"method must be 'cached' or 'naive', got {method!r}")
    if method == "cached" and model.config.arch != "gated":
        raise UserError("the cached sampler needs arch='gated'; use method='naive' for arch='pixelcnn'")
    labels = model.check_labels(labels, num_samples)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
    height, width = model.config.latent_shape
    uniforms = sample_uniforms(seed, sample_offset, num_samples, height * width)  # (n, h*w)
    device = model.embedding.weight.device
    if known_codes is None:
        known_codes = torch.zeros(num_samples, height, width, dtype=torch.long, device=device)
        known_mask = torch.zeros(num_samples, height, width, dtype=torch.bool, device=device)
    options = (temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        # TF32 convolutions (cuDNN's default on recent GPUs) would round the naive sampler's logits
        # differently from the cached sampler's fp32 matrix products; both use full fp32 instead.
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                                                 allow_tf32=False):
            if method == "naive":
                return _sample_naive(model, labels, uniforms, known_codes.to(device).long(), known_mask.to(device),
                                     options)
            return CachedSampler(model).run(labels, uniforms, known_codes.to(device).long(), known_mask.to(device),
                                            options)[0]
    finally:
        model.train(was_training)


def _sample_naive(model, labels, uniforms, known_codes, known_mask, options) -> torch.Tensor:
    """The reference: one full forward per position (h * w forwards)."""
    codes = known_codes.clone()
    height, width = codes.shape[1:]
    for row in range(height):
        for column in range(width):
            logits = model(codes, labels)[:, :, row, column]  # (B, V)
            drawn = draw(logits, uniforms[:, row * width + column], *options)
            codes[:, row, column] = torch.where(known_mask[:, row, column], codes[:, row, column], drawn)
    return codes


class CachedSampler:
    """Exact incremental sampling for a gated prior; see the module docstring."""

    def __init__(self, model) -> None:
        if model.config.arch != "gated":
            raise UserError("the cached sampler needs arch='gated'")
        self.model = model
        self.channels = model.config.hidden_channels
        self.half = model.config.kernel_size // 2
        # Per layer: the horizontal conv as a matrix over a flattened (C, k//2 + 1) window, and the 1x1s as matrices.
        self.horizontal_weights = [block.horizontal.weight.flatten(1) for block in model.blocks]  # (2C, C*(half+1))
        self.out_weights = [block.horizontal_out.weight.flatten(1) for block in model.blocks]  # (2C, C)
        self.link_weights = [block.vertical_to_horizontal.weight.flatten(1) for block in model.blocks]  # (2C, 2C)
        self.head_hidden = model.head_hidden.weight.flatten(1)  # (C, C)
        self.head_out = model.head_out.weight.flatten(1)  # (V, C)

    def run(self, labels, uniforms, known_codes, known_mask, options, keep_logits: bool = False):
        """Codes (B, h, w), and with keep_logits the logits (B, V, h, w) the draws were made from."""
        model, channels, half = self.model, self.channels, self.half
        blocks = model.blocks
        batch, height, width = known_codes.shape
        device, dtype = known_codes.device, model.embedding.weight.dtype  # buffers match the model (bf16 too)
        codes = known_codes.clone()
        all_logits = (torch.empty(batch, model.config.vocab_size, height, width, device=device, dtype=dtype)
                      if keep_logits else None)
        # Vertical inputs of every layer, padded as the full forward pads them: (B, C, half + h, half + w + half).
        # Layer 0's input is the embedded codes shifted one row down, so its row i holds code row i - 1.
        vertical_inputs = [torch.zeros(batch, channels, half + height, width + 2 * half, device=device, dtype=dtype)
                           for _ in blocks]
        class_biases = [block.class_bias(labels) if block.class_bias is not None else None for block in blocks]
        for row in range(height):
            if row > 0:
                vertical_inputs[0][:, :, half + row, half:half + width] = \
                    model.embedding(codes[:, row - 1]).transpose(1, 2)  # (B, C, w)
            row_terms = []  # per layer: what the vertical stack adds to the horizontal pre-activation, (B, w, 2C)
            for index, block in enumerate(blocks):
                window = vertical_inputs[index][:, :, row:row + half + 1]  # (B, C, half+1, w + 2 half)
                vertical_pre = F.conv2d(window, block.vertical.weight, block.vertical.bias)[:, :, 0]  # (B, 2C, w)
                vertical_pre = vertical_pre.transpose(1, 2)  # (B, w, 2C)
                link = F.linear(vertical_pre, self.link_weights[index], block.vertical_to_horizontal.bias)
                row_term = link + block.horizontal.bias
                if class_biases[index] is not None:
                    vertical_pre = vertical_pre + class_biases[index][:, None]
                    row_term = row_term + class_biases[index][:, None]
                row_terms.append(row_term)
                if index + 1 < len(blocks):
                    vertical_inputs[index + 1][:, :, half + row, half:half + width] = \
                        gate(vertical_pre.transpose(1, 2))  # (B, C, w)
            # Horizontal inputs of every layer for this row, left-padded: (B, half + w, C), channel-last.
            # Layer 0's input is the embedded row shifted one column right.
            horizontal_inputs = [torch.zeros(batch, half + width, channels, device=device, dtype=dtype)
                                 for _ in blocks]
            for column in range(width):
                skips = None
                for index, block in enumerate(blocks):
                    window = horizontal_inputs[index][:, column:column + half + 1]  # (B, half+1, C)
                    window = window.transpose(1, 2).reshape(batch, -1)  # (B, C*(half+1)), as the conv weight
                    pre = F.linear(window, self.horizontal_weights[index]) + row_terms[index][:, column]  # (B, 2C)
                    residual, skip = F.linear(gate(pre), self.out_weights[index],
                                              block.horizontal_out.bias).chunk(2, dim=1)  # 2 x (B, C)
                    if index > 0:
                        residual = residual + horizontal_inputs[index][:, half + column]
                    if index + 1 < len(blocks):
                        horizontal_inputs[index + 1][:, half + column] = residual
                    skips = skip if skips is None else skips + skip
                hidden = F.relu(F.linear(F.relu(skips), self.head_hidden, model.head_hidden.bias))
                logits = F.linear(hidden, self.head_out, model.head_out.bias)  # (B, V)
                if all_logits is not None:
                    all_logits[:, :, row, column] = logits
                drawn = draw(logits, uniforms[:, row * width + column], *options)
                chosen = torch.where(known_mask[:, row, column], codes[:, row, column], drawn)
                codes[:, row, column] = chosen
                if column + 1 < width:
                    horizontal_inputs[0][:, half + column + 1] = model.embedding(chosen)  # shifted right
        return codes, all_logits
