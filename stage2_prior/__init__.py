"""Stage 2: priors over code grids. Importing the package registers every arch (`stage2_prior.registry.ARCHS`)."""
from stage2_prior import archs  # noqa: F401  (each arch file registers its archs)
from stage2_prior.archs.gated import GatedPixelCNN
from stage2_prior.archs.pixelrnn import PixelRNN
from stage2_prior.archs.pixelsnail import PixelSNAIL
from stage2_prior.archs.transformer import TransformerPrior
from stage2_prior.config import PriorConfig
from stage2_prior.decoding import BeamSearchOutput, Sampler, SamplingOptions, SamplingStats
from stage2_prior.prior import Prior
from stage2_prior.registry import ARCHS

__all__ = ["ARCHS", "BeamSearchOutput", "GatedPixelCNN", "PixelRNN", "PixelSNAIL", "Prior", "PriorConfig", "Sampler",
           "SamplingOptions", "SamplingStats", "TransformerPrior"]
