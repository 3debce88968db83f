// Input validation shared by every op: each failure is a ValueError whose message names the op, the
// argument and the rule. Also the mapping from torch dtypes to the kernel library's DType and the
// current CUDA stream.
#pragma once

#include <torch/all.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "codellama/common.h"
#include "codellama/stream.h"

#ifdef CODELLAMA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace codellama::bind {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

#define CODELLAMA_CHECK(OP, COND, ...) TORCH_CHECK_VALUE(COND, "codellama.", OP, ": ", __VA_ARGS__)

// Activation dtype of `t` (float32, float16 or bfloat16), else a ValueError naming `arg`.
inline DType float_dtype(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  CODELLAMA_CHECK(op, false, arg, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  return DType::kFloat32;  // unreachable
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType expected) {
  CODELLAMA_CHECK(op, t.scalar_type() == expected, arg, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const NamedTensor& ref, std::initializer_list<NamedTensor> others) {
  for (const auto& [name, t] : others) {
    CODELLAMA_CHECK(op, t->scalar_type() == ref.second->scalar_type(), name, " must have the dtype of ", ref.first,
                    " (", ref.second->scalar_type(), "), got ", t->scalar_type());
  }
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t ndim, const char* layout) {
  CODELLAMA_CHECK(op, t.dim() == ndim, arg, " must be ", ndim, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t d, int64_t expected,
                       const char* meaning) {
  CODELLAMA_CHECK(op, t.size(d) == expected, arg, ".shape[", d, "] must equal ", meaning, " (", expected, "), got ",
                  t.size(d), " (shape ", t.sizes(), ")");
}

inline void check_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  CODELLAMA_CHECK(op, t.is_contiguous(), arg, " must be contiguous (call .contiguous()), got strides ", t.strides());
}

inline void check_last_dim_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  CODELLAMA_CHECK(op, t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, arg,
                  " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

// All tensors on one device, and that device CPU or CUDA (CUDA only in CUDA builds).
inline void check_devices(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  const at::Device dev = first.second->device();
#ifdef CODELLAMA_WITH_CUDA
  CODELLAMA_CHECK(op, dev.is_cpu() || dev.is_cuda(), first.first, " must be on a CPU or CUDA device, got ", dev);
#else
  CODELLAMA_CHECK(op, dev.is_cpu(), first.first, " must be on the CPU (this build has no CUDA kernels), got ", dev);
#endif
  for (const auto& [name, t] : tensors) {
    CODELLAMA_CHECK(op, t->device() == dev, name, " must be on the device of ", first.first, " (", dev, "), got ",
                    t->device());
  }
}

// Index tensors (positions, slots, lengths): int32, 1-D, contiguous, `n` entries.
inline void check_index_vector(const char* op, const char* arg, const at::Tensor& t, int64_t n, const char* meaning) {
  check_dtype(op, arg, t, at::kInt);
  check_dim(op, arg, t, 1, meaning);
  check_contiguous(op, arg, t);
  check_size(op, arg, t, 0, n, meaning);
}

#ifdef CODELLAMA_WITH_CUDA
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

}  // namespace codellama::bind
