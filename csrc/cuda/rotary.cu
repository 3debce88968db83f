// In-place RoPE: (x0, x1) <- (x0 c - x1 s, x0 s + x1 c) in fp32, c, s = cos, sin(pos * theta^(-2i/D)).
// One block per token: the D/2 (cos, sin) pairs go to shared memory (accurate sincosf: angles reach 1e5
// rad), then the block rotates every pair of every q and k head of the token.
#include "codellama/rotary.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ void rotate_pair(T* p, int64_t j0, int64_t j1, float c, float s) {
  const float x0 = to_f(p[j0]), x1 = to_f(p[j1]);
  p[j0] = from_f<T>(fmaf(x0, c, -(x1 * s)));  // the CPU kernel's exact expression
  p[j1] = from_f<T>(fmaf(x1, c, x0 * s));
}

template <typename T>
__global__ void rotary_kernel(RotaryArgs a) {
  extern __shared__ float tab[];  // cos [D/2], then sin [D/2]
  const int64_t t = blockIdx.x;
  const int64_t half = a.head_dim / 2;
  const int64_t pos = a.positions_int64 ? static_cast<const int64_t*>(a.positions)[t]
                                        : static_cast<const int32_t*>(a.positions)[t];
  const float fpos = static_cast<float>(pos);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(a.head_dim);
    const float denom = static_cast<float>(pow(static_cast<double>(a.theta), static_cast<double>(exponent)));
    const float inv_freq = 1.0f / denom;
    float s, c;
    sincosf(fpos * inv_freq, &s, &c);
    tab[i] = c;
    tab[half + i] = s;
  }
  __syncthreads();
  T* q = static_cast<T*>(a.q) + t * a.q_stride_t;
  T* k = static_cast<T*>(a.k) + t * a.k_stride_t;
  const int64_t total = (a.q_heads + a.kv_heads) * half;
  for (int64_t w = threadIdx.x; w < total; w += blockDim.x) {
    const int64_t h = w / half, i = w - h * half;
    T* p = h < a.q_heads ? q + h * a.q_stride_h : k + (h - a.q_heads) * a.k_stride_h;
    if (a.interleaved) rotate_pair(p, 2 * i, 2 * i + 1, tab[i], tab[half + i]);
    else rotate_pair(p, i, i + half, tab[i], tab[half + i]);
  }
}

}  // namespace

void rotary_embedding(DType dt, const RotaryArgs& a, cudaStream_t stream) {
  if (a.head_dim % 2 != 0) throw std::invalid_argument("rotary_embedding: head_dim must be even");
  if (a.tokens == 0) return;
  const size_t smem = static_cast<size_t>(a.head_dim) * sizeof(float);
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "rotary_embedding", {
    rotary_kernel<scalar_t><<<static_cast<unsigned>(a.tokens), kThreads, smem, stream>>>(a);
  });
  check_launch("rotary_embedding");
}

}  // namespace codellama::cuda
