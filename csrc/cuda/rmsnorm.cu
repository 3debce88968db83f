// y = round(w * round(x * rsqrt(mean(x^2) + eps))): one block per row, fp32 reduction. Fused variant writes
// residual_out = round(x + residual) first.
// Rows that fit (dim <= kMaxVecs * kThreads 16-byte vectors, every pointer and the row stride 16-byte aligned:
// all CodeLlama shapes) are loaded once into registers with every load in flight at once, so a decode step's
// single row costs one memory round trip; the strided two-pass kernel, whose loop iterations wait on each other
// (its stores may alias later loads), took 10.7 us per 4096-wide fp16 row on an H200 (64 calls per 7B step).
#include "codellama/rmsnorm.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool kFusedAdd>
__global__ void rms_norm_kernel(T* __restrict__ out, T* residual_out, const T* x, int64_t x_stride,
                                const T* residual, const T* __restrict__ w, int64_t dim, float eps) {
  const int64_t row = blockIdx.x;
  grid_dependency_sync();
  const T* xr = x + row * x_stride;
  T* o = out + row * dim;
  float ss = 0.f;
  if constexpr (kFusedAdd) {
    const T* rr = residual + row * dim;
    T* ro = residual_out + row * dim;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float s = round_to<T>(to_f(xr[i]) + to_f(rr[i]));
      ro[i] = from_f<T>(s);
      ss += s * s;
    }
    xr = ro;  // normalise the rounded sum; each thread re-reads only the elements it wrote
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float v = to_f(xr[i]);
      ss += v * v;
    }
  }
  const float inv = rsqrtf(block_sum(ss) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    o[i] = from_f<T>(round_to<T>(to_f(xr[i]) * inv) * to_f(w[i]));
  }
}

constexpr int kMaxVecs = 4;  // 16-byte vectors per thread: 8192 fp16 / bf16 or 4096 fp32 values per row

template <typename T, bool kFusedAdd>
__global__ void __launch_bounds__(kThreads)
rms_norm_vec_kernel(T* out, T* residual_out, const T* x, int64_t x_stride, const T* residual, const T* w, int dim,
                    float eps) {
  constexpr int N = kVec16<T>;
  const int64_t row = blockIdx.x;
  const int vecs = dim / N;
  grid_dependency_sync();
  float v[kMaxVecs][N], r[kMaxVecs][N], wv[kMaxVecs][N];
  // every load first: outputs may alias inputs, so no load may wait behind a store
#pragma unroll
  for (int c = 0; c < kMaxVecs; ++c) {
    const int i = threadIdx.x + c * kThreads;
    if (i < vecs) {
      load16(x + row * x_stride + i * N, v[c]);
      if constexpr (kFusedAdd) load16(residual + row * dim + i * N, r[c]);
      load16(w + i * N, wv[c]);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < kMaxVecs; ++c) {
    const int i = threadIdx.x + c * kThreads;
    if (i < vecs) {
      if constexpr (kFusedAdd) {
#pragma unroll
        for (int e = 0; e < N; ++e) v[c][e] = round_to<T>(v[c][e] + r[c][e]);
        store16(residual_out + row * dim + i * N, v[c]);
      }
#pragma unroll
      for (int e = 0; e < N; ++e) ss += v[c][e] * v[c][e];
    }
  }
  const float inv = rsqrtf(block_sum(ss) / static_cast<float>(dim) + eps);
#pragma unroll
  for (int c = 0; c < kMaxVecs; ++c) {
    const int i = threadIdx.x + c * kThreads;
    if (i < vecs) {
#pragma unroll
      for (int e = 0; e < N; ++e) v[c][e] = round_to<T>(v[c][e] * inv) * wv[c][e];
      store16(out + row * dim + i * N, v[c]);
    }
  }
}

template <typename T>
bool fits_vec_kernel(const void* out, const void* residual_out, const void* x, int64_t x_stride,
                     const void* residual, const void* w, int64_t dim) {
  constexpr int N = kVec16<T>;
  return dim % N == 0 && dim / N <= kMaxVecs * kThreads && x_stride % N == 0 && aligned16(out) &&
         aligned16(residual_out) && aligned16(x) && aligned16(residual) && aligned16(w);
}

template <typename T, bool kFusedAdd>
void launch(void* out, void* residual_out, const void* x, int64_t x_stride, const void* residual, const void* w,
            int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  T* o = static_cast<T*>(out);
  T* ro = static_cast<T*>(residual_out);
  const T* xp = static_cast<const T*>(x);
  const T* rp = static_cast<const T*>(residual);
  const T* wp = static_cast<const T*>(w);
  // an absent residual (nullptr) is aligned
  if (fits_vec_kernel<T>(out, residual_out, x, x_stride, residual, w, dim)) {
    launch_kernel(rms_norm_vec_kernel<T, kFusedAdd>, static_cast<unsigned>(rows), kThreads, 0, stream, o, ro, xp,
                  x_stride, rp, wp, static_cast<int>(dim), eps);
  } else {
    launch_kernel(rms_norm_kernel<T, kFusedAdd>, static_cast<unsigned>(rows), kThreads, 0, stream, o, ro, xp, x_stride,
                  rp, wp, dim, eps);
  }
}

}  // namespace

void rms_norm(DType dt, void* out, const void* x, int64_t x_stride, const void* weight, int64_t rows,
              int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "rms_norm", {
    launch<scalar_t, false>(out, nullptr, x, x_stride, nullptr, weight, rows, dim, eps, stream);
  });
  check_launch("rms_norm");
}

void fused_add_rms_norm(DType dt, void* out, void* residual_out, const void* x, const void* residual,
                        const void* weight, int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "fused_add_rms_norm", {
    launch<scalar_t, true>(out, residual_out, x, dim, residual, weight, rows, dim, eps, stream);
  });
  check_launch("fused_add_rms_norm");
}

}  // namespace codellama::cuda
