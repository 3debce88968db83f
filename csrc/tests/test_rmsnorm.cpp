// CPU RMSNorm against a float64 evaluation of the same formula, fp32 and bf16, vector tails included.
#include "check.h"
#include "codellama/rmsnorm.h"

using namespace codellama;

template <typename T>
void check_rms_norm(int64_t rows, int64_t dim, DType dt) {
  auto xf = test::random_floats(rows * dim, 1, 2.f), wf = test::random_floats(dim, 2);
  std::vector<T> x(rows * dim), w(dim), out(rows * dim);
  for (size_t i = 0; i < x.size(); ++i) x[i] = from_float<T>(xf[i]);
  for (int64_t i = 0; i < dim; ++i) w[i] = from_float<T>(wf[i]);
  cpu::rms_norm(dt, out.data(), x.data(), dim, w.data(), rows, dim, 1e-5f);
  const double tol = dt == DType::kFloat32 ? 1e-5 : 2e-2;
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(to_float(x[r * dim + i])) * to_float(x[r * dim + i]);
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int64_t i = 0; i < dim; ++i) {
      test::expect_near("rms_norm", to_float(out[r * dim + i]), to_float(x[r * dim + i]) * inv * to_float(w[i]), tol, tol);
    }
  }
  // fused: x + x is exact (a doubling), so the residual is bitwise 2x and the output rms_norm(2x)
  std::vector<T> fused(rows * dim), sum(rows * dim);
  cpu::fused_add_rms_norm(dt, fused.data(), sum.data(), x.data(), x.data(), w.data(), rows, dim, 1e-5f);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += 4.0 * to_float(x[r * dim + i]) * to_float(x[r * dim + i]);
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int64_t i = 0; i < dim; ++i) {
      const int64_t j = r * dim + i;
      test::expect_near("fused residual", to_float(sum[j]), 2.0 * to_float(x[j]), 0, 0);
      test::expect_near("fused out", to_float(fused[j]), 2.0 * to_float(x[j]) * inv * to_float(w[i]), tol, tol);
    }
  }
}

int main() {
  for (int64_t dim : {1, 7, 8, 127, 4096, 5125}) {
    check_rms_norm<float>(3, dim, DType::kFloat32);
    check_rms_norm<BFloat16>(3, dim, DType::kBFloat16);
    check_rms_norm<Half>(3, dim, DType::kFloat16);
  }
  return test::finish("test_rmsnorm");
}
