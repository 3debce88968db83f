// Prefill attention, tiled online softmax (flash-attention style, SIMT, fp32 math):
//   for each key tile: s = q.k * scale (causal: key <= start_pos + i), m' = max(m, max s), p = exp(s - m'),
//   l = l e^(m - m') + sum p, acc = acc e^(m - m') + round(p) V;  out = round(acc / l).
// One block of 256 threads per (64-query tile, query head, sequence); Q, a 64-key K tile and then the V tile
// are staged in shared memory as fp32; 4 threads per query row (each 16 keys of a tile, D/4 output dims).
// No T x T matrix is materialised; the grid comes from max_query_len (host value, no device sync).
// fp16 / bf16 use a tensor-core variant (WMMA 16x16x16, fp32 accumulate) of the same algorithm: 4 warps of 16
// query rows each; S = Q K^T and O += round(P) V on tensor cores, the online softmax on S in shared memory.
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "codellama/attention.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kBM = 64;  // query rows per block
constexpr int kBN = 64;  // keys per tile
constexpr int kThreads = 256;
constexpr int kKeysPerThread = kBN / 4;

template <int D>
constexpr size_t prefill_smem_bytes() {
  return sizeof(float) * (2 * kBM * (D + 1) + kBM * (kBN + 1));
}

// out [T, Hq, D] contiguous; q [T, Hq, D] with row / head strides; caches [Bc, S, Hkv, D];
// cu_seqlens [B+1], start_pos [B], slots [B]
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
prefill_kernel(T* __restrict__ out, const T* __restrict__ q, int64_t q_rs, int64_t q_hs, const T* __restrict__ kc,
               const T* __restrict__ vc, int64_t Bc, int64_t S, int Hkv, int Hq, const int32_t* __restrict__ cu,
               const int32_t* __restrict__ start_pos, const int32_t* __restrict__ slots, float scale) {
  constexpr int LD = D + 1;  // padded fp32 row stride: rows of a warp fall in different banks
  constexpr int PD = kBN + 1;
  constexpr int DPT = D / 4;  // output dims per thread: quad + 4 * i
  extern __shared__ float smem[];
  float* Qs = smem;              // [kBM][LD]
  float* KVs = Qs + kBM * LD;    // [kBN][LD]: K tile, then V tile
  float* Ps = KVs + kBN * LD;    // [kBM][PD]: rounded probabilities of the tile

  const int b = blockIdx.z, h = blockIdx.y, tid = threadIdx.x;
  const int64_t seq0 = cu[b];
  const int64_t len = static_cast<int64_t>(cu[b + 1]) - seq0;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  if (m0 >= len) return;  // uniform over the block
  const int rows = static_cast<int>(len - m0 < kBM ? len - m0 : kBM);
  const int64_t slot = slots[b], start = start_pos[b];
  const int r = tid >> 2, quad = tid & 3;
  T* orow = out + ((seq0 + m0 + r) * Hq + h) * D;
  if (slot < 0 || slot >= Bc || start < 0) {  // invalid indices (validated on the host): zeros, no reads
    if (r < rows) {
      for (int i = 0; i < DPT; ++i) orow[quad + 4 * i] = from_f<T>(0.f);
    }
    return;
  }
  const int kvh = h / (Hq / Hkv);
  const int64_t kv_rs = static_cast<int64_t>(Hkv) * D;
  const T* kb = kc + slot * S * kv_rs + kvh * D;
  const T* vb = vc + slot * S * kv_rs + kvh * D;
  const int64_t nkeys_all = start + m0 + rows;  // keys 0 .. last row's position
  const int64_t nkeys = nkeys_all < S ? nkeys_all : S;

  for (int i = tid; i < kBM * D; i += kThreads) {
    const int rr = i / D, d = i - rr * D;
    Qs[rr * LD + d] = rr < rows ? to_f(q[(seq0 + m0 + rr) * q_rs + h * q_hs + d]) : 0.f;
  }
  const int64_t qpos = start + m0 + r;  // absolute position of this thread's query row
  float m_i = -INFINITY, l_i = 0.f;
  float acc[DPT];
#pragma unroll
  for (int i = 0; i < DPT; ++i) acc[i] = 0.f;

  for (int64_t n0 = 0; n0 < nkeys; n0 += kBN) {
    __syncthreads();  // Q staged (first tile) / previous V tile consumed
    for (int i = tid; i < kBN * D; i += kThreads) {
      const int j = i / D, d = i - j * D;
      KVs[j * LD + d] = n0 + j < nkeys ? to_f(kb[(n0 + j) * kv_rs + d]) : 0.f;
    }
    __syncthreads();
    // scores of keys n0 + quad + 4 * i
    float s[kKeysPerThread];
#pragma unroll
    for (int i = 0; i < kKeysPerThread; ++i) s[i] = 0.f;
    for (int d0 = 0; d0 < D; d0 += 8) {
      float qv[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) qv[e] = Qs[r * LD + d0 + e];
#pragma unroll
      for (int i = 0; i < kKeysPerThread; ++i) {
        const float* kr = KVs + (quad + 4 * i) * LD + d0;
#pragma unroll
        for (int e = 0; e < 8; ++e) s[i] = fmaf(qv[e], kr[e], s[i]);
      }
    }
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kKeysPerThread; ++i) {
      const int64_t key = n0 + quad + 4 * i;
      s[i] = key <= qpos && key < nkeys ? s[i] * scale : -INFINITY;
      mx = fmaxf(mx, s[i]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_i, mx);  // finite: key 0 is in the first tile and <= qpos
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kKeysPerThread; ++i) {
      const float p = expf(s[i] - m_new);
      sum += p;
      Ps[r * PD + quad + 4 * i] = round_to<T>(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float alpha = expf(m_i - m_new);
    l_i = l_i * alpha + sum;
    m_i = m_new;
#pragma unroll
    for (int i = 0; i < DPT; ++i) acc[i] *= alpha;
    __syncthreads();  // K tile consumed, Ps written
    for (int i = tid; i < kBN * D; i += kThreads) {
      const int j = i / D, d = i - j * D;
      KVs[j * LD + d] = n0 + j < nkeys ? to_f(vb[(n0 + j) * kv_rs + d]) : 0.f;
    }
    __syncthreads();
    const int jn = nkeys - n0 < kBN ? static_cast<int>(nkeys - n0) : kBN;
    for (int j = 0; j < jn; ++j) {
      const float p = Ps[r * PD + j];
      const float* vr = KVs + j * LD + quad;
#pragma unroll
      for (int i = 0; i < DPT; ++i) acc[i] = fmaf(p, vr[4 * i], acc[i]);
    }
  }
  if (r < rows) {
    const float inv = l_i > 0.f ? 1.f / l_i : 0.f;
#pragma unroll
    for (int i = 0; i < DPT; ++i) orow[quad + 4 * i] = from_f<T>(acc[i] * inv);
  }
}


// ---- tensor-core variant (fp16 / bf16) ----
constexpr int kTcThreads = 128;  // 4 warps x 16 query rows

template <int D>
struct TcLayout {  // shared-memory leading dimensions (elements) and byte offsets; all 32-byte aligned
  static constexpr int LDH = D + 8;    // Q, K, V tiles (16-bit)
  static constexpr int LDS = kBN + 4;  // S (fp32)
  static constexpr int LDP = kBN + 8;  // P (16-bit)
  static constexpr int LDO = D + 4;    // O accumulator (fp32)
  static constexpr size_t q = 0;
  static constexpr size_t k = q + 2 * kBM * LDH;
  static constexpr size_t v = k + 2 * kBN * LDH;
  static constexpr size_t s = v + 2 * kBN * LDH;
  static constexpr size_t p = s + 4 * kBM * LDS;
  static constexpr size_t o = p + 2 * kBM * LDP;
  static constexpr size_t bytes = o + 4 * kBM * LDO;
};

template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
prefill_tc_kernel(T* __restrict__ out, const T* __restrict__ q, int64_t q_rs, int64_t q_hs, const T* __restrict__ kc,
                  const T* __restrict__ vc, int64_t Bc, int64_t S, int Hkv, int Hq, const int32_t* __restrict__ cu,
                  const int32_t* __restrict__ start_pos, const int32_t* __restrict__ slots, float scale) {
  namespace wmma = nvcuda::wmma;
  using L = TcLayout<D>;
  constexpr int kVec = 8;  // 16-bit elements per 16-byte load
  extern __shared__ __align__(128) unsigned char tc_smem[];
  T* Qs = reinterpret_cast<T*>(tc_smem + L::q);
  T* Ks = reinterpret_cast<T*>(tc_smem + L::k);
  T* Vs = reinterpret_cast<T*>(tc_smem + L::v);
  float* Ss = reinterpret_cast<float*>(tc_smem + L::s);
  T* Ps = reinterpret_cast<T*>(tc_smem + L::p);
  float* Os = reinterpret_cast<float*>(tc_smem + L::o);

  const int b = blockIdx.z, h = blockIdx.y, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t seq0 = cu[b];
  const int64_t len = static_cast<int64_t>(cu[b + 1]) - seq0;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  if (m0 >= len) return;  // uniform over the block
  const int rows = static_cast<int>(len - m0 < kBM ? len - m0 : kBM);
  const int64_t slot = slots[b], start = start_pos[b];
  // softmax / output mapping: 2 lanes per row, each half of the keys of a tile and half of the output dims
  const int r = warp * 16 + (lane >> 1), side = lane & 1;
  T* orow = out + ((seq0 + m0 + r) * Hq + h) * D;
  if (slot < 0 || slot >= Bc || start < 0) {
    if (r < rows) {
      for (int d = side * (D / 2); d < (side + 1) * (D / 2); ++d) orow[d] = from_f<T>(0.f);
    }
    return;
  }
  const int kvh = h / (Hq / Hkv);
  const int64_t kv_rs = static_cast<int64_t>(Hkv) * D;
  const T* kb = kc + slot * S * kv_rs + kvh * D;
  const T* vb = vc + slot * S * kv_rs + kvh * D;
  const int64_t nkeys_all = start + m0 + rows;
  const int64_t nkeys = nkeys_all < S ? nkeys_all : S;

  for (int i = tid; i < kBM * D; i += kTcThreads) {
    const int rr = i / D, d = i - rr * D;
    Qs[rr * L::LDH + d] = rr < rows ? q[(seq0 + m0 + rr) * q_rs + h * q_hs + d] : from_f<T>(0.f);
    Os[rr * L::LDO + d] = 0.f;
  }
  const int64_t qpos = start + m0 + r;
  float m_i = -INFINITY, l_i = 0.f;

  for (int64_t n0 = 0; n0 < nkeys; n0 += kBN) {
    __syncthreads();  // Q / O staged (first tile), previous K / V consumed by every warp
    for (int i = tid; i < kBN * (D / kVec); i += kTcThreads) {
      const int j = i / (D / kVec), c = i - j * (D / kVec);
      uint4 kv4 = make_uint4(0u, 0u, 0u, 0u), vv4 = make_uint4(0u, 0u, 0u, 0u);
      if (n0 + j < nkeys) {
        kv4 = *reinterpret_cast<const uint4*>(kb + (n0 + j) * kv_rs + c * kVec);
        vv4 = *reinterpret_cast<const uint4*>(vb + (n0 + j) * kv_rs + c * kVec);
      }
      *reinterpret_cast<uint4*>(Ks + j * L::LDH + c * kVec) = kv4;
      *reinterpret_cast<uint4*>(Vs + j * L::LDH + c * kVec) = vv4;
    }
    __syncthreads();
    // S (this warp's 16 rows x 64 keys) = Q K^T in fp32
#pragma unroll
    for (int nb = 0; nb < kBN / 16; ++nb) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kb16 = 0; kb16 < D / 16; ++kb16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, Qs + warp * 16 * L::LDH + kb16 * 16, L::LDH);
        wmma::load_matrix_sync(bt, Ks + nb * 16 * L::LDH + kb16 * 16, L::LDH);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(Ss + warp * 16 * L::LDS + nb * 16, acc, L::LDS, wmma::mem_row_major);
    }
    __syncwarp();
    // online softmax of row r over keys side * 32 .. + 31 (rotated start: fewer bank conflicts)
    float* srow = Ss + r * L::LDS + side * 32;
    T* prow = Ps + r * L::LDP + side * 32;
    float mx = -INFINITY;
    for (int jj = 0; jj < 32; ++jj) {
      const int j = (jj + lane) & 31;
      const int64_t key = n0 + side * 32 + j;
      const float sv = key <= qpos && key < nkeys ? srow[j] * scale : -INFINITY;
      srow[j] = sv;
      mx = fmaxf(mx, sv);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);  // finite: key 0 is in the first tile and <= qpos
    float sum = 0.f;
    for (int jj = 0; jj < 32; ++jj) {
      const int j = (jj + lane) & 31;
      const float pv = expf(srow[j] - m_new);
      sum += pv;
      prow[j] = from_f<T>(pv);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = expf(m_i - m_new);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    float* orow_s = Os + r * L::LDO + side * (D / 2);
    for (int d = 0; d < D / 2; ++d) orow_s[d] *= alpha;
    __syncwarp();
    // O (this warp's 16 rows x D) += P V
#pragma unroll
    for (int cb = 0; cb < D / 16; ++cb) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + warp * 16 * L::LDO + cb * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
      for (int kb16 = 0; kb16 < kBN / 16; ++kb16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, Ps + warp * 16 * L::LDP + kb16 * 16, L::LDP);
        wmma::load_matrix_sync(bv, Vs + kb16 * 16 * L::LDH + cb * 16, L::LDH);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(Os + warp * 16 * L::LDO + cb * 16, acc, L::LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncthreads();  // O staged by other threads when there was no key tile at all
  if (r < rows) {
    const float inv = l_i > 0.f ? 1.f / l_i : 0.f;
    const float* orow_s = Os + r * L::LDO;
    for (int d = side * (D / 2); d < (side + 1) * (D / 2); ++d) orow[d] = from_f<T>(orow_s[d] * inv);
  }
}

void set_smem(const void* kernel, size_t bytes) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("attention_prefill: cannot reserve shared memory: ") + cudaGetErrorString(err));
  }
}

template <typename T, int D>
void launch(void* out, HeadsView q, int64_t q_heads, const KVCache& c, const int32_t* cu_seqlens,
            const int32_t* start_pos, const int32_t* slots, int64_t batch, int64_t max_query_len, float scale,
            cudaStream_t stream) {
  const int64_t tiles = (max_query_len + kBM - 1) / kBM;
  if (tiles == 0) return;
  if (batch > 65535 || q_heads > 65535 || tiles > 0x7fffffff) {
    throw std::invalid_argument("attention_prefill: batch or head count too large for the CUDA grid");
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(q_heads), static_cast<unsigned>(batch));
  if constexpr (std::is_same_v<T, float>) {
    constexpr size_t smem = prefill_smem_bytes<D>();
    auto kernel = prefill_kernel<T, D>;
    set_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<T*>(out), static_cast<const T*>(q.data), q.row_stride,
                                              q.head_stride, static_cast<const T*>(c.k), static_cast<const T*>(c.v),
                                              c.batch, c.capacity, static_cast<int>(c.kv_heads),
                                              static_cast<int>(q_heads), cu_seqlens, start_pos, slots, scale);
  } else {
    constexpr size_t smem = TcLayout<D>::bytes;
    auto kernel = prefill_tc_kernel<T, D>;
    set_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, kTcThreads, smem, stream>>>(static_cast<T*>(out), static_cast<const T*>(q.data), q.row_stride,
                                                q.head_stride, static_cast<const T*>(c.k), static_cast<const T*>(c.v),
                                                c.batch, c.capacity, static_cast<int>(c.kv_heads),
                                                static_cast<int>(q_heads), cu_seqlens, start_pos, slots, scale);
  }
  check_launch("attention_prefill");
}

}  // namespace

void attention_prefill(DType dt, void* out, HeadsView q, int64_t tokens, int64_t q_heads, const KVCache& cache,
                       const int32_t* cu_seqlens, const int32_t* start_pos, const int32_t* slots, int64_t batch,
                       int64_t max_query_len, float scale, cudaStream_t stream) {
  if (tokens == 0 || batch == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "attention_prefill", {
    if (cache.head_dim == 64) {
      launch<scalar_t, 64>(out, q, q_heads, cache, cu_seqlens, start_pos, slots, batch, max_query_len, scale, stream);
    } else if (cache.head_dim == 128) {
      launch<scalar_t, 128>(out, q, q_heads, cache, cu_seqlens, start_pos, slots, batch, max_query_len, scale,
                            stream);
    } else {
      throw std::invalid_argument("attention_prefill: head_dim must be 64 or 128 on CUDA, got " +
                                  std::to_string(cache.head_dim));
    }
  });
}

}  // namespace codellama::cuda
