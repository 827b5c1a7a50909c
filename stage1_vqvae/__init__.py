from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE, VQVAEOutput

__all__ = ["VQVAE", "VQVAEConfig", "VQVAEOutput"]
