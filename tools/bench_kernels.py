"""Kernel benchmarks: each op against its plain-torch equivalent in the same run, with the achieved
bandwidth (or FLOP rate) as a share of the machine's ceiling, measured here too.

    python tools/bench_kernels.py [--device cpu|cuda] [--only NAME ...]

Prints a markdown table (paste it into benchmarks/RESULTS.md with the machine and date).

On CPU the script re-runs itself with glibc's mmap and trim thresholds raised (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_; both sides, ours and torch, run under them): otherwise every output of more than a few
MiB is a fresh mmap whose pages fault in on first write, and that, not the kernel, dominates the large shapes
(an fp16 RMSNorm of 2048 x 8192 took 20.5 ms per call that way, 4.4 ms with heap reuse). Pass
--fresh-allocations to measure with the process's own settings.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Callable

import torch

import codellama_ext  # noqa: F401
from codellama_ext import ops

BENCHES: dict[str, Callable] = {}
# glibc: serve allocations up to 1 GiB from the heap and keep up to 4 GiB of freed heap (see the docstring)
_MALLOC_ENV = (("MALLOC_MMAP_THRESHOLD_", str(1 << 30)), ("MALLOC_TRIM_THRESHOLD_", str(1 << 32)))


def bench(name):
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def timeit(fn: Callable, device: str, min_time: float = 0.3, warmup: int = 3) -> float:
    """Seconds per call. CPU: the median of repeated calls lasting at least min_time in all. CUDA: GPU time (see
    _gpu_time), so that the kernels are compared, not Python's launch overhead."""
    if device == "cuda":
        return _gpu_time(fn)
    for _ in range(warmup):
        fn()
    times = []
    total = 0.0
    while total < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    times.sort()
    return times[len(times) // 2]


def _gpu_time(fn: Callable, reps: int = 20, trials: int = 9) -> float:
    """Median over trials of (CUDA-event time of `reps` back-to-back calls) / reps. The calls are captured in one
    CUDA graph and replayed, as a captured decode step runs them; a callable that cannot be captured (it syncs
    with the host) is timed as an eager burst instead, launch overhead included. Inputs smaller than the L2
    cache stay in it across calls: shares of HBM bandwidth above ~100% mean exactly that."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        def run():
            for _ in range(reps):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / reps)
    times.sort()
    return times[len(times) // 2]


def read_bandwidth(device: str) -> float:
    """Bytes/s of a streaming read (torch sum over 1 GiB on CUDA, 256 MiB on CPU): the ceiling we compare to."""
    n = (1 << 28) if device == "cuda" else (1 << 26)
    x = torch.ones(n, dtype=torch.float32, device=device)
    t = timeit(lambda: x.sum(), device)
    return n * 4 / t


def row(name, ours, peer, nbytes=None, flops=None, ceiling_bw=None, ceiling_flops=None):
    ratio = peer / ours
    line = f"| {name} | {ours * 1e6:.1f} | {peer * 1e6:.1f} | {ratio:.2f}x |"
    if nbytes is not None:
        bw = nbytes / ours
        line += f" {bw / 1e9:.1f} GB/s ({100 * bw / ceiling_bw:.0f}% of read bw) |"
    elif flops is not None:
        rate = flops / ours
        share = f" ({100 * rate / ceiling_flops:.0f}% of peak)" if ceiling_flops else ""
        line += f" {rate / 1e12:.2f} TFLOP/s{share} |"
    else:
        line += " |"
    print(line, flush=True)


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@bench("rms_norm")
def bench_rms_norm(device, ctx):
    from codellama_ext import reference
    for rows, dim, dtype in [(1, 4096, torch.bfloat16), (64, 4096, torch.bfloat16), (2048, 4096, torch.bfloat16),
                             (2048, 8192, torch.float16)]:
        x = torch.randn(rows, dim, device=device, dtype=dtype)
        w = torch.randn(dim, device=device, dtype=dtype)
        ours = timeit(lambda: ops.rms_norm(x, w, 1e-5), device)
        peer = timeit(lambda: reference.rms_norm(x, w, 1e-5), device)
        row(f"rms_norm {rows}x{dim} {str(dtype)[6:]}", ours, peer, nbytes=2 * nbytes(x) + nbytes(w),
            ceiling_bw=ctx["bw"])


@bench("attention")
def bench_attention(device, ctx):
    """Decode at batch 1 (7B: Hq = Hkv = 32, D = 128, over 4k / 16k cached tokens; 34B / 70B: Hq = 64, Hkv = 8,
    over 4k), bytes = K + V read; causal prefill (TFLOP/s with 4 * T * T / 2 * Hq * D flops). Peer: torch SDPA over
    views of the same cache."""
    import torch.nn.functional as F
    dtype, h, d = torch.bfloat16, 32, 128
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    for n, hq, hkv in [(4096, h, h), (16384, h, h), (4096, 64, 8)]:
        kc = torch.randn(1, n, hkv, d, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        q = torch.randn(1, hq, d, device=device, dtype=dtype)
        k4, v4 = kc[0].transpose(0, 1)[None], vc[0].transpose(0, 1)[None]  # [1, Hkv, n, D] views
        slot, seq_len = i32(0), i32(n)
        ours = timeit(lambda: ops.attention_decode(q, kc, vc, slot, seq_len), device)
        peer = timeit(lambda: F.scaled_dot_product_attention(q[:, :, None], k4, v4, enable_gqa=hq != hkv), device)
        heads = f"H={hq}" if hq == hkv else f"H={hq}/{hkv}"
        row(f"attention_decode b=1 len={n} {heads} D={d} bf16", ours, peer, nbytes=nbytes(kc, vc),
            ceiling_bw=ctx["bw"])
    t = 2048 if device == "cuda" else 512  # CPU: small enough to finish in seconds
    kc = torch.randn(1, t, h, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(t, h, d, device=device, dtype=dtype)
    q4, k4, v4 = q.transpose(0, 1)[None], kc[0].transpose(0, 1)[None], vc[0].transpose(0, 1)[None]
    cu, zero = i32(0, t), i32(0)
    ours = timeit(lambda: ops.attention_prefill(q, kc, vc, cu, zero, zero, t), device)
    peer = timeit(lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True), device)
    row(f"attention_prefill T={t} H={h} D={d} causal bf16", ours, peer, flops=4 * t * t / 2 * h * d,
        ceiling_flops=ctx["flops"])



@bench("linear")
def bench_linear(device, ctx):
    """Decode GEMVs (bytes of weights vs read bandwidth) and a prefill GEMM (FLOP rate), bf16/fp16 and int8.
    int8 peer: torch._weight_int8pack_mm (per-row scales) where torch has it, else dequantise + F.linear."""
    import torch.nn.functional as F
    from codellama_ext import reference
    n, k = 11008, 4096
    for m, dtype in [(1, torch.bfloat16), (1, torch.float16), (8, torch.bfloat16), (128, torch.bfloat16)]:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
        ours = timeit(lambda: ops.linear(x, w), device)
        peer = timeit(lambda: F.linear(x, w), device)
        name = f"linear {m}x{k} -> {n} {str(dtype)[6:]}"
        if m <= 8:
            row(name, ours, peer, nbytes=nbytes(x, w), ceiling_bw=ctx["bw"])
        else:
            row(name, ours, peer, flops=2 * m * n * k, ceiling_flops=ctx["flops"])
        for group in (0, 128):
            q, s = ops.quantize_int8(w, group)
            ours = timeit(lambda: ops.linear_int8(x, q, s), device)
            if group == 0 and hasattr(torch, "_weight_int8pack_mm") and device == "cpu":
                s1 = s[:, 0].to(dtype)
                peer = timeit(lambda: torch._weight_int8pack_mm(x, q, s1), device)
                peer_name = "int8pack_mm"
            else:
                peer = timeit(lambda: F.linear(x, reference.dequantize_int8(q, s, dtype)), device)
                peer_name = "dequant+linear"
            name = f"linear_int8 g{group} {m}x{k} -> {n} {str(dtype)[6:]} (torch: {peer_name})"
            if m <= 8:
                row(name, ours, peer, nbytes=nbytes(x, q, s), ceiling_bw=ctx["bw"])
            else:
                row(name, ours, peer, flops=2 * m * n * k, ceiling_flops=ctx["flops"])


@bench("rotary")
def bench_rotary(device, ctx):
    from codellama_ext import reference
    for t, hq, hkv, dtype, inter in [(1, 32, 32, torch.bfloat16, True), (2048, 32, 32, torch.bfloat16, True),
                                     (2048, 32, 32, torch.bfloat16, False), (2048, 64, 8, torch.float16, True)]:
        q = torch.randn(t, hq, 128, device=device, dtype=dtype)
        k = torch.randn(t, hkv, 128, device=device, dtype=dtype)
        pos = torch.arange(t, device=device, dtype=torch.int32) + 100
        ours = timeit(lambda: ops.rotary_embedding(q, k, pos, 1e6, inter), device)
        peer = timeit(lambda: reference.rotary_embedding(q, k, pos, 1e6, inter), device)
        row(f"rotary {t}x{hq}/{hkv}x128 {str(dtype)[6:]} {'meta' if inter else 'hf'}", ours, peer,
            nbytes=2 * nbytes(q, k) + nbytes(pos), ceiling_bw=ctx["bw"])


@bench("silu_and_mul")
def bench_silu_and_mul(device, ctx):
    from codellama_ext import reference
    for rows, f, dtype in [(1, 11008, torch.bfloat16), (2048, 11008, torch.bfloat16), (512, 22016, torch.float16)]:
        x = torch.randn(rows, 2 * f, device=device, dtype=dtype)
        ours = timeit(lambda: ops.silu_and_mul(x), device)
        peer = timeit(lambda: reference.silu_and_mul(x), device)
        row(f"silu_and_mul {rows}x{f} {str(dtype)[6:]}", ours, peer, nbytes=nbytes(x) * 3 // 2, ceiling_bw=ctx["bw"])


@bench("sampling")
def bench_sampling(device, ctx):
    for b, v, shape in [(1, 32016, "wide"), (16, 32016, "wide"), (1, 32016, "peaked"), (16, 32016, "peaked")]:
        # wide: randn x 3, a top-p 0.95 nucleus of thousands of tokens; peaked: as a language model's next token
        # usually is, 20 tokens 15 above the rest hold ~99% of the mass at temperature 0.8
        logits = torch.randn(b, v, device=device) * 3
        if shape == "peaked":
            top = torch.randint(0, v, (b, 20), device=device)
            logits.scatter_add_(1, top, torch.full((b, 20), 15.0, device=device))
        t = torch.full((b,), 0.8, device=device)
        k = torch.full((b,), 0, dtype=torch.int32, device=device)
        p = torch.full((b,), 0.95, device=device)
        u = torch.rand(b, device=device)
        if shape == "wide":  # the argmax does not depend on the shape
            ours = timeit(lambda: ops.argmax(logits), device)
            peer = timeit(lambda: torch.argmax(logits, -1), device)
            row(f"argmax {b}x{v} f32", ours, peer, nbytes=nbytes(logits), ceiling_bw=ctx["bw"])

        def torch_top_p():  # Meta's sample_top_p with an explicit uniform instead of multinomial
            probs = torch.softmax(logits / t[:, None], dim=-1)
            ps, pi = torch.sort(probs, dim=-1, descending=True)
            cs = torch.cumsum(ps, dim=-1)
            ps[(cs - ps) > p[:, None]] = 0.0
            cdf = ps.cumsum(-1)
            j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(v - 1)
            return torch.gather(pi, -1, j)

        ours = timeit(lambda: ops.sample(logits, t, k, p, u), device)
        peer = timeit(torch_top_p, device)
        row(f"sample top-p 0.95 {b}x{v} f32 {shape}", ours, peer, nbytes=nbytes(logits), ceiling_bw=ctx["bw"])
        k.fill_(50)
        ours = timeit(lambda: ops.sample(logits, t, k, p, u), device)
        row(f"sample top-k 50 + top-p {b}x{v} f32 {shape} (torch: top-p only)", ours, peer, nbytes=nbytes(logits),
            ceiling_bw=ctx["bw"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHES)}")
    p.add_argument("--fresh-allocations", action="store_true",
                   help="CPU: keep glibc's default thresholds (large outputs page-fault on every call)")
    args = p.parse_args()
    if args.device == "cpu" and not args.fresh_allocations and _MALLOC_ENV[0][0] not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | dict(_MALLOC_ENV))
    torch.manual_seed(0)
    ctx = {"bw": read_bandwidth(args.device)}
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        # dense bf16 tensor-core peak, measured: a large torch matmul (cuBLAS)
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ctx["flops"] = 2 * 8192 ** 3 / timeit(lambda: a @ a, "cuda")
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        ctx["flops"] = None
    print(f"# bench_kernels on {args.device}: {name}, torch {torch.__version__}, {datetime.date.today()}")
    if args.device == "cpu":
        print("# allocations: " + (", ".join(f"{k}={os.environ[k]}" for k, _ in _MALLOC_ENV if k in os.environ)
                                   or "glibc defaults (fresh pages for large outputs)"))
    print(f"# measured read bandwidth: {ctx['bw'] / 1e9:.1f} GB/s"
          + (f"; measured bf16 matmul peak {ctx['flops'] / 1e12:.0f} TFLOP/s" if ctx["flops"] else ""))
    print("| op / shape | ours (us) | torch (us) | speed-up | achieved |")
    print("|---|---|---|---|---|")
    for name_, fn in BENCHES.items():
        if args.only and name_ not in args.only:
            continue
        fn(args.device, ctx)


if __name__ == "__main__":
    main()
