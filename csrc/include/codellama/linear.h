// Linear layers: y = x W^T, in the activation dtype or with symmetric int8 weights (weight-only quantisation).
//   linear:        y[m, n] = round( sum_k x[m, k] * w[n, k] )                         (fp32 accumulation)
//   quantize_int8: s[n, g] = max_{k in g} |w[n, k]| / 127 (1 for an all-zero group);
//                  q[n, k] = clamp(round_half_even(w[n, k] / s[n, g(k)]), -127, 127)
//   linear_int8:   y[m, n] = round( sum_g s[n, g] * sum_{k in g} x[m, k] * q[n, k] )  (fp32 accumulation)
// `round` is one rounding to the activation dtype at the end (identity for fp32): the order of
// torch.nn.functional.linear on x.float(), w.float() (codellama_ext/reference.py), up to summation order.
// One exception, linear_int8 with bf16/fp16 x on the GEMV path, CPU (AVX2 builds, K % 16 == 0) and CUDA (K %
// 128 == 0, 16-byte aligned rows, M * K * 2 + M * K / 32 bytes <= 48 KiB: 7B's K = 11008 up to 2 rows), each with
// group_size 0 or a multiple of 128: x[m, k] is first rounded to int16 steps of max|x| / 32767 over its 128-column
// block (the same rule on both), an error below the input dtype's own rounding for all but the block's smallest
// elements (csrc/cpu/linear.cpp), and the dots are integer. A call (CUDA) or chunk of 8 rows (CPU) holding a
// block with 0 < max|x| < 2^-64 takes the fp32 route (an int16 scale that small is subnormal).
// Groups: g(k) = k / group_size; group_size 0 means one group per row (G = 1). G = K / group_size.
//
// Dispatch rule (python/ops/linear.cpp): M = number of rows of x (x.numel() / K).
//   M <= kGemvMaxRows (8): the GEMV kernels below (decode: memory-bound, each weight row is read once and
//                          dotted with all M activation rows).
//   M >  kGemvMaxRows:     a GEMM from the binding layer: at::matmul (cuBLAS tensor cores / oneDNN); for int8
//                          the weights are first dequantised to the activation dtype (dequantize_int8 below).
//                          Exceptions: on CPU, int8 weights, and 16-bit ones where the CPU has no native
//                          bf16/fp16 matmul, use the GEMV up to kCpuGemvMaxRows (48) rows (int8:
//                          kCpuInt8GemvMaxRows, 64) and above it fp32 sgemm on blocks of W converted to fp32;
//                          on a CPU with AMX-BF16, bf16 x takes oneDNN above kCpuAmxGemvMaxRows (4) rows, with
//                          int8 weights above kCpuAmxInt8GemvMaxRows (12) on blocks dequantised to bf16,
//                          as y^T = W x^T up to kCpuAmxTransposedMaxRows (256) rows; int8 weights whose
//                          products run on AMX-INT8 tiles (linear_int8_on_tiles, from kCpuInt8TilesMinRows
//                          (5) rows) keep the GEMV up to kCpuInt8TilesMaxRows (64) rows;
//                          unquantised weights on CUDA use the GEMV for M <= kCudaGemvMaxRows (1) only. The
//                          binding (python/ops/linear.cpp) has the details.
// The GEMV kernels accept any M (the CPU ones process rows in chunks of 8), but are tuned for M <= 8.
#pragma once

#include <cstdint>

#include "codellama/common.h"
#include "codellama/stream.h"

namespace codellama {

constexpr int64_t kGemvMaxRows = 8;
// CUDA, unquantised weights: above one row cuBLAS beats our GEMV (H200: 0.62x at 8 rows; benchmarks/RESULTS.md).
constexpr int64_t kCudaGemvMaxRows = 1;
// CPU, 16-bit weights without a native matmul / int8 weights: above this many rows the fp32-block GEMM beats our
// GEMV. 2-core EPYC, bf16 x, medians of GEMV / blocks time ratios over all runs (tools/bench_gemv_crossover.py,
// benchmarks/RESULTS.md): bf16 W 0.52-0.71 at 32 rows, 0.80-1.02 at 48, 0.82-1.29 at 64; int8 W (per-row and
// group 128) 0.61-0.97 at 64, 0.74-0.91 at 80 (three runs), 0.85-1.06 at 96, 0.90-1.08 at 128. 16-bit: the
// largest count with no run behind; int8: 64, kept below the ~96-128 tie with a margin for this VM's noise.
constexpr int64_t kCpuGemvMaxRows = 48;
constexpr int64_t kCpuInt8GemvMaxRows = 64;
// CPU with AMX-BF16, bf16 x: oneDNN's bf16 GEMM reads W at the memory bandwidth up to at least 16 rows, while our
// GEMV (AVX2 FMAs) turns compute-bound past 4. 2-core Xeon with AMX, W cycled through more than the L3 (2048 ->
// 5632 and 4096 -> 11008): GEMV / oneDNN time 0.86 and 1.07 at 4 rows, 1.33 and 1.38 at 6, 1.53 and 1.57 at 8.
// int8 W: the GEMM on blocks dequantised to bf16 costs about the same from 13 to 32 rows (2.0-2.4 ms, 7.4-8.4 ms),
// the GEMV 1.9 and 7.4 ms at 12 rows (benchmarks/RESULTS.md, session 16).
constexpr int64_t kCpuAmxGemvMaxRows = 4;
constexpr int64_t kCpuAmxInt8GemvMaxRows = 12;
// CPU with AMX-BF16, bf16 x, the GEMM rows: up to this many, oneDNN computes y^T = W x^T (then transposed back),
// where for y = x W^T it repacks all of W on every call. Same Xeon, W cycled through more than the L3, time of
// x W^T / y^T: 1.1B shapes 1.13-1.26 at 5-32 rows, 0.80-1.39 at 64-256 (1.20-1.34 on 2048 -> 11264, the largest
// product of a layer), 0.66-1.16 at 1024-2048; int8 blocks: y^T ahead up to 256 rows, mixed at 512, behind above.
constexpr int64_t kCpuAmxTransposedMaxRows = 256;
// CPU with AMX-INT8, int8 weights and 16-bit x where cpu::linear_int8_on_tiles holds: the GEMV's integer products
// run on tiles, up to this many rows per pass over W and per call. Same Xeon, dequantised bf16 blocks + oneDNN /
// tiles time: 1.1B and 7B shapes 1.9-2.8 at 16 rows, 1.1-2.0 at 64, 0.73-1.05 at 128, 0.64-0.82 at 256
// (benchmarks/RESULTS.md, session 18).
constexpr int64_t kCpuInt8TilesMaxRows = 64;
// ... and from this many rows on: below, the VNNI GEMV streams W faster than the tiles' route (1.1B-shaped int8
// decode, tok/s, GEMV / tiles: b=1 21.2 / 15.4, b=2 36.0 / 30.4, b=4 59.5 / 58.0, b=8 91.4 / 114.8).
constexpr int64_t kCpuInt8TilesMinRows = 5;

namespace cpu {
// y [M, N] contiguous; x [M, K] rows of stride x_stride (elements), last dim contiguous; w [N, K] contiguous.
// Activation-dtype GEMV: each W row is streamed once per chunk of 8 rows, rows of W split over threads.
void linear_gemv(DType dt, void* y, const void* x, int64_t x_stride, const void* w, int64_t M, int64_t N, int64_t K);

// q int8 [N, K], scales float32 [N, G] (both contiguous, written); w [N, K] contiguous in dtype dt.
void quantize_int8(DType dt, int8_t* q, float* scales, const void* w, int64_t N, int64_t K, int64_t group_size);

// y [M, N] contiguous in dtype dt; x [M, K] rows of stride x_stride; q int8 [N, K]; scales float32 [N, G],
// G dividing K. Weight-only: no activation is stored quantised; 16-bit x is held as int16 blocks inside the
// kernel (see the exception above), fp32 x stays fp32.
void linear_int8(DType dt, void* y, const void* x, int64_t x_stride, const int8_t* q, const float* scales,
                 int64_t M, int64_t N, int64_t K, int64_t G);

// Whether linear_int8 with x in dtype dt runs its integer products on AMX-INT8 tiles for this shape: where the
// build targets them and this CPU and OS grant them, 16-bit x on the int16 route, N % 16 == 0, K % 64 == 0.
bool linear_int8_on_tiles(DType dt, int64_t N, int64_t K, int64_t G);

// w [N, K] contiguous in dtype dt: w[n, k] = round(q[n, k] * s[n, g(k)]) (the product in fp32).
void dequantize_int8(DType dt, void* w, const int8_t* q, const float* scales, int64_t N, int64_t K, int64_t G);

// dst [cols, rows] = src [rows, cols]^T, 16-bit elements (both contiguous): the GEMMs' y^T = W x^T back to y.
void transpose_16bit(void* dst, const void* src, int64_t rows, int64_t cols);
}  // namespace cpu

namespace cuda {
// Same contracts as cpu::. GEMVs: several output rows per block, one warp per row, 16-byte loads when the
// pointers and K allow them (scalar loads otherwise), fp32 accumulation, warp-shuffle reduction. M <= 8 only.
void linear_gemv(DType dt, void* y, const void* x, int64_t x_stride, const void* w, int64_t M, int64_t N, int64_t K,
                 cudaStream_t stream);
void quantize_int8(DType dt, int8_t* q, float* scales, const void* w, int64_t N, int64_t K, int64_t group_size,
                   cudaStream_t stream);
void linear_int8(DType dt, void* y, const void* x, int64_t x_stride, const int8_t* q, const float* scales,
                 int64_t M, int64_t N, int64_t K, int64_t G, cudaStream_t stream);
void dequantize_int8(DType dt, void* w, const int8_t* q, const float* scales, int64_t N, int64_t K, int64_t G,
                     cudaStream_t stream);
// silu_and_mul(linear(x, w)) in one GEMV, M <= 8 (linear_int8's when scales, [2F, G], is non-null; w int8 then):
// w [2F, K] holds the gate rows then the up rows, y [M, F] contiguous. Each warp computes gate row n and up row
// n + F and stores round(round(silu(g)) * u), g and u first rounded to dt: the two ops' results, bitwise.
void linear_silu_and_mul(DType dt, void* y, const void* x, int64_t x_stride, const void* w, const float* scales,
                         int64_t M, int64_t F, int64_t K, int64_t G, cudaStream_t stream);
}  // namespace cuda
}  // namespace codellama
