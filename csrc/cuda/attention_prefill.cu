// Prefill attention, tiled online softmax (flash-attention style, SIMT, fp32 math):
//   for each key tile: s = q.k * scale (causal: key <= start_pos + i), m' = max(m, max s), p = exp(s - m'),
//   l = l e^(m - m') + sum p, acc = acc e^(m - m') + round(p) V;  out = round(acc / l).
// One block of 256 threads per (64-query tile, query head, sequence); Q, a 64-key K tile and then the V tile
// are staged in shared memory as fp32; 4 threads per query row (each 16 keys of a tile, D/4 output dims).
// No T x T matrix is materialised; the grid comes from max_query_len (host value, no device sync).
// fp16 / bf16 use a tensor-core variant of the same algorithm (below: mma.sync, registers, cp.async).
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
  grid_dependency_sync();
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


// ---- tensor-core variant (fp16 / bf16): flash-attention-2 on mma.sync m16n8k16 ----
// 4 warps x 16 query rows. Q fragments stay in registers for the whole key loop; S = Q K^T and O += P V
// accumulate in fp32 registers (C fragments), the online softmax runs on those registers (each row lives in
// one quad of lanes), and the C fragments of P become the A fragments of P V without leaving registers.
// K / V tiles are double-buffered in shared memory with cp.async: tile t + 1 loads while tile t computes.
// Blocks take query tiles from the last one down, so the longest causal rows start first.
constexpr int kTcThreads = 128;

template <int D>
struct TcLayout {
  static constexpr int LD = D + 8;  // 16-bit elements per shared row: 16-byte rows that ldmatrix reads conflict-free
  static constexpr size_t bytes = 2 * static_cast<size_t>(kBM + 4 * kBN) * LD;  // Q, K[2], V[2]
};

template <typename T> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8; register i holds matrix i,
// row lane / 4, columns 2 (lane % 4) and + 1 (transposed: rows 2 (lane % 4) and + 1, column lane / 4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
// 16 bytes global -> shared, asynchronously; zero-filled when !valid (nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all_but_newest() { asm volatile("cp.async.wait_group 1;\n" ::); }

template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
prefill_tc_kernel(T* __restrict__ out, const T* __restrict__ q, int64_t q_rs, int64_t q_hs, const T* __restrict__ kc,
                  const T* __restrict__ vc, int64_t Bc, int64_t S, int Hkv, int Hq, const int32_t* __restrict__ cu,
                  const int32_t* __restrict__ start_pos, const int32_t* __restrict__ slots, float scale) {
  constexpr int LD = TcLayout<D>::LD;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(128) unsigned char tc_smem[];
  T* Qs = reinterpret_cast<T*>(tc_smem);  // [kBM][LD]
  T* Ks = Qs + kBM * LD;                  // [2][kBN][LD]
  T* Vs = Ks + 2 * kBN * LD;              // [2][kBN][LD]

  const int b = blockIdx.z, h = blockIdx.y, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  grid_dependency_sync();
  const int64_t seq0 = cu[b];
  const int64_t len = static_cast<int64_t>(cu[b + 1]) - seq0;
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBM;
  if (m0 >= len) return;  // uniform over the block
  const int rows = static_cast<int>(len - m0 < kBM ? len - m0 : kBM);
  const int64_t slot = slots[b], start = start_pos[b];
  if (slot < 0 || slot >= Bc || start < 0) {  // invalid indices (validated on the host): zeros, no reads
    for (int i = tid; i < rows * D; i += kTcThreads) out[((seq0 + m0 + i / D) * Hq + h) * D + i % D] = from_f<T>(0.f);
    return;
  }
  const int kvh = h / (Hq / Hkv);
  const int64_t kv_rs = static_cast<int64_t>(Hkv) * D;
  const T* kb = kc + slot * S * kv_rs + kvh * D;
  const T* vb = vc + slot * S * kv_rs + kvh * D;
  const int64_t nkeys_all = start + m0 + rows;  // keys 0 .. the last row's position
  const int64_t nkeys = nkeys_all < S ? nkeys_all : S;
  const int ntiles = static_cast<int>((nkeys + kBN - 1) / kBN);

  auto load_tile = [&](int t, int buf) {
    T* kd = Ks + buf * kBN * LD;
    T* vd = Vs + buf * kBN * LD;
    for (int i = tid; i < kBN * kChunks; i += kTcThreads) {
      const int j = i / kChunks, c = i - j * kChunks;
      const int64_t key = static_cast<int64_t>(t) * kBN + j;
      const bool valid = key < nkeys;
      const int64_t off = (valid ? key : 0) * kv_rs + c * 8;
      cp_async16(kd + j * LD + c * 8, kb + off, valid);
      cp_async16(vd + j * LD + c * 8, vb + off, valid);
    }
  };
  load_tile(0, 0);
  cp_async_commit();
  for (int i = tid; i < kBM * D; i += kTcThreads) {  // Q rows may be strided views: element loads, once
    const int rr = i / D, d = i - rr * D;
    Qs[rr * LD + d] = rr < rows ? q[(seq0 + m0 + rr) * q_rs + h * q_hs + d] : from_f<T>(0.f);
  }
  __syncthreads();
  uint32_t qf[D / 16][4];  // A fragments of this warp's 16 rows
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], Qs + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // rows g and g + 8; l: this lane's share
  const int64_t qpos0 = start + m0 + warp * 16 + g;                   // absolute positions of rows g, g + 8

  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    if (t + 1 < ntiles) load_tile(t + 1, buf ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning "tile t"
    cp_async_wait_all_but_newest();
    __syncthreads();
    const T* Kt = Ks + buf * kBN * LD;
    const T* Vt = Vs + buf * kBN * LD;

    float s[kBN / 8][4];
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nb = 0; nb < kBN / 16; ++nb) {
        uint32_t kf[4];  // B fragments of key tiles 2 nb and 2 nb + 1
        ldmatrix_x4(kf, Kt + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
        Mma<T>::run(s[2 * nb], qf[kk], kf);
        Mma<T>::run(s[2 * nb + 1], qf[kk], kf + 2);
      }
    }
    // mask, running max, p = exp(s - m); element e of key tile j: row g + 8 (e / 2), key 8 j + 2 tig + e % 2
    const int64_t key0 = static_cast<int64_t>(t) * kBN + 2 * tig;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = key0 + 8 * j + (e & 1);
        const bool ok = key <= qpos0 + 8 * (e >> 1) && key < nkeys;
        s[j][e] = ok ? s[j][e] * scale : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: p = 0, no NaN
      alpha[r] = expf(m_run[r] - m_use[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
    }
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = expf(s[j][e] - m_use[e >> 1]);
        l_run[e >> 1] += s[j][e];
      }
    }
    // O += round(P) V: the C fragments of key tiles 2 kk, 2 kk + 1 are the A fragment of key step kk
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pf[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                              Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nb = 0; nb < D / 16; ++nb) {
        uint32_t vf[4];  // B fragments of output-dim tiles 2 nb and 2 nb + 1
        ldmatrix_x4_trans(vf, Vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nb * 16 + (lane >> 4) * 8);
        Mma<T>::run(o[2 * nb], pf, vf);
        Mma<T>::run(o[2 * nb + 1], pf, vf + 2);
      }
    }
    __syncthreads();  // every warp is done with buffer `buf` before iteration t + 1 refills it
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    const int row = warp * 16 + g + 8 * r;
    if (row >= rows) continue;
    const float inv = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
    T* orow = out + ((seq0 + m0 + row) * Hq + h) * D + 2 * tig;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      orow[8 * j] = from_f<T>(o[j][2 * r] * inv);
      orow[8 * j + 1] = from_f<T>(o[j][2 * r + 1] * inv);
    }
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
  const auto run = [&](auto kernel, int threads, size_t smem) {
    set_smem(reinterpret_cast<const void*>(kernel), smem);
    launch_kernel(kernel, grid, threads, smem, stream, static_cast<T*>(out), static_cast<const T*>(q.data),
                  q.row_stride, q.head_stride, static_cast<const T*>(c.k), static_cast<const T*>(c.v), c.batch,
                  c.capacity, static_cast<int>(c.kv_heads), static_cast<int>(q_heads), cu_seqlens, start_pos, slots,
                  scale);
  };
  if constexpr (std::is_same_v<T, float>) {
    run(prefill_kernel<T, D>, kThreads, prefill_smem_bytes<D>());
  } else {
    run(prefill_tc_kernel<T, D>, kTcThreads, TcLayout<D>::bytes);
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
