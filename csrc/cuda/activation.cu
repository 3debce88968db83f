// out = round(round(g / (1 + expf(-g))) * up), g = x[:F], up = x[F:]: elementwise (silu_mul, cuda_common.cuh), grid
// (column blocks, rows).
#include "codellama/activation.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;

template <typename T>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t x_stride, int64_t rows,
                                    int64_t f) {
  grid_dependency_sync();
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* gate = x + r * x_stride;
    const T* up = gate + f;
    T* o = out + r * f;
    const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kPerThread + threadIdx.x;
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < f) o[i] = silu_mul<T>(to_f(gate[i]), to_f(up[i]));
    }
  }
}

}  // namespace

void silu_and_mul(DType dt, void* out, const void* x, int64_t x_stride, int64_t rows, int64_t f,
                  cudaStream_t stream) {
  if (rows == 0 || f == 0) return;
  const int64_t col_blocks = (f + kThreads * kPerThread - 1) / (kThreads * kPerThread);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(rows < 65535 ? rows : 65535));
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "silu_and_mul", {
    launch_kernel(silu_and_mul_kernel<scalar_t>, grid, kThreads, 0, stream, static_cast<scalar_t*>(out),
                  static_cast<const scalar_t*>(x), x_stride, rows, f);
  });
  check_launch("silu_and_mul");
}

}  // namespace codellama::cuda
