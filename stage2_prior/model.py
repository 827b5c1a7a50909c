"""Kept for code written against the first release: `from stage2_prior.model import GatedPixelCNN`."""
from stage2_prior.archs.gated import GatedPixelCNN

__all__ = ["GatedPixelCNN"]
