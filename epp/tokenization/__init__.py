"""Model tokenizers run in-process: Hugging Face `tokenizers` + the model's chat template.

Used by the EPP (precise prefix routing) and by the simulator, so both turn the same request
into the same token ids. Imports no other layer of the product.
"""

from epp.tokenization.tokenizer import ModelTokenizer, TokenizerError, load_tokenizer

__all__ = ["ModelTokenizer", "TokenizerError", "load_tokenizer"]
