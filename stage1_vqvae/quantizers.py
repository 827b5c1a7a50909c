"""The quantizers of vector-quantize-pytorch behind one small interface, and their registry.

`QUANTIZERS` is the one list of quantizer kinds (`--quantizer`): each builds the library's module
(kept as the model's `quantizer` attribute, so saved weights keep their names), quantizes channel-last
latents, and turns codes back into vectors. Codes are (B, N) integers in [0, codebook_size), or
(B, N, Q) for a kind that stacks Q codes per position (residual VQ, summed when decoded).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, ResidualVQ, SimVQ, VectorQuantize

from shared.errors import UserError


def ema_settings(config: Any) -> dict[str, Any]:
    """The EMA codebook settings of a VQVAEConfig, as vector-quantize-pytorch names them."""
    return dict(codebook_dim=config.codebook_dim, decay=config.ema_decay, kmeans_init=config.kmeans_init,
                kmeans_iters=config.kmeans_iters, threshold_ema_dead_code=config.dead_code_threshold,
                use_cosine_sim=config.use_cosine_sim, rotation_trick=config.rotation_trick,
                commitment_weight=config.commitment_weight)


class QuantizerKind:
    """One kind of quantizer: `build` its module for latents of `dim` channels, `quantize` channel-last
    latents (B, N, D) -> (quantized (B, N, D), codes, loss), and `vectors` of codes -> (B, N, D)."""

    summary = ""
    stacked = False  # Q codes per position (num_quantizers), a stack ordered by depth
    # quantizes the latent map as a whole: `build` gives a module mapping latents (B, D, h, w) to (the decoder's
    # input, codes per level, loss), with `latents_from_codes(codes)`; `level_sides` names its levels
    spatial = False

    def check(self, config: Any) -> None:
        """UserError for settings of a VQVAEConfig this kind cannot build."""

    def build(self, config: Any, dim: int) -> nn.Module:
        raise NotImplementedError

    def quantize(self, module: nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, codes, loss = module(flat)
        return quantized, codes, loss.sum()  # residual VQ returns one loss per depth

    def vectors(self, module: nn.Module, codes: torch.Tensor) -> torch.Tensor:
        return module.indices_to_codes(codes)

    def level_sides(self, config: Any) -> dict[str, int]:
        """A spatial kind's code levels, name -> grid side, in generation order."""
        raise NotImplementedError


class EMAVectorQuantizer(QuantizerKind):
    summary = "EMA vector quantization (van den Oord et al. 2017)"

    def build(self, config: Any, dim: int) -> nn.Module:
        return VectorQuantize(dim=dim, codebook_size=config.codebook_size, straight_through=False, channel_last=True,
                              **ema_settings(config))

    def vectors(self, module: nn.Module, codes: torch.Tensor) -> torch.Tensor:
        return module.get_output_from_indices(codes)  # projected out of codebook_dim


class ResidualQuantizer(EMAVectorQuantizer):
    summary = "residual VQ: num_quantizers codes per position"
    stacked = True

    def build(self, config: Any, dim: int) -> nn.Module:
        return ResidualVQ(dim=dim, num_quantizers=config.num_quantizers, codebook_size=config.codebook_size,
                          **ema_settings(config))


class SimVQQuantizer(QuantizerKind):
    summary = "a linearly reparameterised codebook (SimVQ)"

    def build(self, config: Any, dim: int) -> nn.Module:
        return SimVQ(dim=dim, codebook_size=config.codebook_size, rotation_trick=config.rotation_trick,
                     commitment_weight=config.commitment_weight)


class LookupFreeQuantizer(QuantizerKind):
    summary = "lookup-free (binary) codes"

    def check(self, config: Any) -> None:
        if config.codebook_size & (config.codebook_size - 1):
            raise UserError(f"lfq codes are bit patterns: --codebook-size must be a power of 2, got {config.codebook_size}")

    def build(self, config: Any, dim: int) -> nn.Module:
        return LFQ(dim=dim, codebook_size=config.codebook_size, entropy_loss_weight=config.entropy_loss_weight,
                   commitment_loss_weight=config.commitment_weight)


class FiniteScalarQuantizer(QuantizerKind):
    summary = "finite scalar quantization"

    def check(self, config: Any) -> None:
        product = math.prod(config.fsq_levels)
        if product != config.codebook_size:
            raise UserError(f"with quantizer fsq the codebook size is the product of --fsq-levels "
                            f"({'*'.join(map(str, config.fsq_levels))} = {product}), not {config.codebook_size}; "
                            f"pass --codebook-size {product}")

    def build(self, config: Any, dim: int) -> nn.Module:
        return FSQ(levels=list(config.fsq_levels), dim=dim)

    def quantize(self, module: nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, codes = module(flat)
        return quantized, codes, flat.new_zeros(())


QUANTIZERS: dict[str, QuantizerKind] = {"vq": EMAVectorQuantizer(), "fsq": FiniteScalarQuantizer(),
                                         "simvq": SimVQQuantizer(), "lfq": LookupFreeQuantizer(),
                                         "rvq": ResidualQuantizer()}


def register_quantizer(name: str, kind: QuantizerKind) -> None:
    """Add a quantizer kind (`--quantizer NAME`); a module outside this file registers its own."""
    QUANTIZERS[name] = kind


def quantizer_names() -> list[str]:
    return list(QUANTIZERS)


def build_quantizer(config: Any, dim: int) -> nn.Module:
    """The quantizer of a VQVAEConfig for latents of `dim` channels (channel-last input)."""
    return QUANTIZERS[config.quantizer].build(config, dim)


def quantize(quantizer: nn.Module, kind: str, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel-last latents (B, N, D) -> quantized (B, N, D), codes (B, N) or (B, N, Q), loss (scalar).

    In eval mode a k-means codebook that was never trained is not initialised from this batch
    (the library would do it as a side effect): it stays as it is and codes what it can.
    """
    with _no_codebook_initialisation(quantizer):
        return QUANTIZERS[kind].quantize(quantizer, flat)


def codes_to_vectors(quantizer: nn.Module, kind: str, codes: torch.Tensor) -> torch.Tensor:
    """Codes (B, N) or (B, N, Q) -> quantized vectors (B, N, D) (residual VQ sums its depths)."""
    return QUANTIZERS[kind].vectors(quantizer, codes)


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
