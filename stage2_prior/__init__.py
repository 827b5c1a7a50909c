from stage2_prior.config import PriorConfig
from stage2_prior.model import GatedPixelCNN

__all__ = ["GatedPixelCNN", "PriorConfig"]
