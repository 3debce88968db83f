// KV-cache append and causal grouped-query attention over the cache (prefill and decode).
//   kv_cache_append:   k_cache[slots[t], positions[t]] = k[t]; v_cache likewise
//   attention:         out[q] = round( sum_j round(p_j) v_j / sum_j p_j ),  p_j = exp(s_j - m),
//                      s_j = (q . k_j) * scale in fp32, m = running max (online softmax, flash style)
// Precision order as Meta / HF eager (SPEC.md §1, §5; reference.attention_prefill): scores and softmax in fp32,
// probabilities rounded to the activation dtype before P.v, P.v accumulated in fp32, output rounded once.
// The kernels round the unnormalised exp(s - m) (flash-attention's order) and divide by the fp32 sum at the end;
// the reference rounds the normalised P: same error size, not bitwise equal.
// GQA: query head h reads kv head h / (Hq / Hkv). Cache layout [Bc, S, Hkv, D] contiguous ("slot", position,
// kv head, head dim); index tensors are int32.
#pragma once

#include <algorithm>
#include <cstdint>

#include "codellama/common.h"
#include "codellama/stream.h"

namespace codellama {

// The cache pair of one layer: k, v [batch, capacity, kv_heads, head_dim] contiguous.
struct KVCache {
  void* k;
  void* v;
  int64_t batch;     // Bc: number of slots
  int64_t capacity;  // S: positions per slot
  int64_t kv_heads;  // Hkv
  int64_t head_dim;  // D
};

// A [rows, heads, head_dim] activation whose last dim is contiguous (rows / heads may be strided).
struct HeadsView {
  const void* data;
  int64_t row_stride;   // elements between consecutive rows (tokens / sequences)
  int64_t head_stride;  // elements between consecutive heads
};

namespace cpu {
// k, v [T, Hkv, D] (views); slots, positions [T]. Rows with an out-of-range slot / position are skipped (the
// binding validates the values first); the attention kernels likewise clamp key ranges to the cache.
void kv_cache_append(DType dt, const KVCache& cache, HeadsView k, HeadsView v, const int32_t* slots,
                     const int32_t* positions, int64_t tokens);
// out [T, Hq, D] contiguous; q [T, Hq, D] view; cu_seqlens [B+1], start_pos [B], slots [B]. bf16 with head_dim 64
// or 128 runs on AMX tiles where the build and CPU have them (csrc/cpu/attention_amx.cpp), the rest on AVX2 / scalar.
void attention_prefill(DType dt, void* out, HeadsView q, int64_t tokens, int64_t q_heads, const KVCache& cache,
                       const int32_t* cu_seqlens, const int32_t* start_pos, const int32_t* slots, int64_t batch,
                       float scale);
// out [B, Hq, D] contiguous; q [B, Hq, D] view; slots, seq_lens [B] (keys 0 .. seq_lens[b]-1).
void attention_decode(DType dt, void* out, HeadsView q, int64_t batch, int64_t q_heads, const KVCache& cache,
                      const int32_t* slots, const int32_t* seq_lens, float scale);
}  // namespace cpu

namespace cuda {
// Head dims with a CUDA attention kernel.
inline bool attention_head_dim_supported(int64_t d) { return d == 64 || d == 128; }

// Query heads one decode block serves: the largest divisor of the group size Hq / Hkv up to 8.
inline int64_t decode_heads_per_block(int64_t q_heads, int64_t kv_heads) {
  const int64_t g = q_heads / std::max<int64_t>(kv_heads, 1);
  for (int64_t b = 8; b > 1; --b) {
    if (g % b == 0) return b;
  }
  return 1;
}
// A decode block keeps the scores of its whole split in shared memory: keys per split x heads per block
// floats at most.
constexpr int64_t kDecodeMaxScores = 4096;
// Split-K decode ("flash-decoding"): number of splits of the cache capacity. A pure function of the shapes
// (never of device values), so a launch is CUDA-graph capturable: aims at ~1024 blocks of (split, kv-head group,
// sequence) with at least 128 cache positions per split, and enough splits for a split's scores to fit
// kDecodeMaxScores.
inline int64_t decode_num_splits(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t capacity) {
  const int64_t hpb = decode_heads_per_block(q_heads, kv_heads);
  const int64_t groups = std::max<int64_t>(1, q_heads / hpb);
  const int64_t want = (1024 + batch * groups - 1) / std::max<int64_t>(batch * groups, 1);
  const int64_t most = (capacity + 127) / 128;
  const int64_t keys_cap = kDecodeMaxScores / hpb / 64 * 64;  // whole 64-key tiles (the kernel's chunk unit)
  const int64_t least = (capacity + keys_cap - 1) / keys_cap;
  return std::max<int64_t>({int64_t{1}, std::min(want, most), least});
}
// Floats of the fp32 workspace: per (sequence, q head, split) a running max, a sum and D accumulators.
inline int64_t decode_workspace_floats(int64_t batch, int64_t q_heads, int64_t head_dim, int64_t splits) {
  return batch * q_heads * splits * (head_dim + 2);
}

// Kernels skip out-of-range slots / positions (nothing is written); the binding validates on the host.
void kv_cache_append(DType dt, const KVCache& cache, HeadsView k, HeadsView v, const int32_t* slots,
                     const int32_t* positions, int64_t tokens, cudaStream_t stream);
// max_query_len: longest sequence in the batch (sizes the grid; from the host, no device sync).
void attention_prefill(DType dt, void* out, HeadsView q, int64_t tokens, int64_t q_heads, const KVCache& cache,
                       const int32_t* cu_seqlens, const int32_t* start_pos, const int32_t* slots, int64_t batch,
                       int64_t max_query_len, float scale, cudaStream_t stream);
// workspace: decode_workspace_floats(batch, q_heads, D, splits) floats, splits = decode_num_splits(...).
void attention_decode(DType dt, void* out, HeadsView q, int64_t batch, int64_t q_heads, const KVCache& cache,
                      const int32_t* slots, const int32_t* seq_lens, float scale, float* workspace,
                      int64_t splits, cudaStream_t stream);
}  // namespace cuda
}  // namespace codellama
