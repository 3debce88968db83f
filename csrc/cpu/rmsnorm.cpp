// y = round(w * round(x * rsqrt(mean(x^2) + eps))), one row per task; fused variant adds the residual first.
#include "codellama/rmsnorm.h"

#include <cmath>

#include "vec.h"

namespace codellama::cpu {
namespace {

// Sum of squares of n floats read from x; 8 lanes x 2 accumulators, scalar tail.
template <typename T>
float sum_squares(const T* x, int64_t n) {
  vec8 a0 = zero8(), a1 = zero8();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vec8 v0 = load8(x + i), v1 = load8(x + i + 8);
    a0 = fmadd(v0, v0, a0);
    a1 = fmadd(v1, v1, a1);
  }
  for (; i + 8 <= n; i += 8) { vec8 v = load8(x + i); a0 = fmadd(v, v, a0); }
  float s = hsum(add(a0, a1));
  for (; i < n; ++i) { float v = to_float(x[i]); s += v * v; }
  return s;
}

template <typename T>
void normalize_row(T* out, const T* x, const T* w, int64_t dim, float eps) {
  const float inv = 1.0f / std::sqrt(sum_squares(x, dim) / static_cast<float>(dim) + eps);
  const vec8 vinv = set1(inv);
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    vec8 n = round_through<T>(mul(load8(x + i), vinv));
    store8(out + i, mul(n, load8(w + i)));
  }
  for (; i < dim; ++i) out[i] = from_float<T>(round_to<T>(to_float(x[i]) * inv) * to_float(w[i]));
}

template <typename T>
void add_rows(T* sum, const T* a, const T* b, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(sum + i, add(load8(a + i), load8(b + i)));
  for (; i < n; ++i) sum[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

}  // namespace

void rms_norm(DType dt, void* out, const void* x, int64_t x_stride, const void* weight, int64_t rows,
              int64_t dim, float eps) {
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "rms_norm", {
    auto* o = static_cast<scalar_t*>(out);
    const auto* xi = static_cast<const scalar_t*>(x);
    const auto* w = static_cast<const scalar_t*>(weight);
    parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) normalize_row(o + r * dim, xi + r * x_stride, w, dim, eps);
    });
  });
}

void fused_add_rms_norm(DType dt, void* out, void* residual_out, const void* x, const void* residual,
                        const void* weight, int64_t rows, int64_t dim, float eps) {
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "fused_add_rms_norm", {
    auto* o = static_cast<scalar_t*>(out);
    auto* ro = static_cast<scalar_t*>(residual_out);
    const auto* xi = static_cast<const scalar_t*>(x);
    const auto* ri = static_cast<const scalar_t*>(residual);
    const auto* w = static_cast<const scalar_t*>(weight);
    parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        add_rows(ro + r * dim, xi + r * dim, ri + r * dim, dim);
        normalize_row(o + r * dim, ro + r * dim, w, dim, eps);
      }
    });
  });
}

}  // namespace codellama::cpu
