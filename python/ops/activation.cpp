// scaffolding: implemented by the activation work
#include "ops.h"
namespace codellama::bind {
at::Tensor silu_and_mul(const at::Tensor&) { TORCH_CHECK(false, "not built yet"); }
}
