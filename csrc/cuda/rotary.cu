// In-place RoPE: (x0, x1) <- (x0 c - x1 s, x0 s + x1 c) in fp32, c, s = cos, sin(pos * theta^(-2i/D)).
// A block first puts its token's D/2 (cos, sin) pairs in shared memory (accurate sincosf: angles reach 1e5 rad).
// Two launch shapes, both timed on an H200 (benchmarks/RESULTS.md, session 12):
// - few tokens (decode): grid (tokens, pair blocks), one pair per thread, loaded before the table is built so its
//   memory latency overlaps the table's arithmetic: 2.2 us for one 7B token, where one block looping over the
//   token's pairs took 7.2 us (each iteration's loads wait on the previous one's stores: q and k may alias);
// - many tokens (prefill): one block per token looping over its pairs, the table built once per token: 34 us for
//   2048 7B tokens, where the pair blocks took 88 us (ten tables per token). The crossover between the measured
//   points (1 and 2048 tokens) is estimated, not measured: kPairBlocksBelow.
#include "codellama/rotary.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kPairBlocksBelow = 128;  // tokens

// tab[i] = cos, tab[half + i] = sin of token t's angles (the whole block; the caller syncs)
__device__ __forceinline__ void fill_table(const RotaryArgs& a, int64_t t, float* tab) {
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
}

template <typename T>
__device__ __forceinline__ void store_rotated(T* p, int64_t j0, int64_t j1, float x0, float x1, float c, float s) {
  p[j0] = from_f<T>(fmaf(x0, c, -(x1 * s)));  // the CPU kernel's exact expression
  p[j1] = from_f<T>(fmaf(x1, c, x0 * s));
}

// Pair w of token t: the head's base pointer and the pair's two element offsets.
template <typename T>
__device__ __forceinline__ T* pair_at(const RotaryArgs& a, int64_t t, int64_t w, int64_t& j0, int64_t& j1) {
  const int64_t half = a.head_dim / 2;
  const int64_t h = w / half, i = w - h * half;
  j0 = a.interleaved ? 2 * i : i;
  j1 = a.interleaved ? 2 * i + 1 : i + half;
  return h < a.q_heads ? static_cast<T*>(a.q) + t * a.q_stride_t + h * a.q_stride_h
                       : static_cast<T*>(a.k) + t * a.k_stride_t + (h - a.q_heads) * a.k_stride_h;
}

// Grid (tokens, pair blocks): thread -> one pair.
template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_pair_kernel(RotaryArgs a) {
  extern __shared__ float tab[];  // cos [D/2], then sin [D/2]
  const int64_t t = blockIdx.x, half = a.head_dim / 2;
  const int64_t w = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = w < (a.q_heads + a.kv_heads) * half;
  grid_dependency_sync();
  int64_t j0 = 0, j1 = 0;
  T* p = nullptr;
  float x0 = 0.f, x1 = 0.f;
  if (active) {
    p = pair_at<T>(a, t, w, j0, j1);
    x0 = to_f(p[j0]);
    x1 = to_f(p[j1]);
  }
  fill_table(a, t, tab);
  __syncthreads();
  if (active) store_rotated(p, j0, j1, x0, x1, tab[w % half], tab[half + w % half]);
}

// Grid (tokens): the block loops over the token's pairs.
template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_token_kernel(RotaryArgs a) {
  extern __shared__ float tab[];
  const int64_t t = blockIdx.x, half = a.head_dim / 2;
  grid_dependency_sync();
  fill_table(a, t, tab);
  __syncthreads();
  const int64_t total = (a.q_heads + a.kv_heads) * half;
  for (int64_t w = threadIdx.x; w < total; w += blockDim.x) {
    int64_t j0, j1;
    T* p = pair_at<T>(a, t, w, j0, j1);
    store_rotated(p, j0, j1, to_f(p[j0]), to_f(p[j1]), tab[w % half], tab[half + w % half]);
  }
}

}  // namespace

void rotary_embedding(DType dt, const RotaryArgs& a, cudaStream_t stream) {
  if (a.head_dim % 2 != 0) throw std::invalid_argument("rotary_embedding: head_dim must be even");
  if (a.tokens == 0) return;
  const int64_t pairs = (a.q_heads + a.kv_heads) * (a.head_dim / 2);
  if (pairs == 0) return;
  if (a.tokens > 0x7fffffff || pairs > 0x7fffffff) {
    throw std::invalid_argument("rotary_embedding: too many tokens or heads for the CUDA grid");
  }
  const size_t smem = static_cast<size_t>(a.head_dim) * sizeof(float);
  const unsigned tokens = static_cast<unsigned>(a.tokens);
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "rotary_embedding", {
    if (a.tokens < kPairBlocksBelow) {
      const dim3 grid(tokens, static_cast<unsigned>((pairs + kThreads - 1) / kThreads));
      launch_kernel(rotary_pair_kernel<scalar_t>, grid, kThreads, smem, stream, a);
    } else {
      launch_kernel(rotary_token_kernel<scalar_t>, tokens, kThreads, smem, stream, a);
    }
  });
  check_launch("rotary_embedding");
}

}  // namespace codellama::cuda
