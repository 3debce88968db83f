"""kv_cache_append, attention_prefill and attention_decode against codellama_ext.reference, on every device.

Cache rows that an op must not read are NaN (poison), so a kernel reading past a sequence shows up as NaN."""

import pytest
import torch

from codellama_ext import ops, reference
from conftest import DTYPES, assert_close_to_baseline, poison

HEADS = [(4, 4), (8, 2), (8, 1), (32, 2)]  # (Hq, Hkv): MHA, GQA, MQA; 16 per kv head: two CPU lane blocks


def i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def qkv_views(tokens, hq, hkv, d, dtype, device):
    """q, k, v as strided views of one fused projection output [T, Hq + 2 Hkv, D] (as the model makes them)."""
    qkv = torch.randn(tokens, hq + 2 * hkv, d, device=device, dtype=dtype)
    return qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]


def filled_cache(batch, cap, hkv, d, dtype, device, lengths):
    """Caches with random rows at positions < lengths[slot] and NaN everywhere else."""
    kc = poison(torch.empty(batch, cap, hkv, d, device=device, dtype=dtype))
    vc = poison(torch.empty_like(kc))
    for slot, n in lengths.items():
        kc[slot, :n] = torch.randn(n, hkv, d, device=device, dtype=dtype)
        vc[slot, :n] = torch.randn(n, hkv, d, device=device, dtype=dtype)
    return kc, vc


def prefill(q, kc, vc, lens, starts, slots, device):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    args = (i32(cu, device), i32(starts, device), i32(slots, device))
    return ops.attention_prefill(q, kc, vc, *args, max(lens)), args


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 6])  # 6: rows of no whole 16-byte vectors (the CUDA kernel's element path)
def test_kv_cache_append_writes_exactly_the_target_rows(device, dtype, d):
    hq, hkv, t = 8, 2, 5
    _, k, v = qkv_views(t, hq, hkv, d, dtype, device)
    kc, vc = filled_cache(3, 16, hkv, d, dtype, device, {})  # all NaN
    slots, positions = [2, 0, 2, 1, 0], [0, 15, 7, 3, 4]
    ops.kv_cache_append(k, v, kc, vc, i32(slots, device), i32(positions, device))
    for i, (s, p) in enumerate(zip(slots, positions)):
        assert torch.equal(kc[s, p], k[i]) and torch.equal(vc[s, p], v[i])
    written = torch.zeros(3, 16, dtype=torch.bool)
    written[slots, positions] = True
    assert torch.isnan(kc[~written.to(device)]).all() and torch.isnan(vc[~written.to(device)]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("lens,starts,slots", [
    ((17,), (0,), (0,)),
    ((130,), (5,), (1,)),  # continuation after a cached prefix of 5 tokens
    ((1, 64, 17), (0, 20, 3), (2, 0, 1)),
    ((1, 1, 40), (90, 7, 33), (0, 2, 1)),  # decode rows' tokens packed with a prompt part (generation.Run)
])
def test_attention_prefill_matches_reference(device, dtype, d, heads, lens, starts, slots):
    hq, hkv = heads
    q, _, _ = qkv_views(sum(lens), hq, hkv, d, dtype, device)
    kc, vc = filled_cache(3, 160, hkv, d, dtype, device, {s: p + n for s, p, n in zip(slots, starts, lens)})
    out, args = prefill(q, kc, vc, lens, starts, slots, device)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    ref = reference.attention_prefill(q, kc, vc, *args)
    truth = reference.attention_prefill(q.double(), kc.double(), vc.double(), *args)
    assert_close_to_baseline(out, ref, truth, floor=1e-5, name=f"prefill {dtype} {heads} D={d} {lens}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS)
def test_attention_decode_matches_reference(device, dtype, d, heads):
    hq, hkv = heads
    seq_lens, slots = [1, 7, 300, 1000], [2, 0, 3, 1]
    q, _, _ = qkv_views(4, hq, hkv, d, dtype, device)
    kc, vc = filled_cache(4, 1024, hkv, d, dtype, device, dict(zip(slots, seq_lens)))
    out = ops.attention_decode(q, kc, vc, i32(slots, device), i32(seq_lens, device))
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    args = (i32(slots, device), i32(seq_lens, device))
    ref = reference.attention_decode(q, kc, vc, *args)
    truth = reference.attention_decode(q.double(), kc.double(), vc.double(), *args)
    assert_close_to_baseline(out, ref, truth, floor=1e-5, name=f"decode {dtype} {heads} D={d}")


@pytest.mark.cuda
def test_attention_decode_full_splits_cuda():
    """Many sequences over a long cache with 8 query heads per kv head: the CUDA split count is set by the
    shared-memory bound on scores (each split exactly 512 keys x 8 heads), not by the parallelism target.
    Only the CUDA kernel splits the cache; the CPU kernel is covered by the sweep above."""
    device, dtype, hq, hkv, d, b, cap = "cuda", torch.float16, 64, 8, 64, 16, 8192
    seq_lens = [1 + (i * 523) % cap for i in range(b)]
    seq_lens[3] = cap
    slots = list(range(b))[::-1]
    q, _, _ = qkv_views(b, hq, hkv, d, dtype, device)
    kc, vc = filled_cache(b, cap, hkv, d, dtype, device, dict(zip(slots, seq_lens)))
    args = (i32(slots, device), i32(seq_lens, device))
    out = ops.attention_decode(q, kc, vc, *args)
    assert_close_to_baseline(out, reference.attention_decode(q, kc, vc, *args),
                             reference.attention_decode(q.double(), kc.double(), vc.double(), *args),
                             floor=1e-5, name="decode full splits")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads,batch", [((32, 32), 1), ((8, 2), 3)])
def test_attention_decode_cpu_head_blocks(threads, heads, batch):
    """The CPU decode splits each sequence's kv heads into one block per thread (uneven with 3 threads: 11, 11,
    10 of 32), walked chunk by chunk; every head still equals the reference."""
    hq, hkv, d, dtype = *heads, 128, torch.bfloat16
    slots, seq_lens = [2, 0, 1][:batch], [300, 77, 1][:batch]
    q, _, _ = qkv_views(batch, hq, hkv, d, dtype, "cpu")
    kc, vc = filled_cache(3, 320, hkv, d, dtype, "cpu", dict(zip(slots, seq_lens)))
    args = (i32(slots, "cpu"), i32(seq_lens, "cpu"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.attention_decode(q, kc, vc, *args)
    finally:
        torch.set_num_threads(before)
    assert_close_to_baseline(out, reference.attention_decode(q, kc, vc, *args),
                             reference.attention_decode(q.double(), kc.double(), vc.double(), *args),
                             floor=1e-5, name=f"decode {heads} x{batch}, {threads} threads")


@pytest.mark.parametrize("heads", [(32, 32), (64, 8)])  # CodeLlama 7B and 34B attention shapes
def test_codellama_sizes(device, heads):
    hq, hkv, d, dtype = *heads, 128, torch.bfloat16
    q, _, _ = qkv_views(40, hq, hkv, d, dtype, device)
    kc, vc = filled_cache(2, 512, hkv, d, dtype, device, {1: 60, 0: 500})
    out, args = prefill(q, kc, vc, [40], [20], [1], device)
    assert_close_to_baseline(out, reference.attention_prefill(q, kc, vc, *args),
                             reference.attention_prefill(q.double(), kc.double(), vc.double(), *args),
                             name=f"prefill {heads}")
    dq = q[:2]
    dargs = (i32([0, 1], device), i32([500, 60], device))
    assert_close_to_baseline(ops.attention_decode(dq, kc, vc, *dargs), reference.attention_decode(dq, kc, vc, *dargs),
                             reference.attention_decode(dq.double(), kc.double(), vc.double(), *dargs),
                             name=f"decode {heads}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_equals_token_by_token_decode(device, dtype):
    """Append + prefill of a whole prompt gives the same rows as appending and decoding one token at a time."""
    hq, hkv, d, n = 8, 2, 64, 21
    q, k, v = qkv_views(n, hq, hkv, d, dtype, device)
    kc, vc = filled_cache(2, 32, hkv, d, dtype, device, {})  # all NaN
    ops.kv_cache_append(k, v, kc, vc, i32([1] * n, device), i32(list(range(n)), device))
    full, _ = prefill(q, kc, vc, [n], [0], [1], device)
    kc2, vc2 = poison(torch.empty_like(kc)), poison(torch.empty_like(vc))
    for i in range(n):
        ops.kv_cache_append(k[i:i + 1], v[i:i + 1], kc2, vc2, i32([1], device), i32([i], device))
        step = ops.attention_decode(q[i:i + 1], kc2, vc2, i32([1], device), i32([i + 1], device))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(step[0], full[i], rtol=tol, atol=tol)
    # chunked prefill: the first 13 tokens, then 8 more continuing at position 13
    first, _ = prefill(q[:13], kc, vc, [13], [0], [1], device)
    rest, _ = prefill(q[13:], kc, vc, [8], [13], [1], device)
    exact = 0 if device == "cpu" else 1e-6  # the CPU kernel computes each row identically: bitwise
    torch.testing.assert_close(torch.cat([first, rest]), full, rtol=exact, atol=exact)


@pytest.mark.cuda
def test_append_and_decode_capture_in_cuda_graph():
    """Launches depend on shapes only: a captured append + decode replays correctly for new lengths."""
    dev, dtype, hq, hkv, d = "cuda", torch.bfloat16, 8, 2, 128
    kc, vc = filled_cache(2, 4096, hkv, d, dtype, dev, {0: 4096, 1: 4096})
    q = torch.randn(2, hq, d, device=dev, dtype=dtype)
    k, v = torch.randn(2, hkv, d, device=dev, dtype=dtype), torch.randn(2, hkv, d, device=dev, dtype=dtype)
    slots, lens = i32([1, 0], dev), i32([100, 3000], dev)
    pos = lens - 1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        ops.kv_cache_append(k, v, kc, vc, slots, pos)
        ops.attention_decode(q, kc, vc, slots, lens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_cache_append(k, v, kc, vc, slots, pos)
        out = ops.attention_decode(q, kc, vc, slots, lens)
    for new_lens in ([1, 7], [4096, 2000]):
        lens.copy_(i32(new_lens, dev))
        pos.copy_(lens - 1)
        graph.replay()
        torch.testing.assert_close(kc[slots.long(), pos.long()], k, rtol=0, atol=0)
        torch.testing.assert_close(out, ops.attention_decode(q, kc, vc, slots, lens), rtol=0, atol=0)


def _setup(device, hq=4, hkv=2, d=64, cap=32):
    q, k, v = qkv_views(3, hq, hkv, d, torch.float32, device)
    kc = torch.zeros(2, cap, hkv, d, device=device)
    return q, k, v, kc, kc.clone()


def test_kv_cache_append_bad_input(device):
    _, k, v, kc, vc = _setup(device)
    sl, pos = i32([0, 1, 0], device), i32([0, 1, 2], device)
    with pytest.raises(ValueError, match=r"positions\[1\] = 40 is beyond the cache length S = 32"):
        ops.kv_cache_append(k, v, kc, vc, sl, i32([0, 40, 2], device))
    with pytest.raises(ValueError, match=r"positions\[0\] = -1 must be at least 0"):
        ops.kv_cache_append(k, v, kc, vc, sl, i32([-1, 1, 2], device))
    with pytest.raises(ValueError, match=r"slots\[2\] = 2 is beyond the number of cache slots Bc = 2"):
        ops.kv_cache_append(k, v, kc, vc, i32([0, 1, 2], device), pos)
    with pytest.raises(ValueError, match="slots must be Int"):
        ops.kv_cache_append(k, v, kc, vc, sl.long(), pos)
    with pytest.raises(ValueError, match=r"positions.shape\[0\] must equal"):
        ops.kv_cache_append(k, v, kc, vc, sl, pos[:2])
    with pytest.raises(ValueError, match="k must have the dtype of k_cache"):
        ops.kv_cache_append(k.half(), v.half(), kc, vc, sl, pos)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        ops.kv_cache_append(k, v[:2], kc, vc, sl, pos)
    with pytest.raises(ValueError, match=r"k.shape\[1\] must equal the kv heads of k_cache"):
        ops.kv_cache_append(k[:, :1], v[:, :1], kc, vc, sl, pos)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        ops.kv_cache_append(k, v, kc.transpose(0, 1), vc.transpose(0, 1), sl, pos)
    with pytest.raises(ValueError, match="k must have a contiguous last dimension"):
        ops.kv_cache_append(k.transpose(1, 2).contiguous().transpose(1, 2), v, kc, vc, sl, pos)
    with pytest.raises(ValueError, match="v_cache must have the shape of k_cache"):
        ops.kv_cache_append(k, v, kc, vc[:1], sl, pos)
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        ops.kv_cache_append(k, v, kc[0], vc[0], sl, pos)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on the device of k"):
            ops.kv_cache_append(k, v, kc.cuda(), vc.cuda(), sl, pos)


def test_attention_prefill_bad_input(device):
    q, _, _, kc, vc = _setup(device)
    cu, sp, sl = i32([0, 1, 3], device), i32([0, 4], device), i32([1, 0], device)
    ops.attention_prefill(q, kc, vc, cu, sp, sl, 2)  # valid
    with pytest.raises(ValueError, match="number of heads in key/value must divide number of heads in query"):
        ops.attention_prefill(q[:, :3], kc, vc, cu, sp, sl, 2)
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\] must equal the number of tokens in q"):
        ops.attention_prefill(q, kc, vc, i32([0, 1, 2], device), sp, sl, 2)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        ops.attention_prefill(q, kc, vc, i32([0, 4, 3], device), sp, sl, 4)
    with pytest.raises(ValueError, match="cu_seqlens\\[0\\] must be 0"):
        ops.attention_prefill(q, kc, vc, i32([1, 1, 3], device), sp, sl, 2)
    with pytest.raises(ValueError, match="more than max_query_len"):
        ops.attention_prefill(q, kc, vc, cu, sp, sl, 1)
    with pytest.raises(ValueError, match="max_query_len must be >= 0"):
        ops.attention_prefill(q, kc, vc, cu, sp, sl, -1)
    with pytest.raises(ValueError, match=r"start_pos\[1\] \+ its length \(31 \+ 2\) is beyond the cache length S = 32"):
        ops.attention_prefill(q, kc, vc, cu, i32([0, 31], device), sl, 2)
    with pytest.raises(ValueError, match=r"start_pos\[0\] = -2 must be at least 0"):
        ops.attention_prefill(q, kc, vc, cu, i32([-2, 0], device), sl, 2)
    with pytest.raises(ValueError, match=r"slots\[0\] = 5 is beyond the number of cache slots"):
        ops.attention_prefill(q, kc, vc, cu, sp, i32([5, 0], device), 2)
    with pytest.raises(ValueError, match=r"start_pos.shape\[0\] must equal"):
        ops.attention_prefill(q, kc, vc, cu, sp[:1], sl, 2)
    with pytest.raises(ValueError, match="cu_seqlens must be Int"):
        ops.attention_prefill(q, kc, vc, cu.long(), sp, sl, 2)
    with pytest.raises(ValueError, match=r"q.shape\[2\] must equal the head_dim of k_cache"):
        ops.attention_prefill(q[..., :8], kc, vc, cu, sp, sl, 2)
    with pytest.raises(ValueError, match="q must have the dtype of k_cache"):
        ops.attention_prefill(q.half(), kc, vc, cu, sp, sl, 2)
    with pytest.raises(ValueError, match="q must be 3-D"):
        ops.attention_prefill(q[0], kc, vc, cu, sp, sl, 2)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        ops.attention_prefill(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, cu, sp, sl, 2)
    with pytest.raises(ValueError, match="k_cache must be float32, float16 or bfloat16"):
        ops.attention_prefill(q, kc.int(), vc.int(), cu, sp, sl, 2)
    head_dim_rule = "must be 64 or 128 on CUDA" if device == "cuda" else "multiple of 8 in \\[8, 256\\] on the CPU"
    with pytest.raises(ValueError, match=head_dim_rule):
        ops.attention_prefill(q[..., :12], kc[..., :12].contiguous(), vc[..., :12].contiguous(), cu, sp, sl, 2)


def test_attention_decode_bad_input(device):
    q, _, _, kc, vc = _setup(device)
    sl, ln = i32([1, 0, 1], device), i32([1, 32, 5], device)
    ops.attention_decode(q, kc, vc, sl, ln)  # valid
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 0 must be in \[1, S\] with S = 32"):
        ops.attention_decode(q, kc, vc, sl, i32([1, 0, 5], device))
    with pytest.raises(ValueError, match=r"seq_lens\[2\] = 33 must be in \[1, S\]"):
        ops.attention_decode(q, kc, vc, sl, i32([1, 2, 33], device))
    with pytest.raises(ValueError, match=r"slots\[1\] = 7 is beyond the number of cache slots Bc = 2"):
        ops.attention_decode(q, kc, vc, i32([1, 7, 0], device), ln)
    with pytest.raises(ValueError, match=r"seq_lens.shape\[0\] must equal"):
        ops.attention_decode(q, kc, vc, sl, ln[:2])
    with pytest.raises(ValueError, match="number of heads in key/value must divide"):
        ops.attention_decode(q[:, :3], kc, vc, sl, ln)
    with pytest.raises(ValueError, match="v_cache must have the dtype of k_cache"):
        ops.attention_decode(q, kc, vc.half(), sl, ln)
    with pytest.raises(ValueError, match="seq_lens must be Int"):
        ops.attention_decode(q, kc, vc, sl, ln.long())
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on the device of q"):
            ops.attention_decode(q, kc.cuda(), vc.cuda(), sl, ln)


def test_attention_opcheck():
    q, k, v = qkv_views(5, 4, 2, 16, torch.float32, "cpu")
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    sl, pos = i32([0, 0, 1, 1, 1], "cpu"), i32([0, 1, 0, 1, 2], "cpu")
    torch.library.opcheck(torch.ops.codellama.kv_cache_append.default, (k, v, kc, vc, sl, pos))
    args = (i32([0, 2, 5], "cpu"), i32([0, 1], "cpu"), i32([0, 1], "cpu"), 3, 0.25)
    torch.library.opcheck(torch.ops.codellama.attention_prefill.default, (q.contiguous(), kc, vc, *args))
    torch.library.opcheck(torch.ops.codellama.attention_decode.default,
                          (q[:2].contiguous(), kc, vc, i32([1, 0], "cpu"), i32([4, 8], "cpu"), 0.25))
