"""The prior: p(codes) = prod_p p(code_p | codes_<p) over the code grid in raster order."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from shared.pretrained import PretrainedModel
from stage2_prior.config import PriorConfig
from stage2_prior.layers import GatedBlock, MaskedConv2d, MaskedResidualBlock


class GatedPixelCNN(PretrainedModel):
    """Gated PixelCNN (arch="gated") or the original masked PixelCNN (arch="pixelcnn") over codes.

    `forward(codes (B, h, w), labels (B,) or None)` -> logits (B, vocab_size, h, w); the logits at
    raster position p depend only on codes at positions < p (and the label).
    """

    config_class = PriorConfig

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        channels = config.hidden_channels
        self.embedding = nn.Embedding(config.vocab_size, channels)
        if config.arch == "gated":
            self.blocks = nn.ModuleList(GatedBlock(channels, config.kernel_size, config.num_classes, first=index == 0,
                                                   dropout=config.dropout)
                                        for index in range(config.num_layers))
        else:
            self.first = MaskedConv2d(channels, channels, config.kernel_size, "A")
            self.blocks = nn.ModuleList(MaskedResidualBlock(channels, config.kernel_size, config.num_classes, config.dropout)
                                        for _ in range(config.num_layers - 1))
        self.head_hidden = nn.Conv2d(channels, channels, 1)
        self.head_out = nn.Conv2d(channels, config.vocab_size, 1)

    def check_codes(self, codes: torch.Tensor) -> None:
        shape = tuple(self.config.latent_shape)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != shape or codes.dtype.is_floating_point:
            raise UserError(f"codes must be integers of shape (B, {shape[0]}, {shape[1]}), "
                            f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.vocab_size):
            raise UserError(f"codes must lie in [0, {self.config.vocab_size}), got values in "
                            f"[{int(codes.min())}, {int(codes.max())}]")

    def check_labels(self, labels: torch.Tensor | int | None, batch_size: int) -> torch.Tensor | None:
        """Labels as a (batch_size,) int64 tensor (an int is repeated); None for unconditional models."""
        num_classes = self.config.num_classes
        if num_classes is None:
            if labels is not None:
                raise UserError("this prior is unconditional: pass labels=None (train with labelled codes "
                                "for a class-conditional prior)")
            return None
        if labels is None:
            raise UserError(f"this prior is class-conditional: pass labels in [0, {num_classes})")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device)
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise UserError(f"labels must be an int or {batch_size} ints, got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise UserError(f"labels must lie in [0, {num_classes}), got values in "
                            f"[{int(labels.min())}, {int(labels.max())}]")
        return labels

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """Codes (B, h, w) int -> logits (B, vocab_size, h, w)."""
        self.check_codes(codes)
        labels = self.check_labels(labels, codes.shape[0])
        x = self.embedding(codes.long()).permute(0, 3, 1, 2)  # (B, C, h, w)
        if self.config.arch == "gated":
            vertical, horizontal, skips = x, x, 0
            for block in self.blocks:
                vertical, horizontal, skip = block(vertical, horizontal, labels)
                skips = skips + skip
            features = skips  # (B, C, h, w)
        else:
            features = self.first(x)
            for block in self.blocks:
                features = block(features, labels)
        return self.head_out(F.relu(self.head_hidden(F.relu(features))))  # (B, V, h, w)

    def sample(self, num_samples: int, labels: torch.Tensor | int | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
               method: str | None = None, *, seed: int | None = None, sample_offset: int = 0) -> torch.Tensor:
        """Draw codes (num_samples, h, w) in raster order.

        Sample k is drawn from uniforms seeded by (seed, sample_offset + k), so it does not depend on
        the batch it was drawn in. `seed` defaults to a number drawn from `generator` (or torch's
        global generator). `method`: "cached" (fast, exact; the default for arch "gated") or "naive"
        (one full forward per position; the only method for arch "pixelcnn").
        """
        from stage2_prior.sampling import sample_codes

        return sample_codes(self, num_samples, labels, temperature, top_k, top_p, generator, method, seed,
                            sample_offset)

    def complete(self, codes: torch.Tensor, known_mask: torch.Tensor, labels: torch.Tensor | int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, method: str | None = None, *, seed: int | None = None,
                 sample_offset: int = 0) -> torch.Tensor:
        """Keep `codes` where `known_mask` (B, h, w) is True and sample the rest in raster order.

        A PixelCNN conditions only on positions earlier in raster order: a known code after an
        unknown one is kept, but does not inform the samples before it.
        """
        from stage2_prior.sampling import sample_codes

        self.check_codes(codes)
        if known_mask.shape != codes.shape:
            raise UserError(f"known_mask must have the shape of codes {tuple(codes.shape)}, "
                            f"got {tuple(known_mask.shape)}")
        return sample_codes(self, codes.shape[0], labels, temperature, top_k, top_p, generator, method, seed,
                            sample_offset, known_codes=codes, known_mask=known_mask.bool())
