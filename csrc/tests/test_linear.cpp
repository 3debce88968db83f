// CPU linear GEMV, int8 quantisation and int8 GEMV against naive double computations: every dtype, row counts
// 1..9 (the chunk of 8 and its tail), odd K and N (vector and row-block tails), strided activation rows, groups.
#include <algorithm>
#include <cmath>

#include "check.h"
#include "codellama/linear.h"

using namespace codellama;

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<Half>() { return DType::kFloat16; }
template <> DType dtype_of<BFloat16>() { return DType::kBFloat16; }

// Tolerance of one final rounding to T plus fp32 summation noise, relative to sum |x w|.
template <typename T> double out_tol() { return dtype_of<T>() == DType::kFloat32 ? 1e-5 : dtype_of<T>() == DType::kFloat16 ? 1e-3 : 8e-3; }

template <typename T>
void check_linear(int64_t M, int64_t N, int64_t K) {
  const int64_t stride = K + 3;  // strided activation rows
  auto xf = test::random_floats(M * stride, 11, 1.f), wf = test::random_floats(N * K, 12, 0.5f);
  std::vector<T> x(M * stride), w(N * K), y(M * N, from_float<T>(NAN));
  for (size_t i = 0; i < x.size(); ++i) x[i] = from_float<T>(xf[i]);
  for (size_t i = 0; i < w.size(); ++i) w[i] = from_float<T>(wf[i]);
  cpu::linear_gemv(dtype_of<T>(), y.data(), x.data(), stride, w.data(), M, N, K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(to_float(x[m * stride + k])) * to_float(w[n * K + k]);
        want += p;
        mag += std::fabs(p);
      }
      test::expect_near("linear", to_float(y[m * N + n]), want, out_tol<T>() * mag + 1e-30, out_tol<T>());
    }
  }
}

template <typename T>
void check_int8(int64_t M, int64_t N, int64_t K, int64_t group_size) {
  const int64_t G = group_size == 0 ? 1 : K / group_size, gs = K / G;
  auto xf = test::random_floats(M * K, 21, 1.f), wf = test::random_floats(N * K, 22, 0.5f);
  std::vector<T> x(M * K), w(N * K), y(M * N, from_float<T>(NAN)), wd(N * K);
  for (size_t i = 0; i < x.size(); ++i) x[i] = from_float<T>(xf[i]);
  for (size_t i = 0; i < w.size(); ++i) w[i] = from_float<T>(wf[i]);
  for (int64_t k = 0; k < gs; ++k) w[k] = from_float<T>(0.f);  // an all-zero group: scale 1, q 0
  std::vector<int8_t> q(N * K);
  std::vector<float> s(N * G);
  cpu::quantize_int8(dtype_of<T>(), q.data(), s.data(), w.data(), N, K, group_size);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      float amax = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) amax = std::max(amax, std::fabs(to_float(w[n * K + k])));
      const float want_s = amax > 0 ? amax / 127.f : 1.f;
      test::expect_near("scale", s[n * G + g], want_s, 0, 0);
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        const float v = std::nearbyint(to_float(w[n * K + k]) / want_s);
        test::expect_near("q", q[n * K + k], std::min(127.f, std::max(-127.f, v)), 0, 0);
        test::expect_near("|w - q s|", to_float(w[n * K + k]), double(q[n * K + k]) * want_s, 0.5001 * want_s, 0);
      }
    }
  }
  cpu::dequantize_int8(dtype_of<T>(), wd.data(), q.data(), s.data(), N, K, G);
  for (int64_t i = 0; i < N * K; ++i) {
    const double want = round_to<T>(float(q[i]) * s[(i / K) * G + (i % K) / gs]);
    test::expect_near("dequantize", to_float(wd[i]), want, 0, 0);
  }
  cpu::linear_int8(dtype_of<T>(), y.data(), x.data(), K, q.data(), s.data(), M, N, K, G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(to_float(x[m * K + k])) * q[n * K + k] * s[n * G + k / gs];
        want += p;
        mag += std::fabs(p);
      }
      test::expect_near("linear_int8", to_float(y[m * N + n]), want, out_tol<T>() * mag + 1e-30, out_tol<T>());
    }
  }
}

template <typename T>
void check_all() {
  for (int64_t M : {1, 2, 3, 5, 8, 9}) {
    for (auto [N, K] : {std::pair<int64_t, int64_t>{1, 1}, {11, 64}, {13, 7}, {127, 129}, {33, 1000}}) {
      check_linear<T>(M, N, K);
      check_int8<T>(M, N, K, 0);
    }
    check_int8<T>(M, 37, 256, 128);
    check_int8<T>(M, 9, 60, 12);  // group not a multiple of 8: scalar path
    check_int8<T>(M, 9, 60, 3);
  }
}

int main() {
  check_all<float>();
  check_all<BFloat16>();
  check_all<Half>();
  return test::finish("test_linear");
}
