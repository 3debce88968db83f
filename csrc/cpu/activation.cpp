// out = round(round(g / (1 + exp(-g))) * up) for g = x[:F], up = x[F:], one row range per thread; 16 lanes at a
// time with exp16 where AVX-512 is compiled in, then 8 with exp8 (vec.h, the same bits), lanes outside their range
// (and the scalar tail) through std::exp.
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

#if defined(CODELLAMA_AVX2) && defined(__AVX512F__) && defined(__F16C__)
// 16 lanes: the operations of silu8 per lane, with vec.h's 16-lane loads, rounding and stores, so the same bits
// (checked against 8-lane rows with out-of-range and NaN gates). bench_kernels, bf16 2048 x 11008: 14.4 -> 9.7 ms
// (torch's silu and mul 13.9-14.2 ms; benchmarks/RESULTS.md, session 18).
// silu of 16 gates; a vector holding an out-of-range lane goes through silu8 by halves (its scalar fallback is
// per 8 lanes, and the vector and scalar results differ by an ulp)
inline __m512 silu16(__m512 g) {
  const __m512 absg = _mm512_abs_ps(g);
  if (_mm512_cmp_ps_mask(absg, _mm512_set1_ps(87.0f), _CMP_NLE_UQ)) [[unlikely]] {
    const __m256 lo = silu8(_mm512_castps512_ps256(g));
    const __m256 hi = silu8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(g), 1)));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
  }
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#endif

template <typename T>
void silu_row(T* out, const T* gate, const T* up, int64_t f) {
  int64_t i = 0;
#if defined(CODELLAMA_AVX2) && defined(__AVX512F__) && defined(__F16C__)
  for (; i + 16 <= f; i += 16) {
    const __m512 s = round_through16<T>(silu16(load16(gate + i)));
    store16(out + i, _mm512_mul_ps(s, load16(up + i)));
  }
#endif
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
