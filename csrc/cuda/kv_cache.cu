// k_cache[slots[t], positions[t]] = k[t], v_cache likewise, as a copy of units U: 16-byte vectors when every
// pointer, stride and head row allows (all CodeLlama shapes), else single elements. Grid (tokens, unit
// blocks): each thread copies one unit of k and one of v, so a decode step's single token is spread over
// several blocks with every load in flight at once (one block looping over the token took 5.3 us on an H200).
// Rows whose slot or position is out of range are skipped, so a bad index never writes outside the cache.
#include "codellama/attention.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 256;

// kc, vc [Bc, S, H, D]; k, v [T, H, D] with row / head strides (last dim contiguous); slots, positions [T];
// D and the strides counted in units U
template <typename U>
__global__ void __launch_bounds__(kThreads)
kv_cache_append_kernel(U* __restrict__ kc, U* __restrict__ vc, const U* __restrict__ k, int64_t k_rs, int64_t k_hs,
                       const U* __restrict__ v, int64_t v_rs, int64_t v_hs, const int32_t* __restrict__ slots,
                       const int32_t* __restrict__ positions, int64_t Bc, int64_t S, int H, int D) {
  const int64_t t = blockIdx.x;
  const int i = blockIdx.y * kThreads + threadIdx.x;
  if (i >= H * D) return;
  grid_dependency_sync();
  const int64_t slot = slots[t], pos = positions[t];
  if (slot < 0 || slot >= Bc || pos < 0 || pos >= S) return;
  const int h = i / D, d = i - h * D;
  const int64_t dst = (slot * S + pos) * H * D + i;
  kc[dst] = k[t * k_rs + h * k_hs + d];
  vc[dst] = v[t * v_rs + h * v_hs + d];
}

template <typename U, typename T>
void launch(const KVCache& c, HeadsView k, HeadsView v, const int32_t* slots, const int32_t* positions,
            int64_t tokens, cudaStream_t stream) {
  constexpr int64_t n = sizeof(U) / sizeof(T);  // elements per unit
  const int64_t units = c.kv_heads * c.head_dim / n;
  if (tokens > 0x7fffffff || units > 0x7fffffff) throw std::invalid_argument("kv_cache_append: too many tokens");
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>((units + kThreads - 1) / kThreads));
  launch_kernel(kv_cache_append_kernel<U>, grid, kThreads, 0, stream, static_cast<U*>(c.k), static_cast<U*>(c.v),
                static_cast<const U*>(k.data), k.row_stride / n, k.head_stride / n, static_cast<const U*>(v.data),
                v.row_stride / n, v.head_stride / n, slots, positions, c.batch, c.capacity,
                static_cast<int>(c.kv_heads), static_cast<int>(c.head_dim / n));
}

}  // namespace

void kv_cache_append(DType dt, const KVCache& cache, HeadsView k, HeadsView v, const int32_t* slots,
                     const int32_t* positions, int64_t tokens, cudaStream_t stream) {
  if (tokens == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "kv_cache_append", {
    constexpr int64_t n = kVec16<scalar_t>;
    const bool vec = cache.head_dim % n == 0 && k.row_stride % n == 0 && k.head_stride % n == 0 &&
                     v.row_stride % n == 0 && v.head_stride % n == 0 && aligned16(cache.k) && aligned16(cache.v) &&
                     aligned16(k.data) && aligned16(v.data);
    if (vec) {
      launch<uint4, scalar_t>(cache, k, v, slots, positions, tokens, stream);
    } else {
      launch<scalar_t, scalar_t>(cache, k, v, slots, positions, tokens, stream);
    }
  });
  check_launch("kv_cache_append");
}

}  // namespace codellama::cuda
