// y[m, n] = round(sum_k x[m, k] * w[n, k]), and the int8 variant with w[n, k] = q[n, k] * s[n, k / group_size]:
// decode GEMVs (M <= 8 rows; more rows go to cuBLAS from the binding, see codellama/linear.h), int8
// quantisation and dequantisation.
//
// GEMV: each warp computes 2 output rows, a block of 4 warps 8 rows. Per step a lane issues 4 16-byte weight
// loads for each of its rows before using any (8 loads, 4 KB per warp in flight: decode GEMVs are
// latency-bound otherwise), with L1::no_allocate since weights are read once; activations come through
// L1/L2 (__ldg, shared by all blocks) and each is used for both rows. int8 weights: the dot of each 16-weight
// piece (one group) is multiplied by its group scale. The number of activation rows is a template bucket (1, 2, 4, 8), so the
// accumulators stay in registers with no per-row branches; rows past M repeat row M - 1 and are not
// stored. A warp-shuffle reduction gives y[m, n]. When a pointer, K or the group size does not allow
// 16-byte steps, a plain kernel with element-wise loads runs instead.
#include <cstdint>

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

// A weight load that bypasses L1 (each weight is read once per call).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// T: activation type; W: weight type (T, or int8_t with kScaled); scales [N, G] used when kScaled; MB >= M.
template <typename T, typename W, bool kScaled, int MB>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t x_stride, const W* __restrict__ w,
            const float* __restrict__ scales, int M, int64_t N, int64_t K, int64_t gs, int64_t G) {
  constexpr int E = 16 / sizeof(W);        // weights per 16-byte load
  constexpr int64_t kStep = 32 * E;        // row elements per warp-wide load
  constexpr int R = kRowsPerWarp;
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * R;
  if (n0 >= N) return;  // uniform over the warp: the shuffles below see all 32 lanes
  const W* wr[R];
  const float* sr[R];
  float s_row[R];  // G == 1: the row's one scale, read once
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r < N ? n0 + r : N - 1;  // past N: recomputes row N - 1, never stored
    wr[r] = w + n * K;
    sr[r] = kScaled ? scales + n * G : nullptr;
    s_row[r] = kScaled && G == 1 ? sr[r][0] : 0.f;
  }
  // The group of weight k in 32 bits (the host guarantees K < 2^31): a 64-bit division by a runtime divisor
  // costs tens of instructions, once per 16-byte step, in a loop of ~5 instructions per weight.
  const uint32_t gs32 = static_cast<uint32_t>(gs);
  const T* xr[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) xr[m] = x + (m < M ? m : M - 1) * x_stride;
  float acc[R][MB];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[r][m] = 0.f;
  }
  // Dots of the weights at k .. k + E - 1 (already loaded: wv[r]) with every activation row.
  auto fma_step = [&](const uint4* wv, int64_t k) {
    float wf[R][E];
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      unpack(wv[r], wf[r], wr[r]);
      // gs % E == 0: the E weights share one group
      if constexpr (kScaled) s[r] = G == 1 ? s_row[r] : sr[r][static_cast<uint32_t>(k) / gs32];
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      float xf[E];
      load_vec<T, E>(xr[m] + k, xf);
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
  int64_t k = static_cast<int64_t>(lane) * E;
  for (; k + (kLoads - 1) * kStep < K; k += kLoads * kStep) {
    uint4 wv[kLoads][R];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) wv[u][r] = ld_stream(wr[r] + k + u * kStep);
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) fma_step(wv[u], k + u * kStep);
  }
  for (; k < K; k += kStep) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = ld_stream(wr[r] + k);
    fma_step(wv, k);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0 && m < M && n0 + r < N) y[m * N + n0 + r] = from_f<T>(v);
    }
  }
}

// Any alignment: one warp per output row, element-wise loads.
template <typename T, typename W, bool kScaled>
__global__ void __launch_bounds__(kWarps * 32)
gemv_scalar_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t x_stride, const W* __restrict__ w,
                   const float* __restrict__ scales, int M, int64_t N, int64_t K, int64_t gs, int64_t G) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const W* wr = w + n * K;
  const float* sr = kScaled ? scales + n * G : nullptr;
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    float wf = to_f(wr[k]);
    if constexpr (kScaled) wf *= sr[k / gs];
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) acc[m] = fmaf(wf, to_f(x[m * x_stride + k]), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (lane == 0) y[m * N + n] = from_f<T>(v);
    }
  }
}


template <typename T, typename W, bool kScaled>
void launch_gemv(T* y, const T* x, int64_t x_stride, const W* w, const float* scales, int64_t M, int64_t N,
                 int64_t K, int64_t G, cudaStream_t stream) {
  if (M > kMaxM) throw std::invalid_argument("linear: the CUDA GEMV takes at most 8 rows (use a GEMM)");
  if (M <= 0 || N <= 0) return;
  constexpr int64_t E = 16 / sizeof(W);
  const int64_t gs = K / G;
  const int m = static_cast<int>(M);
  // 16-byte steps need: W rows and x rows 16-byte aligned, whole steps per row, whole steps per group.
  const bool vec = aligned16(w) && aligned16(x) && K % E == 0 && (x_stride * sizeof(T)) % 16 == 0 &&
                   (!kScaled || gs % E == 0) && K <= 0x7fffffff;
  if (!vec) {
    const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps));
    gemv_scalar_kernel<T, W, kScaled><<<grid, kWarps * 32, 0, stream>>>(y, x, x_stride, w, scales, m, N, K, gs, G);
    return;
  }
  const dim3 grid(static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock));
  if (m == 1) {
    gemv_kernel<T, W, kScaled, 1><<<grid, kWarps * 32, 0, stream>>>(y, x, x_stride, w, scales, m, N, K, gs, G);
  } else if (m == 2) {
    gemv_kernel<T, W, kScaled, 2><<<grid, kWarps * 32, 0, stream>>>(y, x, x_stride, w, scales, m, N, K, gs, G);
  } else if (m <= 4) {
    gemv_kernel<T, W, kScaled, 4><<<grid, kWarps * 32, 0, stream>>>(y, x, x_stride, w, scales, m, N, K, gs, G);
  } else {
    gemv_kernel<T, W, kScaled, 8><<<grid, kWarps * 32, 0, stream>>>(y, x, x_stride, w, scales, m, N, K, gs, G);
  }
}

// One warp per (row, group): max |w| by warp reduction, then q = clamp(rint(w / s)) (IEEE division, as torch).
template <typename T>
__global__ void quantize_kernel(int8_t* __restrict__ q, float* __restrict__ scales, const T* __restrict__ w,
                                int64_t tasks, int64_t K, int64_t gs, int64_t G) {
  const int lane = threadIdx.x & 31;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  if (task >= tasks) return;
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
                                           static_cast<const scalar_t*>(w), nullptr, M, N, K, 1, stream);
  });
  check_launch("linear");
}

void linear_int8(DType dt, void* y, const void* x, int64_t x_stride, const int8_t* q, const float* scales,
                 int64_t M, int64_t N, int64_t K, int64_t G, cudaStream_t stream) {
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "linear_int8", {
    launch_gemv<scalar_t, int8_t, true>(static_cast<scalar_t*>(y), static_cast<const scalar_t*>(x), x_stride, q,
                                        scales, M, N, K, G, stream);
  });
  check_launch("linear_int8");
}

void quantize_int8(DType dt, int8_t* q, float* scales, const void* w, int64_t N, int64_t K, int64_t group_size,
                   cudaStream_t stream) {
  const int64_t gs = group_size == 0 ? K : group_size, G = K / gs, tasks = N * G;
  if (tasks == 0) return;
  const dim3 grid(static_cast<unsigned>((tasks + kQuantWarps - 1) / kQuantWarps)), block(kQuantWarps * 32);
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "quantize_int8", {
    quantize_kernel<scalar_t><<<grid, block, 0, stream>>>(q, scales, static_cast<const scalar_t*>(w), tasks, K, gs, G);
  });
  check_launch("quantize_int8");
}

void dequantize_int8(DType dt, void* w, const int8_t* q, const float* scales, int64_t N, int64_t K, int64_t G,
                     cudaStream_t stream) {
  const int64_t total = N * K, gs = K / G;
  if (total == 0) return;
  if (aligned16(w) && aligned16(q) && K % 16 == 0 && gs % 16 == 0) {
    const int threads = 128;
    const dim3 grid(static_cast<unsigned>((K / 16 + threads - 1) / threads),
                    static_cast<unsigned>(std::min<int64_t>(N, 65535)));
    CODELLAMA_DISPATCH_CUDA_TYPES(dt, "dequantize_int8", {
      dequantize_vec_kernel<scalar_t><<<grid, threads, 0, stream>>>(static_cast<scalar_t*>(w), q, scales, N, K, gs, G);
    });
    check_launch("dequantize_int8");
    return;
  }
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 16);
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "dequantize_int8", {
    dequantize_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        static_cast<scalar_t*>(w), q, scales, total, K, gs, G);
  });
  check_launch("dequantize_int8");
}

}  // namespace codellama::cuda
