"""codellama_ext: a fast, small, dependable engine for Meta's CodeLlama models."""

from . import ops, reference
from .tokenizer import CodeLlamaTokenizer, IncrementalDetokenizer, InfillingNotSupported

__all__ = ["ops", "reference", "CodeLlamaTokenizer", "IncrementalDetokenizer", "InfillingNotSupported"]
