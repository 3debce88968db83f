// CPU argmax / sample: first-maximum rule, greedy cases, and sampled frequencies of a small vocabulary.
#include <cmath>

#include "check.h"
#include "codellama/sampling.h"

using namespace codellama;

int main() {
  // argmax: ties -> first index; NaN largest
  std::vector<float> l = {1, 5, 5, 2, -INFINITY, 0, NAN, 3, NAN, 1};
  int64_t out[2];
  cpu::argmax(DType::kFloat32, out, l.data(), 5, 2, 5);
  test::expect_near("argmax ties", out[0], 1, 0, 0);
  test::expect_near("argmax nan", out[1], 1, 0, 0);

  // sample: temperature 0, top_k 1 and top_p 0 are greedy whatever the uniform
  const int64_t v = 1000;
  auto logits = test::random_floats(v, 9, 3.f);
  int64_t best = 0;
  for (int64_t i = 1; i < v; ++i) if (logits[i] > logits[best]) best = i;
  const float temps[3] = {0.f, 1.f, 1.f}, top_ps[3] = {1.f, 1.f, 0.f};
  const int32_t top_ks[3] = {0, 1, 0};
  for (float u : {0.f, 0.3f, 0.9999f}) {
    for (int c = 0; c < 3; ++c) {
      int64_t o;
      cpu::sample(DType::kFloat32, &o, logits.data(), v, 1, v, &temps[c], &top_ks[c], &top_ps[c], &u);
      test::expect_near("sample greedy", o, best, 0, 0);
    }
  }

  // frequencies: logits log(1..4) -> probabilities 0.1 .. 0.4; stratified uniforms hit them exactly
  const int n = 10000;
  std::vector<float> row = {0.f, std::log(2.f), std::log(3.f), std::log(4.f)};
  std::vector<float> rows(n * 4), t(n, 1.f), p(n, 1.f), u(n);
  std::vector<int32_t> k(n, 0);
  std::vector<int64_t> o(n);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < 4; ++j) rows[i * 4 + j] = row[j];
    u[i] = (i + 0.5f) / n;
  }
  cpu::sample(DType::kFloat32, o.data(), rows.data(), 4, n, 4, t.data(), k.data(), p.data(), u.data());
  int counts[4] = {0, 0, 0, 0};
  for (int64_t x : o) counts[x]++;
  for (int j = 0; j < 4; ++j) test::expect_near("sample frequency", counts[j], n * (j + 1) / 10.0, 2, 0);
  // top-p 0.5: sorted 0.4, 0.3 (mass before 0.4 <= 0.5), then 0.2 dropped (0.7 > 0.5): 4/7 and 3/7
  std::fill(p.begin(), p.end(), 0.5f);
  cpu::sample(DType::kFloat32, o.data(), rows.data(), 4, n, 4, t.data(), k.data(), p.data(), u.data());
  int c2[4] = {0, 0, 0, 0};
  for (int64_t x : o) c2[x]++;
  test::expect_near("top-p dropped", c2[0] + c2[1], 0, 0, 0);
  test::expect_near("top-p kept", c2[3], n * 4.0 / 7.0, 2, 0);
  return test::finish("test_sampling");
}
