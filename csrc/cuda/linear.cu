// y[m, n] = round(sum_k x[m, k] * w[n, k]), and the int8 variant with w[n, k] = q[n, k] * s[n, k / group_size]:
// decode GEMVs (M <= 8 rows; more rows go to cuBLAS from the binding, see codellama/linear.h), int8
// quantisation and dequantisation.
//
// GEMV: each warp computes 2 output rows, a block of 4 warps 8 rows. Per step a lane issues 4 16-byte weight
// loads for each of its rows before using any (8 loads, 4 KB per warp in flight: decode GEMVs are
// latency-bound otherwise), with L1::no_allocate since weights are read once; activations come through
// L1/L2 (__ldg, shared by all blocks) and each is used for both rows. The first step's weight loads are issued
// before the wait for the previous kernel (grid_dependency_sync; codellama/launch.h), so in a decode step they
// overlap the small kernels before the GEMV. int8 weights: the dot of each 16-weight
// piece (one group) is multiplied by its group scale; with 16-bit activations whose int16 form fits 48 KiB of
// shared memory (7B: up to 2 rows at K = 11008, 5 at K = 4096) and whole 128-column blocks per group, x is
// first rounded to int16 blocks and the dots are integer (gemv_int8_x16_kernel below; the CPU's int16 route,
// codellama/linear.h). The number of activation rows is a template bucket (1, 2, 4, 8), so the accumulators stay
// in registers with no per-row branches; rows past M repeat row M - 1 and are not stored. A warp-shuffle
// reduction gives y[m, n]. When a pointer, K or the group size does not allow 16-byte steps, a plain kernel with
// element-wise loads runs instead. linear_silu_and_mul runs the same kernels with each warp's two rows a gate row
// and its up row (WarpOutput), so the MLP's gate costs no kernel of its own in a decode step (32 launches of ~3 us
// per 7B step on an H200, benchmarks/RESULTS.md).
#include <cstdint>
#include <type_traits>

#include "codellama/linear.h"
#include "cuda_common.cuh"

namespace codellama::cuda {

// Beside cuda_common.cuh's to_f overloads (same namespace, so all of them take part in overload resolution).
__device__ __forceinline__ float to_f(int8_t v) { return static_cast<float>(v); }

namespace {

constexpr int kWarps = 4;  // per GEMV block
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kLoads = 4;  // 16-byte weight loads in flight per row and lane
constexpr int kMaxM = 8;
constexpr int kQuantWarps = 8;  // quantize_int8: one warp per (row, group)

// 16 bytes -> 16 / sizeof(T) floats.
__device__ __forceinline__ void unpack(const uint4& u, float* f, const float*) {
  f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y); f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack(const uint4& u, float* f, const __half*) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) { const float2 t = __half22float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}
__device__ __forceinline__ void unpack(const uint4& u, float* f, const __nv_bfloat16*) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) { const float2 t = __bfloat1622float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}
// int8 -> float exactly without I2F (a quarter-rate instruction that capped the int8 GEMV near half the
// bandwidth): byte b ^ 0x80 = b + 128 goes into the low mantissa bits of 2^23, then 2^23 + 128 is subtracted.
__device__ __forceinline__ void unpack(const uint4& u, float* f, const int8_t*) {
  const uint32_t w[4] = {u.x ^ 0x80808080u, u.y ^ 0x80808080u, u.z ^ 0x80808080u, u.w ^ 0x80808080u};
#pragma unroll
  for (int i = 0; i < 16; ++i) f[i] = __int_as_float(__byte_perm(w[i / 4], 0x4B000000u, 0x7540u | (i % 4))) - 8388736.f;
}

// E consecutive elements of T at p (16-byte aligned; E * sizeof(T) a multiple of 16) as floats.
template <typename T, int E>
__device__ __forceinline__ void load_vec(const T* p, float* f) {
  constexpr int per = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < E / per; ++i) unpack(__ldg(reinterpret_cast<const uint4*>(p) + i), f + i * per, p);
}

// A weight load that bypasses L1 (each weight is read once per call). kEarly: a load issued before
// grid_dependency_sync, coherent (ld.global, not .nc): ptxas moves .nc loads past griddepcontrol.wait (seen in the
// sm_90 SASS), coherent ones it keeps ahead of it.
template <bool kEarly = false>
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  if constexpr (kEarly) {
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  } else {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  }
  return r;
}

// Bytes of each weight row a lane's first batch of loads covers (dot_fp32, gemv_int8_x16_kernel): the L2 prefetch
// starts after them.
constexpr int64_t kFirstBatchBytes = int64_t{kLoads} * 32 * 16;

// The outputs of the warp with global index `warp`. Plain: y [M, N] rows n0 = 2 warp and n0 + 1, from the W rows of
// the same index. Gated (F > 0, linear_silu_and_mul): y [M, F] row n0 = warp alone, from W rows n0 (gate) and n0 + F
// (up), so the warp's two accumulators meet in its own registers.
struct WarpOutput {
  int64_t n0;       // the warp's first W row
  int64_t stride;   // the distance between its two W rows
  int64_t outputs;  // y's row length: the warp works when n0 < outputs
  __device__ __forceinline__ WarpOutput(int64_t warp, int64_t N, int64_t F)
      : n0(F > 0 ? warp : warp * kRowsPerWarp), stride(F > 0 ? F : 1), outputs(F > 0 ? F : N) {}
};
static_assert(kRowsPerWarp == 2, "a gated warp pairs one gate row with one up row");

// One warp's rows: R rows of W, o.n0 + r * o.stride (rows past N repeat row N - 1 and are never stored), their
// scales, and MB activation rows (rows past M repeat row M - 1 and are never stored).
template <typename T, typename W, int MB>
struct WarpRows {
  const W* w[kRowsPerWarp];
  const float* s[kRowsPerWarp];
  float s_row[kRowsPerWarp];  // G == 1: the row's one scale, read once
  const T* x[MB];

  __device__ __forceinline__ WarpRows(const T* x0, int64_t x_stride, const W* w0, const float* scales, int M, int64_t N,
                                      int64_t K, int64_t G, const WarpOutput& o, bool scaled) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t n = o.n0 + r * o.stride < N ? o.n0 + r * o.stride : N - 1;
      w[r] = w0 + n * K;
      s[r] = scaled ? scales + n * G : nullptr;
      s_row[r] = scaled && G == 1 ? s[r][0] : 0.f;
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) x[m] = x0 + (m < M ? m : M - 1) * x_stride;
  }

  // The rows past their first batch into L2, by lane 0 (before grid_dependency_sync, in the first `prefetch_blocks`
  // blocks of a dependent launch: l2_prefetch_bytes, codellama/launch.h).
  __device__ __forceinline__ void prefetch_l2_rows(int64_t K, int lane) const {
    const int64_t bytes = K * static_cast<int64_t>(sizeof(W)) - kFirstBatchBytes;
    if (lane != 0 || bytes <= 0) return;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      prefetch_l2(reinterpret_cast<const char*>(w[r]) + kFirstBatchBytes, bytes);
    }
  }
};

// acc[r][m] += the dot of weight row r with activation row m over this lane's 16-byte pieces (columns lane * E +
// i * 32 E), activations converted to fp32. A lane issues kLoads pieces of each row before using any.
// before_sync() runs after the first batch of weight loads is issued, before grid_dependency_sync.
template <typename T, typename W, bool kScaled, int MB, typename BeforeSync>
__device__ __forceinline__ void dot_fp32(float (&acc)[kRowsPerWarp][MB], const WarpRows<T, W, MB>& rows, int64_t K,
                                         int64_t gs, int64_t G, int lane, const BeforeSync& before_sync) {
  constexpr int E = 16 / sizeof(W);        // weights per 16-byte load
  constexpr int64_t kStep = 32 * E;        // row elements per warp-wide load
  constexpr int R = kRowsPerWarp;
  // The group of weight k in 32 bits (the host guarantees K < 2^31): a 64-bit division by a runtime divisor
  // costs tens of instructions, once per 16-byte step, in a loop of ~5 instructions per weight.
  const uint32_t gs32 = static_cast<uint32_t>(gs);
  // Dots of the weights at k .. k + E - 1 (already loaded: wv[r]) with every activation row.
  auto fma_step = [&](const uint4* wv, int64_t k) {
    float wf[R][E];
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      unpack(wv[r], wf[r], rows.w[r]);
      // gs % E == 0: the E weights share one group
      if constexpr (kScaled) s[r] = G == 1 ? rows.s_row[r] : rows.s[r][static_cast<uint32_t>(k) / gs32];
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      float xf[E];
      load_vec<T, E>(rows.x[m] + k, xf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (kScaled) {  // s * sum(q x) per group piece, the order of codellama/linear.h
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < E; ++i) dot = fmaf(wf[r][i], xf[i], dot);
          acc[r][m] = fmaf(s[r], dot, acc[r][m]);
        } else {
#pragma unroll
          for (int i = 0; i < E; ++i) acc[r][m] = fmaf(wf[r][i], xf[i], acc[r][m]);
        }
      }
    }
  };
  // kLoads pieces of each row at k, k + kStep, ...: all loads, then the dots
  const auto batch = [&](int64_t k, auto first) {
    constexpr bool kFirst = decltype(first)::value;  // the loads are issued before grid_dependency_sync
    uint4 wv[kLoads][R];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) wv[u][r] = ld_stream<kFirst>(rows.w[r] + k + u * kStep);
    }
    if constexpr (kFirst) {
      before_sync();
      grid_dependency_sync();
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) fma_step(wv[u], k + u * kStep);
  };
  // The first batch's weights are requested before the wait for the previous kernel (codellama/launch.h): in a
  // dependent launch they are on their way while it ends.
  int64_t k = static_cast<int64_t>(lane) * E;
  if (k + (kLoads - 1) * kStep < K) {
    batch(k, std::true_type{});
    k += kLoads * kStep;
  } else {
    before_sync();
    grid_dependency_sync();
  }
  for (; k + (kLoads - 1) * kStep < K; k += kLoads * kStep) batch(k, std::false_type{});
  for (; k < K; k += kStep) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = ld_stream(rows.w[r] + k);
    fma_step(wv, k);
  }
}

// linear_silu_and_mul's output from the gate and up row sums: each first rounded to T as linear's output would be,
// then silu_and_mul's element.
template <typename T>
__device__ __forceinline__ T gated(float gate_sum, float up_sum) {
  return silu_mul<T>(round_to<T>(gate_sum), round_to<T>(up_sum));
}

// Plain: y[m, n0 + r] = the warp's sum of acc[r][m], for the rows that exist. Gated: y[m, n0] = gated(sums).
template <typename T, int MB>
__device__ __forceinline__ void store_rows(T* y, float (&acc)[kRowsPerWarp][MB], int M, int64_t N, int64_t F,
                                           const WarpOutput& o, int lane) {
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    float v[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) v[r] = warp_sum(acc[r][m]);
    if (lane != 0 || m >= M) continue;
    if (F > 0) {
      y[m * F + o.n0] = gated<T>(v[0], v[1]);
    } else {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (o.n0 + r < N) y[m * N + o.n0 + r] = from_f<T>(v[r]);
      }
    }
  }
}

__device__ __forceinline__ int64_t global_warp() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
}

// T: activation type; W: weight type (T, or int8_t with kScaled); scales [N, G] used when kScaled; MB >= M; F > 0:
// gated (y [M, F], W [2F, K]), else plain (y [M, N]).
template <typename T, typename W, bool kScaled, int MB>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t x_stride, const W* __restrict__ w,
            const float* __restrict__ scales, int M, int64_t N, int64_t K, int64_t gs, int64_t G, int64_t F,
            unsigned prefetch_blocks) {
  const int lane = threadIdx.x & 31;
  const WarpOutput o(global_warp(), N, F);
  if (o.n0 >= o.outputs) return;  // uniform over the warp: the shuffles below see all 32 lanes
  const WarpRows<T, W, MB> rows(x, x_stride, w, scales, M, N, K, G, o, kScaled);
  float acc[kRowsPerWarp][MB] = {};
  dot_fp32<T, W, kScaled>(acc, rows, K, gs, G, lane, [&] {
    if (blockIdx.x < prefetch_blocks) rows.prefetch_l2_rows(K, lane);
  });
  store_rows<T>(y, acc, M, N, F, o, lane);
}

// ---- int8 weights, 16-bit activations: the int16 route (csrc/cpu/linear.cpp's, on the GPU) ----
// The fp32 route spends ~4.5 instructions per int8 weight (unpack, FMA) against ~1.3 per fp16 weight byte, and read
// at 62-67% of the H200's bandwidth where fp16 read at 83-86% (benchmarks/RESULTS.md, session 12). Here each block
// first rounds x to int16 in shared memory, one scale per 128-column block (max |x| / 32767, exactly the CPU's
// rounding), and the dot of 4 weights with 4 activations is two dp2a instructions (int8 x int16 pairs into int32),
// converted and scaled once per 16 weights: ~1 instruction per weight in the SASS (one group per row; ~1.4 with
// groups). Every block rounds all of x again (~80 instructions per 8 elements), so a block takes 16 rows (8 warps)
// to share that cost: at 7B shapes it is then about a third of the block's instructions. Not yet timed on a GPU.
constexpr int kXBlock = 128;                 // columns per x scale, as on the CPU
constexpr int kX16Warps = 8;                 // per block of the int16 route
constexpr int64_t kX16MaxSmem = 48 * 1024;   // x in int16 must fit the default dynamic shared memory
constexpr float kXMinBlockMax = 0x1p-64f;    // as on the CPU: a smaller nonzero block max takes the fp32 route

// d = c + a.lo16 * b.byte0 + a.hi16 * b.byte1 (lo) or with bytes 2 and 3 (hi); signed.
__device__ __forceinline__ int dp2a_lo(int a, int b, int c) {
  int d;
  asm("dp2a.lo.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ int dp2a_hi(int a, int b, int c) {
  int d;
  asm("dp2a.hi.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// |x| of a 16-bit float from its bits with the sign cleared: ordered as the values (non-negative floats order as
// integers), inf and NaN at kNonFinite and above.
template <typename T> struct Magnitude;
template <> struct Magnitude<__nv_bfloat16> {
  static constexpr uint32_t kNonFinite = 0x7f80u;
  __device__ __forceinline__ static float value(uint32_t bits) { return __uint_as_float(bits << 16); }
};
template <> struct Magnitude<__half> {
  static constexpr uint32_t kNonFinite = 0x7c00u;
  __device__ __forceinline__ static float value(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
};

// x rows [M, K] (16-bit T, K a multiple of 128) -> xq int16 [M, K] and xs [M, K / 128] in shared memory, by the
// CPU's rule (quantize_x_int16): s = max |x| / 32767 over each 128-column block (1 for zeros, NaN for a block
// holding a NaN or inf), q = x * (1 / s) rounded to nearest even. 16 threads per 128-column block, 8 elements each,
// kPasses loads in flight per thread. The max is taken on the bits (integer max of the magnitudes, which also
// flags inf and NaN); 1 / s is __frcp_rn (the correctly rounded reciprocal: the CPU's 1.f / s); the rounding adds
// 1.5 * 2^23 (exact round-half-even for |v| < 2^22; |x / s| <= 32767 rounds to at most 32767, so nothing needs
// saturating) and keeps the low 16 bits. Ends with a barrier; returns to every thread whether some block's max |x| is
// in (0, kXMinBlockMax), where 1 / s overflows (the call then takes the fp32 route, as the CPU's chunk of rows does;
// a tiny or non-finite block's int16 values are garbage and never used: NaN s makes its row's outputs NaN).
template <typename T>
__device__ __forceinline__ bool quantize_x_int16(int16_t* xq, float* xs, const T* x, int64_t x_stride, int M,
                                                 int64_t K) {
  static_assert(sizeof(T) == 2, "the int16 route takes 16-bit activations");
  constexpr int kPer = 8;                                  // elements per thread: one 16-byte load
  constexpr int kLanes = kXBlock / kPer;                   // 16 threads per block
  constexpr int kBlocksPerPass = kX16Warps * 32 / kLanes;  // 16
  constexpr int kPasses = 2;
  constexpr float kRound = 12582912.f;                     // 1.5 * 2^23
  const int sub = threadIdx.x / kLanes, part = threadIdx.x % kLanes;
  const int nb = static_cast<int>(K / kXBlock);
  int tiny = 0;
  for (int m = 0; m < M; ++m) {
    const T* xr = x + m * x_stride + part * kPer;
    int16_t* qr = xq + m * K + part * kPer;
    for (int b0 = 0; b0 < nb; b0 += kBlocksPerPass * kPasses) {
      uint4 v[kPasses];
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        const int b = b0 + p * kBlocksPerPass + sub;
        v[p] = b < nb ? __ldg(reinterpret_cast<const uint4*>(xr + b * kXBlock)) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        if (b0 + p * kBlocksPerPass >= nb) break;  // uniform over the block
        const int b = b0 + p * kBlocksPerPass + sub;  // the same for the 16 lanes of a half-warp
        const uint32_t wd[4] = {v[p].x, v[p].y, v[p].z, v[p].w};
        uint32_t mag = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) mag = max(mag, max(wd[i] & 0x7fffu, (wd[i] >> 16) & 0x7fffu));
#pragma unroll
        for (int o = kLanes / 2; o > 0; o >>= 1) {  // xor offsets below 16 stay within the half-warp's block
          mag = max(mag, __shfl_xor_sync(0xffffffffu, mag, o));
        }
        const bool finite = mag < Magnitude<T>::kNonFinite;
        const float amax = Magnitude<T>::value(mag);
        const float s = !finite ? NAN : amax > 0.f ? __fdiv_rn(amax, 32767.f) : 1.f;
        tiny |= finite && amax > 0.f && amax < kXMinBlockMax ? 1 : 0;
        const float inv = __frcp_rn(s);
        if (b < nb) {
          const T* e = reinterpret_cast<const T*>(&v[p]);
          uint32_t q[kPer];  // low 16 bits: the rounded int16
#pragma unroll
          for (int i = 0; i < kPer; ++i) q[i] = __float_as_uint(__fadd_rn(__fmul_rn(to_f(e[i]), inv), kRound));
          *reinterpret_cast<uint4*>(qr + b * kXBlock) =
              make_uint4(__byte_perm(q[0], q[1], 0x5410), __byte_perm(q[2], q[3], 0x5410),
                         __byte_perm(q[4], q[5], 0x5410), __byte_perm(q[6], q[7], 0x5410));
          if (part == 0) xs[m * nb + b] = s;
        }
      }
    }
  }
  return __syncthreads_or(tiny) != 0;
}

// Dynamic shared memory: xq int16 [M, K], then xs float [M, K / 128]. Needs K % 128 == 0, 16-byte aligned rows,
// groups of whole 128-column blocks (G == 1 or gs % 128 == 0) and K < 2^31.
template <typename T, int MB>
__global__ void __launch_bounds__(kX16Warps * 32)
gemv_int8_x16_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t x_stride, const int8_t* __restrict__ w,
                     const float* __restrict__ scales, int M, int64_t N, int64_t K, int64_t gs, int64_t G, int64_t F,
                     unsigned prefetch_blocks) {
  constexpr int R = kRowsPerWarp;
  constexpr int64_t kStep = 32 * 16;  // row elements per warp-wide 16-byte load
  extern __shared__ __align__(16) unsigned char smem[];
  int16_t* xq = reinterpret_cast<int16_t*>(smem);
  float* xs = reinterpret_cast<float*>(smem + static_cast<int64_t>(M) * K * sizeof(int16_t));
  const int lane = threadIdx.x & 31;
  const WarpOutput o(global_warp(), N, F);
  const WarpRows<T, int8_t, MB> rows(x, x_stride, w, scales, M, N, K, G, o, true);  // valid rows even past N
  // this warp's first pieces of W are in flight while x is rounded (they do not depend on it)
  int64_t k = static_cast<int64_t>(lane) * 16;
  uint4 wv[kLoads][R];
  const auto load_pieces = [&](auto first) {  // first: issued before grid_dependency_sync
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (k + u * kStep < K) wv[u][r] = ld_stream<decltype(first)::value>(rows.w[r] + k + u * kStep);
      }
    }
  };
  load_pieces(std::true_type{});
  if (blockIdx.x < prefetch_blocks) rows.prefetch_l2_rows(K, lane);
  grid_dependency_sync();  // x is the previous kernel's output
  const bool tiny = quantize_x_int16(xq, xs, x, x_stride, M, K);
  if (o.n0 >= o.outputs) return;  // after the block's barrier; uniform over the warp
  float acc[R][MB] = {};
  if (tiny) {
    dot_fp32<T, int8_t, true>(acc, rows, K, gs, G, lane, [] {});  // after the sync above: no prefetch
    store_rows<T>(y, acc, M, N, F, o, lane);
    return;
  }
  const int nb = static_cast<int>(K / kXBlock);
  const uint32_t gs32 = static_cast<uint32_t>(gs);
  const int16_t* xqm[MB];
  const float* xsm[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    const int mm = m < M ? m : M - 1;
    xqm[m] = xq + static_cast<int64_t>(mm) * K;
    xsm[m] = xs + mm * nb;
  }
  // kGrouped: G > 1, each piece's group scale is looked up (a division); one group: the row's s_row. The product
  // of the weight and x scales multiplies each piece's integer dot, as on the CPU (the int32 sums are up to 127 /
  // max|w| times the true ones: scaled at the end, a bf16 x near its range's top could overflow them).
  const auto run = [&](auto grouped) {
    constexpr bool kGrouped = decltype(grouped)::value;
    for (;;) {
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const uint32_t kk = static_cast<uint32_t>(k + u * kStep);  // < K < 2^31
        if (kk >= K) break;
        float sw[R];
#pragma unroll
        for (int r = 0; r < R; ++r) sw[r] = kGrouped ? rows.s[r][kk / gs32] : rows.s_row[r];
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          const uint4 xa = *reinterpret_cast<const uint4*>(xqm[m] + kk);      // x[kk .. kk + 7] as int16 pairs
          const uint4 xb = *reinterpret_cast<const uint4*>(xqm[m] + kk + 8);  // x[kk + 8 .. kk + 15]
          const float sx = xsm[m][kk / kXBlock];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint4& q = wv[u][r];  // bytes: w[kk], w[kk + 1], ... (4 per word)
            int d = dp2a_lo(static_cast<int>(xa.x), static_cast<int>(q.x), 0);
            d = dp2a_hi(static_cast<int>(xa.y), static_cast<int>(q.x), d);
            d = dp2a_lo(static_cast<int>(xa.z), static_cast<int>(q.y), d);
            d = dp2a_hi(static_cast<int>(xa.w), static_cast<int>(q.y), d);
            d = dp2a_lo(static_cast<int>(xb.x), static_cast<int>(q.z), d);
            d = dp2a_hi(static_cast<int>(xb.y), static_cast<int>(q.z), d);
            d = dp2a_lo(static_cast<int>(xb.z), static_cast<int>(q.w), d);
            d = dp2a_hi(static_cast<int>(xb.w), static_cast<int>(q.w), d);
            // |d| < 16 * 127 * 32768 < 2^31
            acc[r][m] = fmaf(static_cast<float>(d), sw[r] * sx, acc[r][m]);
          }
        }
      }
      k += kLoads * kStep;
      if (k >= K) break;
      load_pieces(std::false_type{});
    }
  };
  if (G == 1) {
    run(std::false_type{});
  } else {
    run(std::true_type{});
  }
  store_rows<T>(y, acc, M, N, F, o, lane);
}

// Any alignment: one warp per output column n of y, element-wise loads; W row n, or gated rows n and n + F.
template <typename T, typename W, bool kScaled>
__global__ void __launch_bounds__(kWarps * 32)
gemv_scalar_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t x_stride, const W* __restrict__ w,
                   const float* __restrict__ scales, int M, int64_t N, int64_t K, int64_t gs, int64_t G, int64_t F) {
  const int lane = threadIdx.x & 31;
  const int64_t n = global_warp();
  if (n >= (F > 0 ? F : N)) return;
  grid_dependency_sync();
  float acc[2][kMaxM];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.f;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // unrolled: acc stays in registers
    if (r == 1 && F == 0) break;
    const W* wr = w + (n + r * F) * K;
    const float* sr = kScaled ? scales + (n + r * F) * G : nullptr;
    for (int64_t k = lane; k < K; k += 32) {
      float wf = to_f(wr[k]);
      if constexpr (kScaled) wf *= sr[k / gs];
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) acc[r][m] = fmaf(wf, to_f(x[m * x_stride + k]), acc[r][m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[0][m]);
      const float u = F > 0 ? warp_sum(acc[1][m]) : 0.f;
      if (lane == 0) {
        if (F > 0) {
          y[m * F + n] = gated<T>(v, u);
        } else {
          y[m * N + n] = from_f<T>(v);
        }
      }
    }
  }
}

// F > 0: gated (linear_silu_and_mul, N = 2F rows of W, y [M, F]); else y [M, N].
template <typename T, typename W, bool kScaled>
void launch_gemv(T* y, const T* x, int64_t x_stride, const W* w, const float* scales, int64_t M, int64_t N,
                 int64_t K, int64_t G, int64_t F, cudaStream_t stream) {
  if (M > kMaxM) throw std::invalid_argument("linear: the CUDA GEMV takes at most 8 rows (use a GEMM)");
  if (M <= 0 || N <= 0) return;
  constexpr int64_t E = 16 / sizeof(W);
  const int64_t gs = K / G;
  const int m = static_cast<int>(M);
  // 16-byte steps need: W rows and x rows 16-byte aligned, whole steps per row, whole steps per group.
  const bool vec = aligned16(w) && aligned16(x) && K % E == 0 && (x_stride * sizeof(T)) % 16 == 0 &&
                   (!kScaled || gs % E == 0) && K <= 0x7fffffff;
  if (!vec) {  // a warp per output column
    const dim3 grid(static_cast<unsigned>(((F > 0 ? F : N) + kWarps - 1) / kWarps));
    launch_kernel(gemv_scalar_kernel<T, W, kScaled>, grid, kWarps * 32, 0, stream, y, x, x_stride, w, scales, m, N, K,
                  gs, G, F);
    return;
  }
  // A dependent launch's first blocks prefetch their rows into L2 before waiting (l2_prefetch_bytes): rows per block x
  // K weights each.
  const bool dependent = next_launch_dependent(stream);
  const auto prefetch_blocks = [&](int64_t rows_per_block) {
    const int64_t n = dependent ? l2_prefetch_bytes() / (rows_per_block * K * static_cast<int64_t>(sizeof(W))) : 0;
    return static_cast<unsigned>(n < 0x7fffffff ? n : 0x7fffffff);
  };
  // plain: kRowsPerBlock output columns per block; gated: one per warp
  const dim3 grid(static_cast<unsigned>(F > 0 ? (F + kWarps - 1) / kWarps : (N + kRowsPerBlock - 1) / kRowsPerBlock));
  if constexpr (kScaled && sizeof(T) == 2) {
    const int64_t smem = M * K * static_cast<int64_t>(sizeof(int16_t)) + M * (K / kXBlock) * 4;
    if (K % kXBlock == 0 && (G == 1 || gs % kXBlock == 0) && smem <= kX16MaxSmem) {
      const dim3 grid16(static_cast<unsigned>(F > 0 ? (F + kX16Warps - 1) / kX16Warps
                                                  : (N + kX16Warps * kRowsPerWarp - 1) / (kX16Warps * kRowsPerWarp)));
      with_pow2_bucket(m, [&](auto mb) {
        launch_kernel(dependent, gemv_int8_x16_kernel<T, decltype(mb)::value>, grid16, kX16Warps * 32,
                      static_cast<size_t>(smem), stream, y, x, x_stride, w, scales, m, N, K, gs, G, F,
                      prefetch_blocks(kX16Warps * kRowsPerWarp));
      });
      return;
    }
  }
  with_pow2_bucket(m, [&](auto mb) {
    launch_kernel(dependent, gemv_kernel<T, W, kScaled, decltype(mb)::value>, grid, kWarps * 32, 0, stream, y, x,
                  x_stride, w, scales, m, N, K, gs, G, F, prefetch_blocks(kRowsPerBlock));
  });
}

// One warp per (row, group): max |w| by warp reduction, then q = clamp(rint(w / s)) (IEEE division, as torch).
template <typename T>
__global__ void quantize_kernel(int8_t* __restrict__ q, float* __restrict__ scales, const T* __restrict__ w,
                                int64_t tasks, int64_t K, int64_t gs, int64_t G) {
  const int lane = threadIdx.x & 31;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  if (task >= tasks) return;
  grid_dependency_sync();
  const int64_t n = task / G, g = task % G;
  const T* wr = w + n * K + g * gs;
  int8_t* qr = q + n * K + g * gs;
  float amax = 0.f;
  for (int64_t k = lane; k < gs; k += 32) amax = fmaxf(amax, fabsf(to_f(wr[k])));
  amax = warp_max(amax);
  const float s = amax > 0.f ? __fdiv_rn(amax, 127.f) : 1.f;
  if (lane == 0) scales[task] = s;
  for (int64_t k = lane; k < gs; k += 32) {
    const float v = rintf(__fdiv_rn(to_f(wr[k]), s));
    qr[k] = static_cast<int8_t>(fminf(127.f, fmaxf(-127.f, v)));
  }
}

// 16 weights per thread and step (one 16-byte load of q, 16-byte stores of w), rows over grid.y: no 64-bit
// division per element. The scalar kernel below does three per element; on session 2's H200 it took ~145 us of
// the 171 us int8 GEMM at 128 x 4096 -> 11008, where moving its bytes takes ~31 us. Needs 16-byte aligned rows
// of q and w and groups of a multiple of 16 (the 16 share one scale).
template <typename T>
__global__ void dequantize_vec_kernel(T* __restrict__ w, const int8_t* __restrict__ q,
                                      const float* __restrict__ scales, int64_t N, int64_t K, int64_t gs, int64_t G) {
  constexpr int E = 16;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * E;
  grid_dependency_sync();
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int8_t* qr = q + n * K;
    T* wr = w + n * K;
    const float* sr = scales + n * G;
    for (int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * E; k < K; k += step) {
      float f[E];
      unpack(*reinterpret_cast<const uint4*>(qr + k), f, qr);
      const float s = sr[k / gs];
      alignas(16) T out[E];
#pragma unroll
      for (int i = 0; i < E; ++i) out[i] = from_f<T>(f[i] * s);
#pragma unroll
      for (int j = 0; j < static_cast<int>(E * sizeof(T) / 16); ++j) {
        reinterpret_cast<uint4*>(wr + k)[j] = reinterpret_cast<const uint4*>(out)[j];
      }
    }
  }
}

template <typename T>
__global__ void dequantize_kernel(T* __restrict__ w, const int8_t* __restrict__ q, const float* __restrict__ scales,
                                  int64_t total, int64_t K, int64_t gs, int64_t G) {
  grid_dependency_sync();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K;
    w[i] = from_f<T>(static_cast<float>(q[i]) * scales[n * G + k / gs]);
  }
}

}  // namespace

void linear_gemv(DType dt, void* y, const void* x, int64_t x_stride, const void* w, int64_t M, int64_t N, int64_t K,
                 cudaStream_t stream) {
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "linear", {
    launch_gemv<scalar_t, scalar_t, false>(static_cast<scalar_t*>(y), static_cast<const scalar_t*>(x), x_stride,
                                           static_cast<const scalar_t*>(w), nullptr, M, N, K, 1, 0, stream);
  });
  check_launch("linear");
}

void linear_int8(DType dt, void* y, const void* x, int64_t x_stride, const int8_t* q, const float* scales,
                 int64_t M, int64_t N, int64_t K, int64_t G, cudaStream_t stream) {
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "linear_int8", {
    launch_gemv<scalar_t, int8_t, true>(static_cast<scalar_t*>(y), static_cast<const scalar_t*>(x), x_stride, q,
                                        scales, M, N, K, G, 0, stream);
  });
  check_launch("linear_int8");
}

void linear_silu_and_mul(DType dt, void* y, const void* x, int64_t x_stride, const void* w, const float* scales,
                         int64_t M, int64_t F, int64_t K, int64_t G, cudaStream_t stream) {
  if (F <= 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "linear_silu_and_mul", {
    auto* yt = static_cast<scalar_t*>(y);
    const auto* xt = static_cast<const scalar_t*>(x);
    if (scales != nullptr) {
      launch_gemv<scalar_t, int8_t, true>(yt, xt, x_stride, static_cast<const int8_t*>(w), scales, M, 2 * F, K, G, F,
                                          stream);
    } else {
      launch_gemv<scalar_t, scalar_t, false>(yt, xt, x_stride, static_cast<const scalar_t*>(w), nullptr, M, 2 * F, K,
                                             1, F, stream);
    }
  });
  check_launch("linear_silu_and_mul");
}

void quantize_int8(DType dt, int8_t* q, float* scales, const void* w, int64_t N, int64_t K, int64_t group_size,
                   cudaStream_t stream) {
  const int64_t gs = group_size == 0 ? K : group_size, G = K / gs, tasks = N * G;
  if (tasks == 0) return;
  const dim3 grid(static_cast<unsigned>((tasks + kQuantWarps - 1) / kQuantWarps)), block(kQuantWarps * 32);
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "quantize_int8", {  // writes weights: never a dependent launch (launch.h)
    launch_kernel(false, quantize_kernel<scalar_t>, grid, block, 0, stream, q, scales, static_cast<const scalar_t*>(w),
                  tasks, K, gs, G);
  });
  check_launch("quantize_int8");
}

void dequantize_int8(DType dt, void* w, const int8_t* q, const float* scales, int64_t N, int64_t K, int64_t G,
                     cudaStream_t stream) {
  const int64_t total = N * K, gs = K / G;
  if (total == 0) return;
  // writes a weight matrix (for cuBLAS): never a dependent launch (codellama/launch.h)
  if (aligned16(w) && aligned16(q) && K % 16 == 0 && gs % 16 == 0) {
    const int threads = 128;
    const dim3 grid(static_cast<unsigned>((K / 16 + threads - 1) / threads),
                    static_cast<unsigned>(std::min<int64_t>(N, 65535)));
    CODELLAMA_DISPATCH_CUDA_TYPES(dt, "dequantize_int8", {
      launch_kernel(false, dequantize_vec_kernel<scalar_t>, grid, threads, 0, stream, static_cast<scalar_t*>(w), q,
                    scales, N, K, gs, G);
    });
    check_launch("dequantize_int8");
    return;
  }
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 16);
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "dequantize_int8", {
    launch_kernel(false, dequantize_kernel<scalar_t>, static_cast<unsigned>(blocks), threads, 0, stream,
                  static_cast<scalar_t*>(w), q, scales, total, K, gs, G);
  });
  check_launch("dequantize_int8");
}

}  // namespace codellama::cuda
