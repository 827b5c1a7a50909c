"""Stage 1: tokenizers. Importing the package registers every tokenizer class (`Tokenizer.registry`)."""
from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE, VQVAEOutput
from stage1_vqvae.pixels import PixelTokenizer, PixelTokenizerConfig
from stage1_vqvae.tokenizer import Tokenizer, TokenizerOutput, load_tokenizer

__all__ = ["PixelTokenizer", "PixelTokenizerConfig", "Tokenizer", "TokenizerOutput", "VQVAE", "VQVAEConfig",
           "VQVAEOutput", "load_tokenizer"]
