// Rotary position embedding, in place on q and k.
//   inv_freq[i] = 1 / theta^(float(2i) / float(D))   (fp32, as Meta's precompute_freqs_cis; the power is
//   correctly rounded, torch's vectorised fp32 pow can differ by 1 ulp: 1 of 64 entries at D=128, theta=1e6)
//   angle = float(pos) * inv_freq[i] (fp32); c, s = cos, sin(angle) (fp32, accurate: angles reach 1e5 rad)
//   (x0', x1') = (x0 c - x1 s, x0 s + x1 c), computed in fp32 and rounded once to the activation type.
// interleaved=true: pairs (x[2i], x[2i+1]) (Meta checkpoints); false: (x[i], x[i + D/2]) (HF rotate_half).
// Precision order as Meta (SPEC.md §2): rotation in fp32, one rounding.
#pragma once

#include <cstdint>

#include "codellama/common.h"
#include "codellama/stream.h"

namespace codellama {

// Arguments shared by both devices. q [T, Hq, D] with element strides (q_stride_t, q_stride_h, 1); k [T, Hkv, D]
// likewise; positions [T] int32 (positions_int64 false) or int64, values >= 0. head_dim even.
struct RotaryArgs {
  void* q;
  int64_t q_stride_t, q_stride_h;
  void* k;
  int64_t k_stride_t, k_stride_h;
  const void* positions;
  bool positions_int64;
  int64_t tokens, q_heads, kv_heads, head_dim;
  float theta;
  bool interleaved;
};

namespace cpu {
void rotary_embedding(DType dt, const RotaryArgs& a);
}  // namespace cpu

namespace cuda {
void rotary_embedding(DType dt, const RotaryArgs& a, cudaStream_t stream);
}  // namespace cuda
}  // namespace codellama
