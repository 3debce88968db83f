"""codellama_ext: a fast, small, dependable engine for Meta's CodeLlama models."""

from . import ops, reference

__all__ = ["ops", "reference"]
