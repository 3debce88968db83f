"""codellama_ext: a fast, small, dependable engine for Meta's CodeLlama models.

The names below are imported on first use (PEP 562), so that `import codellama_ext.cli` does not pay torch's
import (seconds) before the command line can parse its flags, answer --help, or handle Ctrl-C."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {
    "CodeLlamaTokenizer": "tokenizer", "IncrementalDetokenizer": "tokenizer", "InfillingNotSupported": "tokenizer",
    "ModelArgs": "config", "ConfigError": "config", "PRESETS": "config", "preset": "config",
    "CheckpointError": "checkpoint", "open_checkpoint": "checkpoint", "convert_to_hf": "checkpoint",
    "convert_to_meta": "checkpoint", "verify_checklist": "checkpoint",
    "Transformer": "model", "load_model": "model", "estimate_memory": "model",
    "CodeLlama": "api", "SamplingParams": "generation", "GenerationResult": "generation",
}
_SUBMODULES = ("ops", "reference")

__all__ = [*_SUBMODULES, *_EXPORTS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from . import ops, reference
    from .api import CodeLlama
    from .checkpoint import CheckpointError, convert_to_hf, convert_to_meta, open_checkpoint, verify_checklist
    from .config import PRESETS, ConfigError, ModelArgs, preset
    from .generation import GenerationResult, SamplingParams
    from .model import Transformer, estimate_memory, load_model
    from .tokenizer import CodeLlamaTokenizer, IncrementalDetokenizer, InfillingNotSupported
