"""CPU: our GEMV against the fp32-block GEMM over a range of activation rows, for 16-bit and int8 weights.

`linear` / `linear_int8` on CPU run our GEMV up to a number of rows (_C.cpu_gemv_max_rows for 16-bit weights
without a native matmul, _C.cpu_int8_gemv_max_rows for int8) and the fp32-block GEMM above it
(codellama/linear.h; 16-bit weights only on CPUs without AVX512-BF16 / AMX, elsewhere oneDNN takes them above
8 rows and this comparison does not apply). This measures both paths at each row count M, so the thresholds can
be re-checked on another CPU: GEMV at M rows is M rows fed in calls of at most the threshold; blocks at
M <= threshold are timed at threshold + 1 rows (their cost hardly moves with M there; marked `*`). The two alternate for
--rounds rounds (this machine's speed drifts minute to minute); each round keeps the best of 3 calls; medians.

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
    if args.weights == "int8":
        q, s = ops.quantize_int8(w, args.group)
        linear, limit = (lambda x: ops.linear_int8(x, q, s)), _C.cpu_int8_gemv_max_rows
    else:
        linear, limit = (lambda x: ops.linear(x, w)), _C.cpu_gemv_max_rows

    def gemv(x):
        return torch.cat([linear(c) for c in x.split(limit)])

    def blocks(x):
        pad = limit + 1 - x.shape[0]
        return linear(torch.cat([x, x.new_zeros(pad, k)]) if pad > 0 else x)

    print(f"# GEMV vs fp32 blocks on cpu: {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{datetime.date.today()}; {args.weights} weights {k} -> {n}"
          f"{f' (group {args.group})' if args.weights == 'int8' else ''}, bf16 x, shipped threshold {limit} rows")
    print("| rows | GEMV (ms) | blocks (ms) | GEMV / blocks (median of rounds) |")
    print("|---|---|---|---|")
    for m in args.rows:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        a, b = [], []
        for _ in range(args.rounds):
            a.append(best_of(gemv, x))
            b.append(best_of(blocks, x))
        ratio = statistics.median(i / j for i, j in zip(a, b))
        star = "*" if m <= limit else ""
        print(f"| {m} | {statistics.median(a) * 1e3:.1f} | {statistics.median(b) * 1e3:.1f}{star} | {ratio:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
