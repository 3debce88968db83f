// Greedy and stochastic token selection over logits rows.
//
// argmax: index of the first maximum of each row (torch.argmax semantics). NaN counts as larger than every
// number, so a row holding NaN gives its first NaN (as torch.argmax does).
//
// sample, per row b (all arithmetic exactly as codellama_ext.reference.sample):
//   temperature[b] <= 0 (or NaN): argmax.
//   x_i = float(logits_i) / temperature[b] (fp32); m = max x; e_i = expf(x_i - m) (fp32): softmax numerators.
//   Sorted order: x descending, equal x (-0 == +0) by ascending index (= probabilities descending, stable).
//   top-k: k' = top_k[b] if 1 <= top_k[b] < V else V; keep the first k' entries of the sorted order.
//   top-p (Meta's rule, SPEC.md §3.3, on the probabilities renormalised over the top-k set): with Z = sum of the
//     kept e (double), drop every entry whose mass before it in sorted order exceeds top_p:
//     cum_before_i > top_p * Z (cumulative sums in double); the first entry is always kept (top_p <= 0: greedy).
//     top_p >= 1 or NaN: no filtering.
//   Inverse CDF: Z' = mass of the kept entries (double); the result is the first kept entry in sorted order
//     whose cumulative mass exceeds uniform[b] * Z' (the last kept entry when none does).
// This equals Meta's softmax / sort / cumsum / renormalise / multinomial up to fp32 rounding of the
// normalised probabilities (whose division by the sum we never perform). Logits must be finite (NaN or
// +inf rows give some index in [0, V), unspecified).
#pragma once

#include <cstdint>

#include "codellama/common.h"
#include "codellama/stream.h"

namespace codellama {
namespace cpu {
// out [rows] int64; logits [rows, vocab] with row stride (elements), rows contiguous.
void argmax(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab);
// temperature, top_p, uniform [rows] float32; top_k [rows] int32.
void sample(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab,
            const float* temperature, const int32_t* top_k, const float* top_p, const float* uniform);
}  // namespace cpu

namespace cuda {
void argmax(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab,
            cudaStream_t stream);
void sample(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab,
            const float* temperature, const int32_t* top_k, const float* top_p, const float* uniform,
            cudaStream_t stream);
}  // namespace cuda
}  // namespace codellama
