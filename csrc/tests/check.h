// Minimal assertion helpers for the C++ kernel tests (each test_*.cpp is one ctest executable).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace codellama::test {

inline int& failures() { static int n = 0; return n; }

// Records a failure when |got - want| > atol + rtol * |want|; prints the first few.
inline void expect_near(const char* what, double got, double want, double atol, double rtol) {
  if (std::fabs(got - want) <= atol + rtol * std::fabs(want) && !std::isnan(got)) return;
  if (failures()++ < 10) std::fprintf(stderr, "FAIL %s: got %.9g want %.9g\n", what, got, want);
}

inline std::vector<float> random_floats(size_t n, unsigned seed, float scale = 1.f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& e : v) e = dist(gen);
  return v;
}

inline int finish(const char* name) {
  if (failures()) std::fprintf(stderr, "%s: %d failures\n", name, failures());
  else std::printf("%s: ok\n", name);
  return failures() ? 1 : 0;
}

}  // namespace codellama::test
