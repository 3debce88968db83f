"""The registered ops trace under torch.compile (fake implementations, mutation annotations) with no graph
breaks, and the compiled function computes what eager does. The CUDA graph capture of the decode ops is
tested in tests/test_attention.py on a GPU."""

import pytest
import torch

from codellama_ext import ops


def _layer(x, w_norm, wqkv, w13, cache_k, cache_v, pos, slots, seq_lens, qi, q_scales):
    # A decode step's op sequence: norm, fused QKV GEMV, RoPE, cache append, attention, SiLU gate, int8 linear.
    T, D = x.shape
    h = ops.rms_norm(x, w_norm, 1e-5)
    qkv = ops.linear(h, wqkv).view(T, 3, 2, D // 2)
    q, k, v = qkv[:, 0].contiguous(), qkv[:, 1].contiguous(), qkv[:, 2].contiguous()
    ops.rotary_embedding(q, k, pos, 1e6, True)
    ops.kv_cache_append(k, v, cache_k, cache_v, slots, pos)
    attn = ops.attention_decode(q, cache_k, cache_v, slots, seq_lens).reshape(T, D)
    out, res = ops.fused_add_rms_norm(attn, x, w_norm, 1e-5)
    g = ops.silu_and_mul(ops.linear(out, w13))
    y = ops.linear_int8(g, qi, q_scales) + res
    return ops.argmax(y), y


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_ops_compile_fullgraph(backend):
    torch.manual_seed(0)
    D, F, T, S = 32, 48, 2, 8
    x = torch.randn(T, D)
    w_norm = torch.rand(D) + 0.5
    wqkv = torch.randn(3 * D, D) / D ** 0.5
    w13 = torch.randn(2 * F, D) / D ** 0.5
    qi, q_scales = ops.quantize_int8(torch.randn(D, F) / F ** 0.5, 0)
    pos = torch.tensor([3, 5], dtype=torch.int32)
    slots = torch.tensor([0, 1], dtype=torch.int32)
    seq_lens = pos + 1

    def run(fn):
        ck = torch.zeros(2, S, 2, D // 2)
        cv = torch.zeros(2, S, 2, D // 2)
        ids, y = fn(x, w_norm, wqkv, w13, ck, cv, pos, slots, seq_lens, qi, q_scales)
        return ids, y, ck, cv

    eager = run(_layer)
    compiled = run(torch.compile(_layer, backend=backend, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    assert eager[2].abs().sum() > 0  # the cache mutation survived compilation
