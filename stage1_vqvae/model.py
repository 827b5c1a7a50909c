"""The tokenizer: encoder -> quantizer (vector-quantize-pytorch) -> decoder, with one or two levels.

levels=1 is the VQ-VAE: one grid of codes, (B, h, w), or (B, h, w, Q) with residual VQ.
levels=2 is VQ-VAE-2 (Razavi et al. 2019, sec. 3.1): a top grid at half the bottom's side for global
structure, quantized first; the bottom quantizer sees the bottom latents and the decoded top; the
decoder reads both. Its codes are a dict {"top": (B, h/2, w/2), "bottom": (B, h, w)}, in the order
a prior chain generates them.
"""
from __future__ import annotations

import torch
from einops import rearrange

from shared.codes import SINGLE_LEVEL, LevelInfo, codes_dtype, level_column
from shared.errors import UserError
from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.networks import Decoder, Encoder, TopLevel, build_decoder, build_encoder  # noqa: F401 (re-exported)
from stage1_vqvae.quantizers import QUANTIZERS, build_quantizer, codes_to_vectors, quantize
from stage1_vqvae.tokenizer import Codes, Tokenizer, TokenizerOutput

VQVAEOutput = TokenizerOutput  # the name the first releases gave it


class VQVAE(Tokenizer):
    """Images (B, C, H, W) in [-1, 1] <-> codes in [0, codebook_size).

    Build it after `Accelerator()` in multi-process runs: the quantizer decides at construction
    whether to synchronise its codebook across processes.
    """

    config_class = VQVAEConfig
    first_codes_format = True

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__(config)
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config, latent_in=config.latent_channels * config.levels)
        self.quantizer = build_quantizer(config, config.latent_channels)  # the bottom (or only) level
        if config.levels == 2:
            self.top = TopLevel(config)
            self.top_quantizer = build_quantizer(config, config.latent_channels)

    # ------------------------------------------------------------------------------------------
    # Shapes
    # ------------------------------------------------------------------------------------------

    def code_layout(self, image_size: int | None = None) -> tuple[LevelInfo, ...]:
        """One level (B, h, w) at 1/2^n of the image side, or with levels=2 a top grid at half that side
        first; residual VQ of depth Q > 1 stacks Q codes per position (depth 1 is one code, as everywhere)."""
        config = self.config
        side = (image_size or config.image_size) // 2 ** config.num_downsamples
        sides = {SINGLE_LEVEL: side} if config.levels == 1 else {"top": side // 2, "bottom": side}
        if self.kind.spatial:
            if image_size not in (None, config.image_size):
                raise UserError(f"this tokenizer's scales are fixed for {config.image_size}px images, not {image_size}px; "
                                f"pass --image-size {config.image_size}")
            sides = self.kind.level_sides(config)
        return tuple(LevelInfo(name, level_column(name), config.codebook_size, (level_side, level_side),
                               config.codes_per_position, codes_dtype(config.codebook_size))
                     for name, level_side in sides.items())

    @property
    def kind(self):
        """The quantizer kind (`stage1_vqvae.quantizers.QUANTIZERS`)."""
        return QUANTIZERS[self.config.quantizer]

    @property
    def scales(self) -> tuple[int, ...] | None:
        return tuple(self.config.scale_sides) if self.kind.spatial else None

    @property
    def shared_codebook(self) -> bool:
        """Whether every level draws from one codebook (multi-scale), so usage is counted over all of them."""
        return self.kind.spatial

    @property
    def codebooks_per_position(self) -> int:
        """Codebooks a position's codes come from: residual VQ has one per depth."""
        return self.config.codes_per_position

    def check_images(self, images: torch.Tensor) -> None:
        """ValueError unless images are (B, in_channels, H, W) with H and W multiples of the downsample factor."""
        factor = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise UserError(f"images must be (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % factor or images.shape[3] % factor:
            raise UserError(f"image size {tuple(images.shape[2:])} is not divisible by the tokenizer's downsample "
                            f"factor {factor}; resize to a multiple of {factor}")

    def as_levels(self, codes: Codes) -> dict[str, torch.Tensor]:
        """Codes of every level as a dict, checked: integer, the level's shape (any grid size), in range."""
        if isinstance(codes, torch.Tensor):
            if len(self.level_names) != 1:
                raise UserError(f"this tokenizer has levels {', '.join(self.level_names)}: pass codes as a dict "
                                "level -> grid")
            codes = {SINGLE_LEVEL: codes}
        if set(codes) != set(self.level_names):
            raise UserError(f"codes must have the levels {', '.join(self.level_names)}, got {', '.join(codes)}")
        for name, grid in codes.items():
            stack = len(self.level_shapes[name]) - 2
            if grid.ndim != 3 + stack or grid.dtype.is_floating_point or (
                    stack and grid.shape[-1] != self.config.num_quantizers):
                shape = "(B, h, w" + (f", {self.config.num_quantizers})" if stack else ")")
                raise UserError(f"codes must be an integer tensor {shape}, got {grid.dtype} {tuple(grid.shape)}")
            if grid.numel() and (grid.min() < 0 or grid.max() >= self.codebook_size):
                raise UserError(f"codes must lie in [0, {self.codebook_size}), got values in "
                                f"[{int(grid.min())}, {int(grid.max())}]")
        return {name: codes[name] for name in self.level_names}

    def _public(self, codes: dict[str, torch.Tensor]) -> Codes:
        return codes[SINGLE_LEVEL] if len(codes) == 1 else codes

    # ------------------------------------------------------------------------------------------
    # Encoding and decoding
    # ------------------------------------------------------------------------------------------

    def quantize(self, latents: torch.Tensor, quantizer=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (B, D, h, w) -> quantized latents (B, D, h, w), codes (B, h, w[, Q]), quantizer loss."""
        height, width = latents.shape[2:]
        flat = rearrange(latents, "b d h w -> b (h w) d")  # channel-last: works with a lower codebook_dim
        quantized, codes, loss = quantize(quantizer or self.quantizer, self.config.quantizer, flat)
        quantized = rearrange(quantized, "b (h w) d -> b d h w", h=height, w=width)
        codes = rearrange(codes.long(), "b (h w) ... -> b h w ...", h=height, w=width)
        if QUANTIZERS[self.config.quantizer].stacked and self.config.num_quantizers == 1:
            codes = codes[..., 0]  # (B, h, w): a stack of one is one code per position
        return quantized, codes, loss

    def _vectors(self, codes: torch.Tensor, quantizer) -> torch.Tensor:
        """Codes (B, h, w[, Q]) -> quantized latents (B, D, h, w)."""
        height, width = codes.shape[1:3]
        if QUANTIZERS[self.config.quantizer].stacked and codes.ndim == 3:
            codes = codes[..., None]  # ResidualVQ reads (B, N, Q) even at depth 1
        flat = rearrange(codes.long(), "b h w ... -> b (h w) ...")
        vectors = codes_to_vectors(quantizer, self.config.quantizer, flat)  # (B, h*w, D)
        return rearrange(vectors, "b (h w) d -> b d h w", h=height, w=width)

    def _encode(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(codes per level, the decoder's input, the quantizer losses)."""
        latents = self.encoder(images)  # (B, D, h, w)
        if self.kind.spatial:  # the quantizer codes the map as a whole, one level per scale
            decoder_input, codes, loss = self.quantizer(latents)
            return codes, decoder_input, loss
        if self.config.levels == 1:
            quantized, codes, loss = self.quantize(latents)
            return {SINGLE_LEVEL: codes}, quantized, loss
        quantized_top, codes_top, loss_top = self.quantize(self.top.encode(latents), self.top_quantizer)
        bottom_input = self.top.bottom_quantizer_input(latents, quantized_top)
        quantized_bottom, codes_bottom, loss_bottom = self.quantize(bottom_input)
        decoder_input = self.top.decoder_input(quantized_bottom, quantized_top)
        return {"top": codes_top, "bottom": codes_bottom}, decoder_input, loss_top + loss_bottom

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """Encode, quantize (updating EMA codebooks in training mode) and decode."""
        self.check_images(images)
        codes, decoder_input, loss = self._encode(images)
        raw = self.decoder(decoder_input)  # (B, C, H, W)
        # clamped to the image range in value, with the gradient of the raw output: a plain clamp gives no
        # gradient where the output left the range, and on images that are mostly background (-1: the shapes)
        # the decoder pushed every pixel below -1 early on and never brought the objects back
        reconstruction = raw + (raw.clamp(-1.0, 1.0) - raw).detach()
        return TokenizerOutput(reconstruction, self._public(codes), loss)

    def encode(self, images: torch.Tensor) -> Codes:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w[, Q]) int64, or a dict per level with levels=2.
        Never updates (or k-means initialises) a codebook."""
        self.check_images(images)
        quantizers = [module for module in (self.quantizer, getattr(self, "top_quantizer", None)) if module is not None]
        modes = [quantizer.training for quantizer in quantizers]
        for quantizer in quantizers:
            quantizer.eval()
        try:
            return self._public(self._encode(images)[0])
        finally:
            for quantizer, mode in zip(quantizers, modes):
                quantizer.train(mode)

    def decode(self, codes: Codes) -> torch.Tensor:
        """Codes (as `encode` returns them) -> images (B, C, H, W) in [-1, 1]."""
        levels = self.as_levels(codes)
        if self.kind.spatial:
            decoder_input = self.quantizer.latents_from_codes(levels)
        elif self.config.levels == 1:
            decoder_input = self._vectors(levels[SINGLE_LEVEL], self.quantizer)
        else:
            quantized_top = self._vectors(levels["top"], self.top_quantizer)
            quantized_bottom = self._vectors(levels["bottom"], self.quantizer)
            decoder_input = self.top.decoder_input(quantized_bottom, quantized_top)
        return self.decoder(decoder_input).clamp(-1.0, 1.0)
