from stage2_prior.archs import GatedPixelCNN, PixelSNAIL
from stage2_prior.config import PriorConfig
from stage2_prior.prior import BeamSearchOutput, Prior

__all__ = ["BeamSearchOutput", "GatedPixelCNN", "PixelSNAIL", "Prior", "PriorConfig"]
