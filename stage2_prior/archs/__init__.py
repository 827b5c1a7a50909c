"""Prior archs, one file each. Importing this package registers them with `Prior.from_config`."""
from stage2_prior.archs.gated import GatedPixelCNN
from stage2_prior.archs.pixelrnn import PixelRNN
from stage2_prior.archs.pixelsnail import PixelSNAIL
from stage2_prior.archs.transformer import TransformerPrior

__all__ = ["GatedPixelCNN", "PixelRNN", "PixelSNAIL", "TransformerPrior"]
