// CPU silu_and_mul against double silu with the same two roundings, vector tails and extreme gates.
#include <cmath>

#include "check.h"
#include "codellama/activation.h"

using namespace codellama;

template <typename T>
void check_silu(int64_t rows, int64_t f, DType dt) {
  auto xf = test::random_floats(rows * 2 * f, 5, 5.f);
  if (f > 3) { xf[0] = 90.f; xf[1] = -90.f; xf[2] = 87.5f; xf[3] = -87.5f; }
  std::vector<T> x(xf.size()), out(rows * f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = from_float<T>(xf[i]);
  cpu::silu_and_mul(dt, out.data(), x.data(), 2 * f, rows, f);
  // one ulp of the activation type around the doubly rounded value
  const double rel = dt == DType::kFloat32 ? 1e-6 : (dt == DType::kBFloat16 ? 8e-3 : 1e-3);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < f; ++i) {
      const double g = to_float(x[r * 2 * f + i]), u = to_float(x[r * 2 * f + f + i]);
      const double s = round_to<T>(static_cast<float>(g / (1.0 + std::exp(-g))));
      test::expect_near("silu_and_mul", to_float(out[r * f + i]), s * u, 6e-8, rel);  // 6e-8: a half subnormal step
    }
  }
}

int main() {
  for (int64_t f : {1, 7, 8, 13, 100, 11008}) {
    check_silu<float>(3, f, DType::kFloat32);
    check_silu<BFloat16>(3, f, DType::kBFloat16);
    check_silu<Half>(3, f, DType::kFloat16);
  }
  check_silu<BFloat16>(1, 20000, DType::kBFloat16);  // one row split over threads
  return test::finish("test_activation");
}
