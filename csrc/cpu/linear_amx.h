// int8 weights against 16-bit activations on AMX-INT8 tiles (csrc/cpu/linear_amx.cpp), for linear.cpp's int16 route.
#pragma once

#include <cstdint>

#include "codellama/common.h"

namespace codellama::cpu {

// Whether linear_int8_amx can run: the build targets AMX-INT8, this CPU and OS grant it, N % 16 == 0, K % 64 == 0.
bool linear_int8_amx_fits(int64_t N, int64_t K);

// y [M, N] (row stride ldy, dtype dt: bf16 or fp16) for M <= kCpuInt8TilesMaxRows (codellama/linear.h) activation
// rows held as int16 blocks of `xblock` columns (a multiple of 64, each inside one weight group): xq [M, K] rows ldx
// apart, xs [M, nb] block scales.
// y[m, n] = round(sum_b (s[n, g(b)] * xs[m, b]) * float(sum_{k in b} q[n, k] * xq[m, k])), the block sums exact.
void linear_int8_amx(DType dt, void* y, int64_t ldy, const int16_t* xq, int64_t ldx, const float* xs, int64_t nb,
                     int64_t xblock, const int8_t* q, const float* scales, int64_t M, int64_t N, int64_t K,
                     int64_t G);

}  // namespace codellama::cpu
