"""Kernel benchmarks: each op against its plain-torch equivalent in the same run, with the achieved
bandwidth (or FLOP rate) as a share of the machine's ceiling, measured here too.

    python tools/bench_kernels.py [--device cpu|cuda] [--only NAME ...]

Prints a markdown table (paste it into benchmarks/RESULTS.md with the machine and date).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from typing import Callable

import torch

import codellama_ext  # noqa: F401
from codellama_ext import ops

BENCHES: dict[str, Callable] = {}


def bench(name):
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable, device: str, min_time: float = 0.3, warmup: int = 3) -> float:
    """Median seconds per call over repeated batches lasting at least min_time in all."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    total = 0.0
    while total < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHES)}")
    args = p.parse_args()
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
