// Binding of rms_norm / fused_add_rms_norm: validate, allocate outputs, launch on the current stream.
#include "codellama/rmsnorm.h"

#include "checks.h"
#include "ops.h"

namespace codellama::bind {
namespace {

int64_t check_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_devices(op, {{"x", &x}, {"weight", &weight}});
  float_dtype(op, "x", x);
  check_same_dtype(op, {"x", &x}, {{"weight", &weight}});
  CODELLAMA_CHECK(op, x.dim() >= 1, "x must have at least one dimension, got a scalar");
  CODELLAMA_CHECK(op, x.size(-1) > 0, "x must have a non-empty last dimension, got shape ", x.sizes());
  check_dim(op, "weight", weight, 1, "[dim]");
  check_contiguous(op, "weight", weight);
  check_size(op, "weight", weight, 0, x.size(-1), "the last dimension of x");
  CODELLAMA_CHECK(op, eps > 0, "eps must be positive, got ", eps);
  return x.size(-1);
}

}  // namespace

// x [..., dim], weight [dim] -> [..., dim]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  const int64_t dim = check_norm_args(op, x, weight, eps);
  // Rows may be strided (e.g. a view of a larger buffer); each row must be contiguous.
  at::Tensor x2 = x.reshape({-1, dim});
  if (x2.stride(-1) != 1) x2 = x2.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const DType dt = float_dtype(op, "x", x);
  const int64_t rows = x2.size(0);
  if (x.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::rms_norm(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), weight.data_ptr(), rows, dim,
                   static_cast<float>(eps), current_stream(x));
#endif
  } else {
    cpu::rms_norm(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), weight.data_ptr(), rows, dim,
                  static_cast<float>(eps));
  }
  return out;
}

// x, residual [..., dim], weight [dim] -> (out, new_residual), both [..., dim]
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  const char* op = "fused_add_rms_norm";
  const int64_t dim = check_norm_args(op, x, weight, eps);
  check_devices(op, {{"x", &x}, {"residual", &residual}});
  check_same_dtype(op, {"x", &x}, {{"residual", &residual}});
  CODELLAMA_CHECK(op, residual.sizes() == x.sizes(), "residual must have the shape of x (", x.sizes(), "), got ",
                  residual.sizes());
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor new_residual = at::empty(x.sizes(), x.options());
  const DType dt = float_dtype(op, "x", x);
  const int64_t rows = dim == 0 ? 0 : x.numel() / dim;
  if (x.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::fused_add_rms_norm(dt, out.data_ptr(), new_residual.data_ptr(), xc.data_ptr(), rc.data_ptr(),
                             weight.data_ptr(), rows, dim, static_cast<float>(eps), current_stream(x));
#endif
  } else {
    cpu::fused_add_rms_norm(dt, out.data_ptr(), new_residual.data_ptr(), xc.data_ptr(), rc.data_ptr(),
                            weight.data_ptr(), rows, dim, static_cast<float>(eps));
  }
  return {out, new_residual};
}

}  // namespace codellama::bind
