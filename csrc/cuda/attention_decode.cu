// Decode attention, split-K over the sequence ("flash-decoding"):
//   split s of sequence b, query heads of one kv group: (m_s, l_s, acc_s) = online softmax over its keys, with
//   p = round(exp(q.k * scale - m)) before P.v; combine: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// The number of splits depends on shapes only (decode_num_splits), so the launch is CUDA-graph capturable;
// splits past seq_len write empty partials (m = -inf, l = 0, acc = 0). Each block handles up to 8 query heads
// of one kv group, so each K/V row is read once per group. Scores: 8 lanes per key row; P.v: each thread
// loads 16 bytes of a V row (a block has 8 to 32 rows in flight) and the row groups' partial sums are added
// once at the end of the split.
#include <cmath>

#include "codellama/attention.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps; each warp scores 4 keys at a time (8 lanes per key)
constexpr int kTile = 64;      // keys per online-softmax step
constexpr int kMaxGroup = 8;   // query heads per block

// E consecutive elements of p (16-byte aligned) as floats, with 16-byte loads.
template <typename T, int E>
__device__ __forceinline__ void load_row(const T* p, float (&out)[E]) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(E % kVec == 0, "row piece must be a whole number of 16-byte vectors");
#pragma unroll
  for (int c = 0; c < E / kVec; ++c) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + c * kVec);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[c * kVec + e] = to_f(t[e]);
  }
}

// Workspace: m [NB], l [NB], acc [NB, D] with NB = B * Hq * splits, index (b * Hq + h) * splits + split.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
decode_split_kernel(const T* __restrict__ q, int64_t q_rs, int64_t q_hs, const T* __restrict__ kc,
                    const T* __restrict__ vc, int64_t Bc, int64_t S, int Hkv, int Hq, int GB,
                    const int32_t* __restrict__ slots, const int32_t* __restrict__ seq_lens, float scale,
                    float* __restrict__ ws, int splits, int chunk) {
  constexpr int E = D / 8;       // elements of a key row per lane (8 lanes per key) in the scores
  constexpr int VE = 16 / sizeof(T);  // elements of a V row per thread (one 16-byte load) in P.v
  constexpr int TPR = D / VE;         // threads per V row
  constexpr int RP = kThreads / TPR;  // V rows in flight at once
  static_assert(kThreads % TPR == 0, "head_dim must divide the block's 16-byte lanes");
  __shared__ __align__(16) float qs[kMaxGroup][D];
  __shared__ float ss[kMaxGroup][kTile];
  __shared__ float m_s[kMaxGroup], l_s[kMaxGroup], alpha_s[kMaxGroup];
  __shared__ float red[RP][kMaxGroup][D];  // per V-row lane group partial P.v, summed at the end

  const int split = blockIdx.x, b = blockIdx.z;
  const int h0 = blockIdx.y * GB, G = Hq / Hkv, kvh = h0 / G;
  const int tid = threadIdx.x;
  const int64_t NB = static_cast<int64_t>(gridDim.z) * Hq * splits;
  float* ws_m = ws;
  float* ws_l = ws + NB;
  float* ws_acc = ws + 2 * NB;

  const int64_t slot = slots[b];
  int64_t len = seq_lens[b];
  if (slot < 0 || slot >= Bc) len = 0;
  len = len < 0 ? 0 : (len > S ? S : len);
  const int64_t k0 = static_cast<int64_t>(split) * chunk;
  const int64_t k1 = k0 + chunk < len ? k0 + chunk : len;
  if (k0 >= k1) {  // empty split (uniform over the block)
    for (int i = tid; i < GB * D; i += kThreads) {
      const int g = i / D, d = i - g * D;
      const int64_t idx = (static_cast<int64_t>(b) * Hq + h0 + g) * splits + split;
      ws_acc[idx * D + d] = 0.f;
      if (d == 0) { ws_m[idx] = -INFINITY; ws_l[idx] = 0.f; }
    }
    return;
  }

  for (int i = tid; i < GB * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    qs[g][d] = to_f(q[b * q_rs + (h0 + g) * q_hs + d]);
  }
  if (tid < kMaxGroup) { m_s[tid] = -INFINITY; l_s[tid] = 0.f; }
  __syncthreads();

  const int64_t kv_rs = static_cast<int64_t>(Hkv) * D;
  const T* kb = kc + slot * S * kv_rs + kvh * D;
  const T* vb = vc + slot * S * kv_rs + kvh * D;
  const int lane = tid & 31, warp = tid >> 5, sub = lane >> 3, part = lane & 7;
  const int vc0 = (tid % TPR) * VE, vr = tid / TPR;  // this thread's V dims vc0 .. vc0 + VE - 1, rows vr + RP i
  float acc[kMaxGroup][VE];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
#pragma unroll
    for (int e = 0; e < VE; ++e) acc[g][e] = 0.f;
  }

  for (int64_t j0 = k0; j0 < k1; j0 += kTile) {
    const int n = static_cast<int>(k1 - j0 < kTile ? k1 - j0 : kTile);
    // scores: ss[g][jj] = q_g . k_{j0+jj} * scale (-inf past the split's end)
    for (int jj = warp * 4 + sub; jj < kTile; jj += kThreads / 8) {
      float kr[E];
      if (jj < n) {
        load_row<T, E>(kb + (j0 + jj) * kv_rs + part * E, kr);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) kr[e] = 0.f;
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= GB) break;
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(qs[g][part * E + e], kr[e], dot);
        dot += __shfl_xor_sync(0xffffffffu, dot, 4);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        if (part == 0) ss[g][jj] = jj < n ? dot * scale : -INFINITY;
      }
    }
    __syncthreads();
    // online softmax step, one warp per head: new max, p rounded to T, running sum of the unrounded p
    for (int g = warp; g < GB; g += kThreads / 32) {
      const float s0 = ss[g][lane], s1 = ss[g][lane + 32];
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));  // finite: n >= 1 valid key
      const float p0 = expf(s0 - m_new), p1 = expf(s1 - m_new);
      const float sum = warp_sum(p0 + p1);
      ss[g][lane] = round_to<T>(p0);
      ss[g][lane + 32] = round_to<T>(p1);
      if (lane == 0) {
        const float alpha = expf(m_old - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
    // acc[g][e] (dim vc0 + e, rows vr, vr + RP, ...) = acc[g][e] * alpha + sum_j p[g][j] v_j[vc0 + e]
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      const float alpha = g < GB ? alpha_s[g] : 0.f;
#pragma unroll
      for (int e = 0; e < VE; ++e) acc[g][e] *= alpha;
    }
    for (int jj = vr; jj < n; jj += RP) {
      float vv[VE];
      load_row<T, VE>(vb + (j0 + jj) * kv_rs + vc0, vv);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < GB) {
          const float p = ss[g][jj];
#pragma unroll
          for (int e = 0; e < VE; ++e) acc[g][e] = fmaf(p, vv[e], acc[g][e]);
        }
      }
    }
    __syncthreads();  // ss / alpha_s are rewritten by the next tile
  }

#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {  // constant indices keep acc in registers
    if (g < GB) {
#pragma unroll
      for (int e = 0; e < VE; ++e) red[vr][g][vc0 + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (int i = tid; i < GB * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    float sum = 0.f;
#pragma unroll
    for (int rr = 0; rr < RP; ++rr) sum += red[rr][g][d];
    const int64_t idx = (static_cast<int64_t>(b) * Hq + h0 + g) * splits + split;
    ws_acc[idx * D + d] = sum;
    if (d == 0) { ws_m[idx] = m_s[g]; ws_l[idx] = l_s[g]; }
  }
}

// out[b, h, d] = sum_s acc_s[d] e^(m_s - M) / sum_s l_s e^(m_s - M), rounded once. One block of D threads per (h, b).
template <typename T, int D>
__global__ void __launch_bounds__(D)
decode_combine_kernel(T* __restrict__ out, const float* __restrict__ ws, int Hq, int splits) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int64_t NB = static_cast<int64_t>(gridDim.y) * Hq * splits;
  const int64_t idx0 = (static_cast<int64_t>(b) * Hq + h) * splits;
  const float* ws_m = ws + idx0;
  const float* ws_l = ws + NB + idx0;
  const float* ws_acc = ws + 2 * NB + idx0 * D;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, ws_m[s]);
  float L = 0.f, o = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float ms = ws_m[s];
    if (ms == -INFINITY) continue;
    const float w = expf(ms - M);
    L = fmaf(ws_l[s], w, L);
    o = fmaf(ws_acc[s * D + d], w, o);
  }
  out[(static_cast<int64_t>(b) * Hq + h) * D + d] = from_f<T>(L > 0.f ? o / L : 0.f);
}

template <typename T, int D>
void launch(void* out, HeadsView q, int64_t batch, int64_t q_heads, const KVCache& c, const int32_t* slots,
            const int32_t* seq_lens, float scale, float* ws, int64_t splits, cudaStream_t stream) {
  const int64_t G = q_heads / c.kv_heads;
  int GB = 1;  // query heads per block: the largest divisor of G up to kMaxGroup
  for (int g = kMaxGroup; g >= 1; --g) if (G % g == 0) { GB = g; break; }
  int64_t chunk = (c.capacity + splits - 1) / splits;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  if (batch > 65535 || q_heads / GB > 65535 || splits > 0x7fffffff) {
    throw std::invalid_argument("attention_decode: batch or head count too large for the CUDA grid");
  }
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(q_heads / GB), static_cast<unsigned>(batch));
  decode_split_kernel<T, D><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(q.data), q.row_stride, q.head_stride, static_cast<const T*>(c.k),
      static_cast<const T*>(c.v), c.batch, c.capacity, static_cast<int>(c.kv_heads), static_cast<int>(q_heads), GB,
      slots, seq_lens, scale, ws, static_cast<int>(splits), static_cast<int>(chunk));
  check_launch("attention_decode (split)");
  decode_combine_kernel<T, D><<<dim3(static_cast<unsigned>(q_heads), static_cast<unsigned>(batch)), D, 0, stream>>>(
      static_cast<T*>(out), ws, static_cast<int>(q_heads), static_cast<int>(splits));
  check_launch("attention_decode (combine)");
}

}  // namespace

void attention_decode(DType dt, void* out, HeadsView q, int64_t batch, int64_t q_heads, const KVCache& cache,
                      const int32_t* slots, const int32_t* seq_lens, float scale, float* workspace, int64_t splits,
                      cudaStream_t stream) {
  if (batch == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "attention_decode", {
    if (cache.head_dim == 64) {
      launch<scalar_t, 64>(out, q, batch, q_heads, cache, slots, seq_lens, scale, workspace, splits, stream);
    } else if (cache.head_dim == 128) {
      launch<scalar_t, 128>(out, q, batch, q_heads, cache, slots, seq_lens, scale, workspace, splits, stream);
    } else {
      throw std::invalid_argument("attention_decode: head_dim must be 64 or 128 on CUDA, got " +
                                  std::to_string(cache.head_dim));
    }
  });
}

}  // namespace codellama::cuda
