// scaffolding: implemented by the linear work
#include "ops.h"
namespace codellama::bind {
at::Tensor linear(const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "not built yet"); }
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor&, int64_t) { TORCH_CHECK(false, "not built yet"); }
at::Tensor linear_int8(const at::Tensor&, const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "not built yet"); }
}
