// CPU RoPE against a float64 rotation of the same fp32 angles, both layouts, fp32/bf16/half, strided heads.
#include <cmath>

#include "check.h"
#include "codellama/rotary.h"

using namespace codellama;

template <typename T>
void check_rotary(int64_t d, bool interleaved, DType dt, float theta) {
  const int64_t tokens = 5, hq = 3, hkv = 2, stride_h = d + 2;  // padded heads: strided views
  auto qf = test::random_floats(tokens * hq * stride_h, 3), kf = test::random_floats(tokens * hkv * stride_h, 4);
  std::vector<T> q(qf.size()), k(kf.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = from_float<T>(qf[i]);
  for (size_t i = 0; i < k.size(); ++i) k[i] = from_float<T>(kf[i]);
  const std::vector<T> q0 = q, k0 = k;
  const std::vector<int64_t> pos = {0, 1, 17, 4095, 16383};
  RotaryArgs a{q.data(), hq * stride_h, stride_h, k.data(), hkv * stride_h, stride_h, pos.data(), true,
               tokens, hq, hkv, d, theta, interleaved};
  cpu::rotary_embedding(dt, a);
  const double tol = dt == DType::kFloat32 ? 2e-6 : (dt == DType::kBFloat16 ? 1e-2 : 2e-3);
  for (int which = 0; which < 2; ++which) {
    const auto& in = which ? k0 : q0;
    const auto& out = which ? k : q;
    const int64_t heads = which ? hkv : hq;
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = (t * heads + h) * stride_h;
        for (int64_t i = 0; i < d / 2; ++i) {
          const float inv = 1.0f / static_cast<float>(std::pow(double(theta), double(float(2 * i) / float(d))));
          const double ang = double(float(pos[t]) * inv);
          const int64_t j0 = interleaved ? 2 * i : i, j1 = interleaved ? 2 * i + 1 : i + d / 2;
          const double x0 = to_float(in[base + j0]), x1 = to_float(in[base + j1]);
          test::expect_near("rope x0", to_float(out[base + j0]), x0 * std::cos(ang) - x1 * std::sin(ang), tol, tol);
          test::expect_near("rope x1", to_float(out[base + j1]), x0 * std::sin(ang) + x1 * std::cos(ang), tol, tol);
        }
        for (int64_t j = d; j < stride_h; ++j) {  // padding between heads untouched
          test::expect_near("rope pad", to_float(out[base + j]), to_float(in[base + j]), 0, 0);
        }
      }
    }
  }
}

int main() {
  for (int64_t d : {2, 8, 64, 128}) {
    for (bool inter : {true, false}) {
      check_rotary<float>(d, inter, DType::kFloat32, 1e6f);
      check_rotary<BFloat16>(d, inter, DType::kBFloat16, 1e4f);
      check_rotary<Half>(d, inter, DType::kFloat16, 1e6f);
    }
  }
  return test::finish("test_rotary");
}
