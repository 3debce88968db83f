// out = round(round(g / (1 + exp(-g))) * up) for g = x[:F], up = x[F:], one row range per thread; 8 lanes
// at a time with an AVX2 expf (Cody-Waite reduction + degree-6 polynomial, ~1 ulp on |x| < 87), lanes
// outside that range (and the scalar tail) through std::exp.
#include "codellama/activation.h"

#include <cmath>

#include "vec.h"

namespace codellama::cpu {
namespace {

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

#ifdef CODELLAMA_AVX2
// exp(x) for |x| <= 87 (the caller checks the range), Cephes expf coefficients.
inline __m256 exp8(__m256 x) {
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_cvtps_epi32(fx);
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

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
      parallel_for(f, 16384, [&](int64_t i0, int64_t i1) {
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
