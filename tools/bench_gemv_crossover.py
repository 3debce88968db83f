"""CPU: our GEMV against the GEMM path over a range of activation rows, for bf16 and int8 weights (bf16 x).

`linear` / `linear_int8` on CPU run our GEMV up to a number of rows (on this CPU: _C.cpu_gemv_max_rows) and a
GEMM above it (codellama/linear.h: fp32 sgemm on converted blocks of W where the CPU has no native
bf16 matmul; oneDNN, on bf16 blocks for int8 weights, with AMX-BF16; oneDNN above 8 rows with AVX512-BF16 alone).
This measures both paths at each row count M, so the thresholds can be re-checked on another CPU: GEMV at M rows is
M rows fed in calls of at most the threshold; the GEMM at M <= threshold is timed at threshold + 1 rows (its cost
hardly moves with M there; marked `*`). The two alternate for --rounds rounds (this machine's speed drifts minute
to minute); each round keeps the best of 3 calls; medians.

    PYTHONPATH=. python tools/bench_gemv_crossover.py --weights int8 --shape 4096 11008 --rows 32 64 96 128
"""
import argparse
import datetime
import statistics
import time

import torch

from codellama_ext import _C, ops


def best_of(fn, x, reps=3):
    fn(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", choices=["bf16", "int8"], default="int8")
    p.add_argument("--group", type=int, default=0, help="int8 group size (0: one scale per row, as the model)")
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 11008], metavar=("K", "N"))
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 48, 64, 96, 128])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if any(m < 1 for m in args.rows) or args.rounds < 1:
        p.error("--rows and --rounds must be positive")
    torch.manual_seed(0)
    k, n = args.shape
    w = torch.randn(n, k, dtype=torch.bfloat16) / k ** 0.5
    int8 = args.weights == "int8"
    q, s = ops.quantize_int8(w, args.group) if int8 else (None, None)

    def linear(x):
        return ops.linear_int8(x, q, s) if int8 else ops.linear(x, w)
    groups = k // args.group if int8 and args.group else 1
    limit = _C.cpu_gemv_max_rows("bfloat16", int8, n=n, k=k, groups=groups)

    def gemv(x):
        return torch.cat([linear(c) for c in x.split(limit)])

    def gemm(x):
        pad = limit + 1 - x.shape[0]
        return linear(torch.cat([x, x.new_zeros(pad, k)]) if pad > 0 else x)

    print(f"# GEMV vs GEMM on cpu: {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{datetime.date.today()}; {args.weights} weights {k} -> {n}"
          f"{f' (group {args.group})' if args.weights == 'int8' else ''}, bf16 x, shipped threshold {limit} rows")
    print("| rows | GEMV (ms) | GEMM (ms) | GEMV / GEMM (median of rounds) |")
    print("|---|---|---|---|")
    for m in args.rows:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        a, b = [], []
        for _ in range(args.rounds):
            a.append(best_of(gemv, x))
            b.append(best_of(gemm, x))
        ratio = statistics.median(i / j for i, j in zip(a, b))
        star = "*" if m <= limit else ""
        print(f"| {m} | {statistics.median(a) * 1e3:.1f} | {statistics.median(b) * 1e3:.1f}{star} | {ratio:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
