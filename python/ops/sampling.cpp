// scaffolding: implemented by the sampling work
#include "ops.h"
namespace codellama::bind {
at::Tensor argmax(const at::Tensor&) { TORCH_CHECK(false, "not built yet"); }
at::Tensor sample(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "not built yet"); }
}
