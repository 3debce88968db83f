// Bindings of argmax and sample: validate, allocate the int64 output, launch on the current stream
// (no host synchronisation on CUDA).
#include "codellama/sampling.h"

#include <limits>

#include "checks.h"
#include "ops.h"

namespace codellama::bind {
namespace {

// logits [B, V] with a contiguous last dim; returns V.
int64_t check_logits(const char* op, const at::Tensor& logits) {
  float_dtype(op, "logits", logits);
  check_dim(op, "logits", logits, 2, "[batch, vocab]");
  CODELLAMA_CHECK(op, logits.size(1) > 0, "logits must have a non-empty vocabulary dimension, got shape ",
                  logits.sizes());
  CODELLAMA_CHECK(op, logits.size(1) <= std::numeric_limits<int32_t>::max(),
                  "logits.shape[1] (vocab) must fit in int32, got ", logits.size(1));
  CODELLAMA_CHECK(op, logits.size(1) == 1 || logits.stride(1) == 1,
                  "logits must have a contiguous last dimension (stride 1), got strides ", logits.strides());
  return logits.size(1);
}

void check_row_vector(const char* op, const char* arg, const at::Tensor& t, at::ScalarType dtype, int64_t b) {
  check_dtype(op, arg, t, dtype);
  check_dim(op, arg, t, 1, "[batch]");
  check_contiguous(op, arg, t);
  check_size(op, arg, t, 0, b, "the batch size of logits");
}

}  // namespace

// logits [B, V] -> [B] int64
at::Tensor argmax(const at::Tensor& logits) {
  const char* op = "argmax";
  check_devices(op, {{"logits", &logits}});
  const int64_t v = check_logits(op, logits);
  const int64_t b = logits.size(0);
  at::Tensor out = at::empty({b}, logits.options().dtype(at::kLong));
  if (b == 0) return out;
  const DType dt = float_dtype(op, "logits", logits);
  if (logits.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    cuda::argmax(dt, out.data_ptr<int64_t>(), logits.data_ptr(), logits.stride(0), b, v, current_stream(logits));
#endif
  } else {
    cpu::argmax(dt, out.data_ptr<int64_t>(), logits.data_ptr(), logits.stride(0), b, v);
  }
  return out;
}

// logits [B, V]; temperature, top_p, uniform [B] float32; top_k [B] int32 -> [B] int64
at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& uniform) {
  const char* op = "sample";
  check_devices(op, {{"logits", &logits}, {"temperature", &temperature}, {"top_k", &top_k}, {"top_p", &top_p},
                     {"uniform", &uniform}});
  const int64_t v = check_logits(op, logits);
  const int64_t b = logits.size(0);
  check_row_vector(op, "temperature", temperature, at::kFloat, b);
  check_row_vector(op, "top_k", top_k, at::kInt, b);
  check_row_vector(op, "top_p", top_p, at::kFloat, b);
  check_row_vector(op, "uniform", uniform, at::kFloat, b);
  at::Tensor out = at::empty({b}, logits.options().dtype(at::kLong));
  if (b == 0) return out;
  const DType dt = float_dtype(op, "logits", logits);
  if (logits.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    cuda::sample(dt, out.data_ptr<int64_t>(), logits.data_ptr(), logits.stride(0), b, v,
                 temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
                 uniform.data_ptr<float>(), current_stream(logits));
#endif
  } else {
    cpu::sample(dt, out.data_ptr<int64_t>(), logits.data_ptr(), logits.stride(0), b, v,
                temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
                uniform.data_ptr<float>());
  }
  return out;
}

}  // namespace codellama::bind
