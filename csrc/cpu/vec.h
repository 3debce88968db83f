// CPU building blocks shared by the kernels: 8-wide float vectors loaded from / stored to any element
// type, horizontal sums, a vector exp, and the thread-parallel loop. AVX2+FMA (+F16C) when the compiler
// targets them, a portable scalar fallback otherwise; both give the same results up to float summation order
// (and exp8_nonpositive's rounding: ~1 ulp).
#pragma once

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "codellama/common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CODELLAMA_AVX2 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace codellama::cpu {

// exp8_nonpositive's lower end: below it, expf is subnormal (or 0) and counts as 0.
constexpr float kExpFloor = -87.f;

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Runs fn(begin, end) over [0, n) split into contiguous chunks of at least `grain` items, one chunk
// per thread. Serial when the work is too small to pay for waking threads.
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, const F& fn) {
  if (n <= 0) return;
  const int64_t chunks = std::min<int64_t>(max_threads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
  if (chunks <= 1) { fn(int64_t{0}, n); return; }
#ifdef _OPENMP
#pragma omp parallel for num_threads(chunks) schedule(static, 1)
#endif
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
    if (begin < end) fn(begin, end);
  }
}

// A read prefetch into all cache levels (never faults, so it may point past the end of an array).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

#ifdef CODELLAMA_AVX2
using vec8 = __m256;

inline vec8 load8(const float* p) { return _mm256_loadu_ps(p); }
inline vec8 load8(const BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#if defined(__F16C__)
inline vec8 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store8(Half* p, vec8 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#else
inline vec8 load8(const Half* p) {
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = to_float(p[i]);
  return _mm256_load_ps(t);
}
inline void store8(Half* p, vec8 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int i = 0; i < 8; ++i) p[i] = to_half(t[i]);
}
#endif
inline void store8(float* p, vec8 v) { _mm256_storeu_ps(p, v); }
// float bits rounded to the nearest even bfloat16 (in the high 16 bits; the low ones are garbage), NaNs kept
// quiet NaNs (matches to_bf16). The NaN fix-up is a branch: NaNs are rare, and the blend cost a third of the
// rounding.
inline __m256i bf16_round_bits(vec8 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  if (_mm256_movemask_ps(nan)) [[unlikely]]
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), _mm256_castps_si256(nan));
  return r;
}
inline void store8(BFloat16* p, vec8 v) {
  const __m256i r = _mm256_srli_epi32(bf16_round_bits(v), 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline vec8 set1(float v) { return _mm256_set1_ps(v); }
inline vec8 zero8() { return _mm256_setzero_ps(); }
inline vec8 add(vec8 a, vec8 b) { return _mm256_add_ps(a, b); }
inline vec8 sub(vec8 a, vec8 b) { return _mm256_sub_ps(a, b); }
inline vec8 mul(vec8 a, vec8 b) { return _mm256_mul_ps(a, b); }
inline vec8 fmadd(vec8 a, vec8 b, vec8 c) { return _mm256_fmadd_ps(a, b, c); }
inline vec8 vmax(vec8 a, vec8 b) { return _mm256_max_ps(a, b); }  // b where either is NaN
inline float hsum(vec8 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// out[t] = hsum(a_t) * scale for the 4 vectors a0..a3.
inline void hsum4(vec8 a0, vec8 a1, vec8 a2, vec8 a3, float scale, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
  const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, _mm_mul_ps(sum, _mm_set1_ps(scale)));
}
// exp(x) for |x| <= 87 (the caller keeps to that range): Cody-Waite reduction and Cephes' degree-6 expf
// polynomial, ~1 ulp. One body for 8 lanes (exp8) and, where AVX-512 is compiled in, 16 (exp16): the same
// operations per lane, so the same bits. P is the intrinsics' prefix, ROUND their round-to-nearest.
#define CODELLAMA_DEFINE_EXP(NAME, V, P, ROUND, CAST_PS)                                                        \
  inline V NAME(V x) {                                                                                          \
    const V fx = ROUND(P##_mul_ps(x, P##_set1_ps(1.44269504088896341f)),                                        \
                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                                          \
    V r = P##_fnmadd_ps(fx, P##_set1_ps(0.693359375f), x);                                                      \
    r = P##_fnmadd_ps(fx, P##_set1_ps(-2.12194440e-4f), r);                                                     \
    V y = P##_set1_ps(1.9875691500E-4f);                                                                        \
    y = P##_fmadd_ps(y, r, P##_set1_ps(1.3981999507E-3f));                                                      \
    y = P##_fmadd_ps(y, r, P##_set1_ps(8.3334519073E-3f));                                                      \
    y = P##_fmadd_ps(y, r, P##_set1_ps(4.1665795894E-2f));                                                      \
    y = P##_fmadd_ps(y, r, P##_set1_ps(1.6666665459E-1f));                                                      \
    y = P##_fmadd_ps(y, r, P##_set1_ps(5.0000001201E-1f));                                                      \
    y = P##_fmadd_ps(y, P##_mul_ps(r, r), P##_add_ps(r, P##_set1_ps(1.0f)));                                    \
    const auto pow2 = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(fx), P##_set1_epi32(127)), 23);              \
    return P##_mul_ps(y, CAST_PS(pow2));                                                                        \
  }
CODELLAMA_DEFINE_EXP(exp8, vec8, _mm256, _mm256_round_ps, _mm256_castsi256_ps)
#ifdef __AVX512F__
CODELLAMA_DEFINE_EXP(exp16, __m512, _mm512, _mm512_roundscale_ps, _mm512_castsi512_ps)
#endif
#undef CODELLAMA_DEFINE_EXP
// exp(x) for softmax weights, x <= 0: 0 below kExpFloor (where expf is subnormal or 0, and exp8's range
// ends), NaN stays NaN (max_ps returns its second operand when one is NaN).
inline vec8 exp8_nonpositive(vec8 x) {
  const __m256 below = _mm256_cmp_ps(x, _mm256_set1_ps(kExpFloor), _CMP_LT_OQ);
  return _mm256_andnot_ps(below, exp8(_mm256_max_ps(_mm256_set1_ps(kExpFloor), x)));
}
#ifdef __AVX512F__
inline __m512 exp16_nonpositive(__m512 x) {
  const __mmask16 below = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~below), exp16(_mm512_max_ps(_mm512_set1_ps(kExpFloor), x)));
}
#endif
#else
struct vec8 { float v[8]; };
template <typename T> inline vec8 load8(const T* p) { vec8 r; for (int i = 0; i < 8; ++i) r.v[i] = to_float(p[i]); return r; }
template <typename T> inline void store8(T* p, vec8 a) { for (int i = 0; i < 8; ++i) p[i] = from_float<T>(a.v[i]); }
inline vec8 set1(float x) { vec8 r; for (float& e : r.v) e = x; return r; }
inline vec8 zero8() { return set1(0.f); }
inline vec8 add(vec8 a, vec8 b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
inline vec8 sub(vec8 a, vec8 b) { for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i]; return a; }
inline vec8 mul(vec8 a, vec8 b) { for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i]; return a; }
inline vec8 fmadd(vec8 a, vec8 b, vec8 c) { for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline vec8 vmax(vec8 a, vec8 b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
inline float hsum(vec8 a) { float s = 0; for (float e : a.v) s += e; return s; }
inline void hsum4(vec8 a0, vec8 a1, vec8 a2, vec8 a3, float scale, float* out) {
  out[0] = hsum(a0) * scale; out[1] = hsum(a1) * scale; out[2] = hsum(a2) * scale; out[3] = hsum(a3) * scale;
}
inline vec8 exp8_nonpositive(vec8 x) {
  for (float& e : x.v) e = e < kExpFloor ? 0.f : std::exp(e);
  return x;
}
#endif

// Rounds each lane through T (float: unchanged), as storing to a T tensor and reading back would.
template <typename T> inline vec8 round_through(vec8 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
#ifdef CODELLAMA_AVX2
  } else if constexpr (std::is_same_v<T, BFloat16>) {  // in registers: the rounding of store8(BFloat16*)
    return _mm256_castsi256_ps(
        _mm256_and_si256(bf16_round_bits(v), _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<T, Half>) {  // in registers: F16C round trip
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#endif
#endif
  } else {
    alignas(32) T tmp[8];
    store8(tmp, v);
    return load8(tmp);
  }
}

#if defined(CODELLAMA_AVX2) && defined(__AVX512F__) && defined(__F16C__)
// load8, bf16_round_bits, round_through and store8 on 16 lanes: the same operations per lane, so the same bits.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const BFloat16* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline __m512i bf16_round_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}
template <typename T> inline __m512 round_through16(__m512 v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_round_bits16(v), high));
  } else if constexpr (std::is_same_v<T, Half>) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    return v;
  }
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(BFloat16* p, __m512 v) {
  const __m256i bits = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round_bits16(v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
}
#endif

}  // namespace codellama::cpu
