// RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder.
//   rms_norm:           out = round(w * round(x / sqrt(mean(x^2) + eps)))
//   fused_add_rms_norm: residual_out = round(x + residual); out = rms_norm(residual_out)
// Precision order as Meta and HF (SPEC.md §1.4, §5): x upcast to fp32, mean of squares in fp32, multiplied
// by the reciprocal square root, rounded to the activation type, then multiplied by the weight (same type)
// and rounded again. `round` is rounding to the activation dtype (identity for fp32).
#pragma once

#include <cstdint>

#include "codellama/common.h"
#include "codellama/stream.h"

namespace codellama {
namespace cpu {
// out [rows, dim] contiguous; x [rows, dim] with row stride x_stride; weight [dim].
void rms_norm(DType dt, void* out, const void* x, int64_t x_stride, const void* weight, int64_t rows,
              int64_t dim, float eps);
// out, residual_out [rows, dim] contiguous; x, residual [rows, dim] contiguous; weight [dim].
// residual_out may alias residual (in-place update of the residual stream).
void fused_add_rms_norm(DType dt, void* out, void* residual_out, const void* x, const void* residual,
                        const void* weight, int64_t rows, int64_t dim, float eps);
}  // namespace cpu

namespace cuda {
void rms_norm(DType dt, void* out, const void* x, int64_t x_stride, const void* weight, int64_t rows,
              int64_t dim, float eps, cudaStream_t stream);
void fused_add_rms_norm(DType dt, void* out, void* residual_out, const void* x, const void* residual,
                        const void* weight, int64_t rows, int64_t dim, float eps, cudaStream_t stream);
}  // namespace cuda
}  // namespace codellama
