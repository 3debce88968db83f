// y = round(w * round(x * rsqrt(mean(x^2) + eps))): one block per row, fp32 reduction, two passes over the
// row (the second mostly from L1/L2). Fused variant writes residual_out = round(x + residual) first.
#include "codellama/rmsnorm.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool kFusedAdd>
__global__ void rms_norm_kernel(T* __restrict__ out, T* residual_out, const T* x, int64_t x_stride,
                                const T* residual, const T* __restrict__ w, int64_t dim, float eps) {
  const int64_t row = blockIdx.x;
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

}  // namespace

void rms_norm(DType dt, void* out, const void* x, int64_t x_stride, const void* weight, int64_t rows,
              int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "rms_norm", {
    rms_norm_kernel<scalar_t, false><<<rows, kThreads, 0, stream>>>(
        static_cast<scalar_t*>(out), nullptr, static_cast<const scalar_t*>(x), x_stride, nullptr,
        static_cast<const scalar_t*>(weight), dim, eps);
  });
  check_launch("rms_norm");
}

void fused_add_rms_norm(DType dt, void* out, void* residual_out, const void* x, const void* residual,
                        const void* weight, int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "fused_add_rms_norm", {
    rms_norm_kernel<scalar_t, true><<<rows, kThreads, 0, stream>>>(
        static_cast<scalar_t*>(out), static_cast<scalar_t*>(residual_out), static_cast<const scalar_t*>(x), dim,
        static_cast<const scalar_t*>(residual), static_cast<const scalar_t*>(weight), dim, eps);
  });
  check_launch("fused_add_rms_norm");
}

}  // namespace codellama::cuda
