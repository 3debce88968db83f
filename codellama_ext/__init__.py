"""codellama_ext: a fast, small, dependable engine for Meta's CodeLlama models."""

from . import ops, reference
from .checkpoint import CheckpointError, convert_to_hf, convert_to_meta, open_checkpoint
from .config import PRESETS, ConfigError, ModelArgs, preset
from .model import Transformer, estimate_memory, load_model
from .tokenizer import CodeLlamaTokenizer, IncrementalDetokenizer, InfillingNotSupported
from .generation import GenerationResult, SamplingParams
from .api import CodeLlama

__all__ = [
    "ops", "reference",
    "CodeLlamaTokenizer", "IncrementalDetokenizer", "InfillingNotSupported",
    "ModelArgs", "ConfigError", "PRESETS", "preset",
    "CheckpointError", "open_checkpoint", "convert_to_hf", "convert_to_meta",
    "Transformer", "load_model", "estimate_memory",
    "CodeLlama", "SamplingParams", "GenerationResult",
]
