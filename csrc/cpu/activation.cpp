// out = round(round(g / (1 + exp(-g))) * up) for g = x[:F], up = x[F:], one row range per thread; 8 lanes
// at a time with exp8 (vec.h), lanes outside its range (and the scalar tail) through std::exp.
#include "codellama/activation.h"

#include <algorithm>
#include <cmath>

#include "vec.h"

namespace codellama::cpu {
namespace {

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

#ifdef CODELLAMA_AVX2
inline vec8 silu8(vec8 g) {
  const __m256 absg = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
  const __m256 out_of_range = _mm256_cmp_ps(absg, _mm256_set1_ps(87.0f), _CMP_NLE_UQ);  // also NaN
  if (_mm256_movemask_ps(out_of_range)) {
    alignas(32) float t[8];
    _mm256_store_ps(t, g);
    for (float& v : t) v = silu(v);
    return _mm256_load_ps(t);
  }
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}
#endif

template <typename T>
void silu_row(T* out, const T* gate, const T* up, int64_t f) {
  int64_t i = 0;
#ifdef CODELLAMA_AVX2
  for (; i + 8 <= f; i += 8) {
    const vec8 s = round_through<T>(silu8(load8(gate + i)));
    store8(out + i, mul(s, load8(up + i)));
  }
#endif
  for (; i < f; ++i) out[i] = from_float<T>(round_to<T>(silu(to_float(gate[i]))) * to_float(up[i]));
}

}  // namespace

void silu_and_mul(DType dt, void* out, const void* x, int64_t x_stride, int64_t rows, int64_t f) {
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "silu_and_mul", {
    auto* o = static_cast<scalar_t*>(out);
    const auto* xi = static_cast<const scalar_t*>(x);
    if (rows == 1) {  // decode: split the one row when it is long enough to pay for a second thread
      // Pieces start on multiples of 8, so every element takes the vector or scalar path it takes unsplit (they
      // differ by an ulp): the result does not depend on the thread count.
      parallel_for((f + 7) / 8, 16384 / 8, [&](int64_t b0, int64_t b1) {
        const int64_t i0 = b0 * 8, i1 = std::min(f, b1 * 8);
        silu_row(o + i0, xi + i0, xi + f + i0, i1 - i0);
      });
    } else {
      parallel_for(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(f, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) silu_row(o + r * f, xi + r * x_stride, xi + r * x_stride + f, f);
      });
    }
  });
}

}  // namespace codellama::cpu
