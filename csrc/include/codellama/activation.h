// SwiGLU gate of the Llama MLP.
//   out = round(round(silu(gate)) * up),  silu(g) = g / (1 + exp(-g)) in fp32,
//   gate = x[..., :F], up = x[..., F:].
// The double rounding is what torch eager `F.silu(gate) * up` does in bf16/fp16 (Meta's and HF's MLP);
// `round` is rounding to the activation dtype (identity for fp32). exp is accurate to ~1 ulp (no fast exp).
#pragma once

#include <cstdint>

#include "codellama/common.h"
#include "codellama/stream.h"

namespace codellama {
namespace cpu {
// out [rows, F] contiguous; x [rows, 2F] with row stride x_stride (elements), each row contiguous.
void silu_and_mul(DType dt, void* out, const void* x, int64_t x_stride, int64_t rows, int64_t f);
}  // namespace cpu

namespace cuda {
void silu_and_mul(DType dt, void* out, const void* x, int64_t x_stride, int64_t rows, int64_t f,
                  cudaStream_t stream);
}  // namespace cuda
}  // namespace codellama
