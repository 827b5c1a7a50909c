from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE, VQVAEOutput
from stage1_vqvae.pixels import PixelTokenizer, PixelTokenizerConfig, load_tokenizer

__all__ = ["PixelTokenizer", "PixelTokenizerConfig", "VQVAE", "VQVAEConfig", "VQVAEOutput", "load_tokenizer"]
