// Binding of silu_and_mul: validate, allocate the output, launch on the current stream.
#include "codellama/activation.h"

#include "checks.h"
#include "ops.h"

namespace codellama::bind {

// x [..., 2F] -> [..., F]
at::Tensor silu_and_mul(const at::Tensor& x) {
  const char* op = "silu_and_mul";
  check_devices(op, {{"x", &x}});
  const DType dt = float_dtype(op, "x", x);
  CODELLAMA_CHECK(op, x.dim() >= 1, "x must have at least one dimension, got a scalar");
  const int64_t two_f = x.size(-1);
  CODELLAMA_CHECK(op, two_f > 0 && two_f % 2 == 0, "the last dimension of x must be even and positive "
                  "(gate and up halves), got shape ", x.sizes());
  const int64_t f = two_f / 2;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = f;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  at::Tensor x2 = x.reshape({-1, two_f});
  if (x2.stride(-1) != 1) x2 = x2.contiguous();
  const int64_t rows = x2.size(0);
  if (x.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::silu_and_mul(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), rows, f, current_stream(x));
#endif
  } else {
    cpu::silu_and_mul(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), rows, f);
  }
  return out;
}

}  // namespace codellama::bind
