// k_cache[slots[t], positions[t]] = k[t], v_cache likewise: one block per token copies its Hkv * D elements.
// Rows whose slot or position is out of range are skipped, so a bad index never writes outside the cache.
#include "codellama/attention.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 256;

// kc, vc [Bc, S, H, D]; k, v [T, H, D] with row / head strides (last dim contiguous); slots, positions [T]
template <typename T>
__global__ void kv_cache_append_kernel(T* __restrict__ kc, T* __restrict__ vc, const T* __restrict__ k,
                                       int64_t k_rs, int64_t k_hs, const T* __restrict__ v, int64_t v_rs,
                                       int64_t v_hs, const int32_t* __restrict__ slots,
                                       const int32_t* __restrict__ positions, int64_t Bc, int64_t S, int H, int D) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t], pos = positions[t];
  if (slot < 0 || slot >= Bc || pos < 0 || pos >= S) return;
  const int64_t base = (slot * S + pos) * H * D;
  for (int i = threadIdx.x; i < H * D; i += blockDim.x) {
    const int h = i / D, d = i - h * D;
    kc[base + i] = k[t * k_rs + h * k_hs + d];
    vc[base + i] = v[t * v_rs + h * v_hs + d];
  }
}

}  // namespace

void kv_cache_append(DType dt, const KVCache& cache, HeadsView k, HeadsView v, const int32_t* slots,
                     const int32_t* positions, int64_t tokens, cudaStream_t stream) {
  if (tokens == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "kv_cache_append", {
    kv_cache_append_kernel<scalar_t><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
        static_cast<scalar_t*>(cache.k), static_cast<scalar_t*>(cache.v), static_cast<const scalar_t*>(k.data),
        k.row_stride, k.head_stride, static_cast<const scalar_t*>(v.data), v.row_stride, v.head_stride, slots,
        positions, cache.batch, cache.capacity, static_cast<int>(cache.kv_heads), static_cast<int>(cache.head_dim));
  });
  check_launch("kv_cache_append");
}

}  // namespace codellama::cuda
