from stage2_prior.archs import GatedPixelCNN, PixelRNN, PixelSNAIL, TransformerPrior
from stage2_prior.config import PriorConfig
from stage2_prior.prior import BeamSearchOutput, Prior

__all__ = ["BeamSearchOutput", "GatedPixelCNN", "PixelRNN", "PixelSNAIL", "Prior", "PriorConfig", "TransformerPrior"]
