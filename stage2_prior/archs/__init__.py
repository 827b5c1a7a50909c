"""Prior archs, one file each. Importing this package registers them with `Prior.from_config`."""
from stage2_prior.archs.gated import GatedPixelCNN
from stage2_prior.archs.pixelsnail import PixelSNAIL

__all__ = ["GatedPixelCNN", "PixelSNAIL"]
