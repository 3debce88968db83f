"""Typed Python wrappers of the `torch.ops.codellama` kernels, and their fake (meta) implementations.

Every op validates its inputs in C++ (a ValueError naming the argument and the rule). The fakes only
describe output shapes and dtypes, so the ops trace under torch.compile and `torch.library.opcheck`.
The pure-torch definition of each op, which the tests use as the oracle, is in `codellama_ext.reference`.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.codellama)

_ops = torch.ops.codellama


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., dim], weight [dim] -> [..., dim]."""
    return _ops.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to the activation dtype first."""
    return _ops.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
                     interleaved: bool) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place at positions [T]; interleaved=True is Meta's layout."""
    _ops.rotary_embedding(q, k, positions, theta, interleaved)


def kv_cache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor, positions: torch.Tensor) -> None:
    """Writes k, v [T, Hkv, D] into caches [B, S, Hkv, D] at (slots[t], positions[t])."""
    _ops.kv_cache_append(k, v, k_cache, v_cache, slots, positions)


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                      start_pos: torch.Tensor, slots: torch.Tensor, max_query_len: int,
                      scale: float | None = None) -> torch.Tensor:
    """Causal GQA of packed queries q [T, Hq, D] over the cache; see the schema in python/bindings.cpp."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ops.attention_prefill(q, k_cache, v_cache, cu_seqlens, start_pos, slots, max_query_len, scale)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One query per sequence q [B, Hq, D] over cache[slots[b], :seq_lens[b]] -> [B, Hq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ops.attention_decode(q, k_cache, v_cache, slots, seq_lens, scale)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :F]) * x[..., F:] for x [..., 2F]."""
    return _ops.silu_and_mul(x)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T -> [..., N]."""
    return _ops.linear(x, weight)


def quantize_int8(weight: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight [N, K] -> (int8 [N, K], float32 scales [N, K // group_size or 1])."""
    return _ops.quantize_int8(weight, group_size)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (qweight * scales)^T -> [..., N] in x's dtype."""
    return _ops.linear_int8(x, qweight, scales)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight)) (linear_int8 with scales): x [..., K], weight [2F, K] -> [..., F]."""
    return _ops.linear_silu_and_mul(x, weight, scales)


def decoder_layers(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor], k_cache: torch.Tensor,
                   v_cache: torch.Tensor, positions: torch.Tensor, token_slots: torch.Tensor, slots: torch.Tensor, *,
                   seq_lens: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                   start_pos: torch.Tensor | None = None, max_query_len: int = 0, eps: float = 1e-5,
                   theta: float = 1e6, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer over x [T, dim] in one call (see the schema in python/bindings.cpp): decode with
    seq_lens, prefill with cu_seqlens / start_pos / max_query_len -> (last layer's output, residual before it)."""
    return _ops.decoder_layers(x, weights, scales, k_cache, v_cache, positions, token_slots, slots, seq_lens,
                               cu_seqlens, start_pos, max_query_len, eps, theta, interleaved)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """First index of the maximum of each row: logits [B, V] -> [B] int64."""
    return _ops.argmax(logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor) -> torch.Tensor:
    """Per-row temperature / top-k / top-p sampling at the given uniform numbers: [B, V] -> [B] int64."""
    return _ops.sample(logits, temperature, top_k, top_p, uniform)


def sample_with_generator(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`sample` with the uniforms drawn on logits' device from `generator` (no host synchronisation)."""
    uniform = torch.rand(logits.shape[0], device=logits.device, dtype=torch.float32, generator=generator)
    return _ops.sample(logits, temperature, top_k, top_p, uniform)


# ---- fake implementations: output shapes and dtypes only ----

@torch.library.register_fake("codellama::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("codellama::fused_add_rms_norm")
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("codellama::rotary_embedding")
def _(q, k, positions, theta, interleaved):
    return None


@torch.library.register_fake("codellama::kv_cache_append")
def _(k, v, k_cache, v_cache, slots, positions):
    return None


@torch.library.register_fake("codellama::attention_prefill")
def _(q, k_cache, v_cache, cu_seqlens, start_pos, slots, max_query_len, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("codellama::attention_decode")
def _(q, k_cache, v_cache, slots, seq_lens, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("codellama::silu_and_mul")
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("codellama::linear")
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("codellama::quantize_int8")
def _(weight, group_size):
    n, k = weight.shape
    groups = 1 if group_size == 0 else k // group_size
    return weight.new_empty((n, k), dtype=torch.int8), weight.new_empty((n, groups), dtype=torch.float32)


@torch.library.register_fake("codellama::linear_int8")
def _(x, qweight, scales):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("codellama::linear_silu_and_mul")
def _(x, weight, scales):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


@torch.library.register_fake("codellama::decoder_layers")
def _(x, weights, scales, k_cache, v_cache, positions, token_slots, slots, seq_lens, cu_seqlens, start_pos,
      max_query_len, eps, theta, interleaved):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("codellama::argmax")
def _(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("codellama::sample")
def _(logits, temperature, top_k, top_p, uniform):
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)
