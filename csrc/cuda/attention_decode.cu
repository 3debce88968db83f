// Decode attention, split-K over the sequence ("flash-decoding"):
//   split s of sequence b, query heads of one kv group: m_s = max of its scores, p = round(exp(s - m_s)),
//   l_s = sum of the unrounded exp, acc_s = sum p v; combine: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// The number of splits depends on shapes only (decode_num_splits), so the launch is CUDA-graph capturable; each
// sequence's keys are spread evenly over them (at most `chunk` per split, the score buffer's stride), so a short
// sequence in a long cache still has every split's block working on it (with splits of `chunk` keys from 0, one
// block per head did all of a short sequence: 9.6 us per 7B layer at 80 keys on an H200); splits with no keys
// write empty partials (m = -inf, l = 0, acc = 0). Each block handles up to 8 query heads
// of one kv group, so each K/V row is read once per group. A block works in three phases with one barrier
// between them, so each phase is a long run of independent loads: (1) all scores of the split into shared
// memory (8 lanes per key row), (2) per head one warp takes the max and the exponentials, (3) P.v with each
// thread loading 16 bytes of a V row (8 to 32 rows in flight per block); the row groups' partial sums are
// added once at the end. Phases (1) and (3) unroll 4 iterations so that many loads are in flight per thread: a
// short sequence is latency-bound (10 us per layer at 80 keys, 7B, H200, with 2).
#include <cmath>

#include "codellama/attention.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;      // the score buffer's per-head stride (chunk) is whole tiles
constexpr int kMaxGroup = 8;   // query heads per block (decode_heads_per_block)

// E consecutive elements of p (16-byte aligned) as floats, with 16-byte loads.
template <typename T, int E>
__device__ __forceinline__ void load_row(const T* p, float (&out)[E]) {
  static_assert(E % kVec16<T> == 0, "row piece must be a whole number of 16-byte vectors");
#pragma unroll
  for (int c = 0; c < E / kVec16<T>; ++c) load16(p + c * kVec16<T>, out + c * kVec16<T>);
}

// Workspace: m [NB], l [NB], acc [NB, D] with NB = B * Hq * splits, index (b * Hq + h) * splits + split.
// chunk * GB <= kDecodeMaxScores (decode_num_splits guarantees it).
// KG: a bound on the block's query heads GB (1, 2, 4 or 8): the P.v accumulators are KG x 16 bytes of V per thread,
// so a one-head block (7B, 13B) does not hold registers for eight (120 registers per thread for KG = 8 let 4 blocks
// of 128 threads share an SM: 1024 blocks of a 4096-key decode ran in two waves).
template <typename T, int D, int KG>
__global__ void __launch_bounds__(kThreads)
decode_split_kernel(const T* __restrict__ q, int64_t q_rs, int64_t q_hs, const T* __restrict__ kc,
                    const T* __restrict__ vc, int64_t Bc, int64_t S, int Hkv, int Hq, int GB,
                    const int32_t* __restrict__ slots, const int32_t* __restrict__ seq_lens, float scale,
                    float* __restrict__ ws, int splits, int chunk) {
  constexpr int E = D / 8;            // elements of a key row per lane (8 lanes per key) in the scores
  constexpr int VE = 16 / sizeof(T);  // elements of a V row per thread (one 16-byte load) in P.v
  constexpr int TPR = D / VE;         // threads per V row
  constexpr int RP = kThreads / TPR;  // V rows in flight at once
  static_assert(kThreads % TPR == 0 && TPR <= 32, "head_dim must suit the block's 16-byte lanes");
  constexpr int E4 = E / 4;           // float4s of q per lane and head
  static_assert(E % 4 == 0 && KG <= kMaxGroup, "whole float4s of q per lane; at most kMaxGroup heads");
  static_assert(kWarps * KG * D <= kDecodeMaxScores, "the P.v reduction reuses the score buffer");
  // q [KG][E4][8 parts] float4s: lane `part` of a key's 8 reads q[g][part * E .. part * E + E) as E4 float4s, and
  // the 8 parts' float4s at one step are 128 contiguous bytes (no bank conflicts; with q [g][d] they were 4-way)
  __shared__ __align__(16) float4 qs[KG][E4][8];
  __shared__ float ss[kDecodeMaxScores];  // scores, then probabilities: ss[g * chunk + j]; finally P.v partials

  const int split = blockIdx.x, b = blockIdx.z;
  const int h0 = blockIdx.y * GB, G = Hq / Hkv, kvh = h0 / G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t NB = static_cast<int64_t>(gridDim.z) * Hq * splits;
  float* ws_m = ws;
  float* ws_l = ws + NB;
  float* ws_acc = ws + 2 * NB;
  const int64_t idx0 = (static_cast<int64_t>(b) * Hq + h0) * splits + split;  // + g * splits for head h0 + g

  grid_dependency_sync();
  const int64_t slot = slots[b];
  int64_t len = seq_lens[b];
  if (slot < 0 || slot >= Bc) len = 0;
  len = len < 0 ? 0 : (len > S ? S : len);
  const int64_t per = (len + splits - 1) / splits;  // <= chunk: len <= S <= splits * chunk
  const int64_t k0 = static_cast<int64_t>(split) * per;
  const int n = static_cast<int>(k0 >= len ? 0 : (len - k0 < per ? len - k0 : per));
  if (n == 0) {  // empty split (uniform over the block)
    for (int i = tid; i < GB * D; i += kThreads) {
      const int g = i / D, d = i - g * D;
      const int64_t idx = idx0 + static_cast<int64_t>(g) * splits;
      ws_acc[idx * D + d] = 0.f;
      if (d == 0) { ws_m[idx] = -INFINITY; ws_l[idx] = 0.f; }
    }
    return;
  }
  for (int i = tid; i < GB * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    const int part = d / E, e = d - part * E;
    reinterpret_cast<float*>(&qs[g][e / 4][part])[e % 4] = to_f(q[b * q_rs + (h0 + g) * q_hs + d]);
  }
  __syncthreads();

  const int64_t kv_rs = static_cast<int64_t>(Hkv) * D;
  const T* kb = kc + (slot * S + k0) * kv_rs + kvh * D;
  const T* vb = vc + (slot * S + k0) * kv_rs + kvh * D;

  // (1) scores: key j by the 8 lanes `part` of sub-group `sub`; the loop bound is uniform over each warp
  // (its shuffles need all 32 lanes), keys past n are zeros and not stored
  const int sub = lane >> 3, part = lane & 7;
#pragma unroll 4
  for (int j0 = 0; j0 < n; j0 += kThreads / 8) {
    const int j = j0 + warp * 4 + sub;
    float kr[E];
    if (j < n) {
      load_row<T, E>(kb + j * kv_rs + part * E, kr);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) kr[e] = 0.f;
    }
#pragma unroll
    for (int g = 0; g < KG; ++g) {
      if (g >= GB) break;
      float dot = 0.f;
#pragma unroll
      for (int c = 0; c < E4; ++c) {
        const float4 qv = qs[g][c][part];
        dot = fmaf(qv.x, kr[4 * c], dot);
        dot = fmaf(qv.y, kr[4 * c + 1], dot);
        dot = fmaf(qv.z, kr[4 * c + 2], dot);
        dot = fmaf(qv.w, kr[4 * c + 3], dot);
      }
      dot += __shfl_xor_sync(0xffffffffu, dot, 4);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      if (part == 0 && j < n) ss[g * chunk + j] = dot * scale;
    }
  }
  __syncthreads();

  // (2) one warp per head: m = max, p = round(exp(s - m)) in place, l = sum of the unrounded exp
  for (int g = warp; g < GB; g += kWarps) {
    float* sg = ss + g * chunk;
    float mx = -INFINITY;
    for (int j = lane; j < n; j += 32) mx = fmaxf(mx, sg[j]);
    mx = warp_max(mx);  // finite: n >= 1 scores
    float sum = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float p = expf(sg[j] - mx);
      sum += p;
      sg[j] = round_to<T>(p);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      const int64_t idx = idx0 + static_cast<int64_t>(g) * splits;
      ws_m[idx] = mx;
      ws_l[idx] = sum;
    }
  }
  __syncthreads();

  // (3) acc[g][e] (dim vc0 + e) = sum over rows vr, vr + RP, ... of p[g][j] v_j[vc0 + e]
  const int vc0 = (tid % TPR) * VE, vr = tid / TPR;
  float acc[KG][VE];
#pragma unroll
  for (int g = 0; g < KG; ++g) {
#pragma unroll
    for (int e = 0; e < VE; ++e) acc[g][e] = 0.f;
  }
#pragma unroll 4
  for (int j = vr; j < n; j += RP) {
    float vv[VE];
    load_row<T, VE>(vb + j * kv_rs + vc0, vv);
#pragma unroll
    for (int g = 0; g < KG; ++g) {
      if (g < GB) {
        const float p = ss[g * chunk + j];
#pragma unroll
        for (int e = 0; e < VE; ++e) acc[g][e] = fmaf(p, vv[e], acc[g][e]);
      }
    }
  }
  // row groups of one warp (lanes TPR apart) by shuffles, then the warps through shared memory
#pragma unroll
  for (int o = TPR; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < KG; ++g) {
#pragma unroll
      for (int e = 0; e < VE; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
    }
  }
  __syncthreads();  // every thread is done reading probabilities: ss becomes red[warp][g][d]
  float* red = ss;
  if (lane < TPR) {
#pragma unroll
    for (int g = 0; g < KG; ++g) {  // constant indices keep acc in registers
      if (g < GB) {
#pragma unroll
        for (int e = 0; e < VE; ++e) red[(warp * KG + g) * D + vc0 + e] = acc[g][e];
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < GB * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[(w * KG + g) * D + d];
    ws_acc[(idx0 + static_cast<int64_t>(g) * splits) * D + d] = sum;
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
  grid_dependency_sync();
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
  const int GB = static_cast<int>(decode_heads_per_block(q_heads, c.kv_heads));
  int64_t chunk = (c.capacity + splits - 1) / splits;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  if (batch > 65535 || q_heads / GB > 65535 || splits > 0x7fffffff) {
    throw std::invalid_argument("attention_decode: batch or head count too large for the CUDA grid");
  }
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(q_heads / GB), static_cast<unsigned>(batch));
  static_assert(kMaxGroup == 8, "the head bounds are with_pow2_bucket's 1, 2, 4, 8");
  with_pow2_bucket(GB, [&](auto kg) {
    launch_kernel(decode_split_kernel<T, D, decltype(kg)::value>, grid, kThreads, 0, stream,
                  static_cast<const T*>(q.data), q.row_stride, q.head_stride, static_cast<const T*>(c.k),
                  static_cast<const T*>(c.v), c.batch, c.capacity, static_cast<int>(c.kv_heads),
                  static_cast<int>(q_heads), GB, slots, seq_lens, scale, ws, static_cast<int>(splits),
                  static_cast<int>(chunk));
  });
  check_launch("attention_decode (split)");
  launch_kernel(decode_combine_kernel<T, D>, dim3(static_cast<unsigned>(q_heads), static_cast<unsigned>(batch)), D, 0,
                stream, static_cast<T*>(out), ws, static_cast<int>(q_heads), static_cast<int>(splits));
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
