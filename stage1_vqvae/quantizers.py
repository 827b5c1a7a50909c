"""The quantizers of vector-quantize-pytorch behind one small interface.

`build_quantizer(config, dim)` returns the library's module (kept as the model's `quantizer`
attribute, so saved weights keep their names); `quantize` and `codes_to_vectors` hide how each kind
returns its codes and decodes them. Codes are (B, N) integers in [0, codebook_size), or (B, N, Q)
for residual VQ (Q codes per position, summed when decoded).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, ResidualVQ, SimVQ, VectorQuantize

from stage1_vqvae.config import VQVAEConfig


def build_quantizer(config: VQVAEConfig, dim: int) -> nn.Module:
    """The quantizer for latents of `dim` channels (channel-last input)."""
    kind = config.quantizer
    ema = dict(codebook_dim=config.codebook_dim, decay=config.ema_decay, kmeans_init=config.kmeans_init,
               kmeans_iters=config.kmeans_iters, threshold_ema_dead_code=config.dead_code_threshold,
               use_cosine_sim=config.use_cosine_sim, rotation_trick=config.rotation_trick,
               commitment_weight=config.commitment_weight)
    if kind == "vq":
        return VectorQuantize(dim=dim, codebook_size=config.codebook_size, straight_through=False, channel_last=True,
                              **ema)
    if kind == "rvq":
        return ResidualVQ(dim=dim, num_quantizers=config.num_quantizers, codebook_size=config.codebook_size, **ema)
    if kind == "simvq":
        return SimVQ(dim=dim, codebook_size=config.codebook_size, rotation_trick=config.rotation_trick,
                     commitment_weight=config.commitment_weight)
    if kind == "lfq":
        return LFQ(dim=dim, codebook_size=config.codebook_size, entropy_loss_weight=config.entropy_loss_weight,
                   commitment_loss_weight=config.commitment_weight)
    return FSQ(levels=list(config.fsq_levels), dim=dim)


def quantize(quantizer: nn.Module, kind: str, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel-last latents (B, N, D) -> quantized (B, N, D), codes (B, N) or (B, N, Q), loss (scalar).

    In eval mode a k-means codebook that was never trained is not initialised from this batch
    (the library would do it as a side effect): it stays as it is and codes what it can.
    """
    with _no_codebook_initialisation(quantizer):
        if kind == "fsq":
            quantized, codes = quantizer(flat)
            return quantized, codes, flat.new_zeros(())
        quantized, codes, loss = quantizer(flat)
    return quantized, codes, loss.sum()  # residual VQ returns one loss per depth


def codes_to_vectors(quantizer: nn.Module, kind: str, codes: torch.Tensor) -> torch.Tensor:
    """Codes (B, N) or (B, N, Q) -> quantized vectors (B, N, D) (residual VQ sums its depths)."""
    if kind in ("vq", "rvq"):
        return quantizer.get_output_from_indices(codes)  # projected out of codebook_dim
    return quantizer.indices_to_codes(codes)


@contextlib.contextmanager
def _no_codebook_initialisation(quantizer: nn.Module) -> Iterator[None]:
    uninitialised = [] if quantizer.training else [buffer for name, buffer in quantizer.named_buffers()
                                                   if name.endswith("initted") and not bool(buffer)]
    for flag in uninitialised:
        flag.fill_(True)
    try:
        yield
    finally:
        for flag in uninitialised:
            flag.fill_(False)
