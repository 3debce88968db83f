// In-place RoPE: (x0, x1) <- (x0 c - x1 s, x0 s + x1 c) in fp32 with c, s = cos, sin(pos * theta^(-2i/D)).
// Both layouts evaluate x0' = fma(x0, c, -(x1 s)), x1' = fma(x1, c, x0 s), so they agree bitwise.
// One task per token: its cos/sin table (D/2 accurate sincosf) is computed once and applied to every q and
// k head of the token; heads are rotated 8 lanes at a time (AVX2), scalar tails.
#include "codellama/rotary.h"

#include <cmath>
#include <stdexcept>
#include <vector>

#include "vec.h"

namespace codellama::cpu {
namespace {

// x [D] at p, rotated with c, s [D/2]; cd, sd [D] the tables in the interleaved lane order
// (cd = c0 c0 c1 c1 ..., sd = -s0 s0 -s1 s1 ...).
template <typename T>
void rotate_interleaved(T* p, int64_t d, const float* c, const float* s, const float* cd, const float* sd) {
  int64_t j = 0;
#ifdef CODELLAMA_AVX2
  for (; j + 8 <= d; j += 8) {
    const vec8 x = load8(p + j);
    const vec8 swapped = _mm256_permute_ps(x, 0xB1);  // x1 x0 x3 x2 ...
    store8(p + j, fmadd(x, _mm256_loadu_ps(cd + j), mul(swapped, _mm256_loadu_ps(sd + j))));
  }
#endif
  for (; j < d; j += 2) {
    const float x0 = to_float(p[j]), x1 = to_float(p[j + 1]);
    const float cc = c[j / 2], ss = s[j / 2];
    p[j] = from_float<T>(std::fma(x0, cc, -(x1 * ss)));
    p[j + 1] = from_float<T>(std::fma(x1, cc, x0 * ss));
  }
}

template <typename T>
void rotate_half(T* p, int64_t d, const float* c, const float* s) {
  const int64_t h = d / 2;
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const vec8 x0 = load8(p + i), x1 = load8(p + h + i);
    const vec8 cc = load8(c + i), ss = load8(s + i);
    store8(p + i, fmadd(x0, cc, mul(x1, mul(ss, set1(-1.f)))));
    store8(p + h + i, fmadd(x1, cc, mul(x0, ss)));
  }
  for (; i < h; ++i) {
    const float x0 = to_float(p[i]), x1 = to_float(p[h + i]);
    p[i] = from_float<T>(std::fma(x0, c[i], -(x1 * s[i])));
    p[h + i] = from_float<T>(std::fma(x1, c[i], x0 * s[i]));
  }
}

template <typename T>
void rotary_impl(const RotaryArgs& a) {
  const int64_t d = a.head_dim, half = d / 2;
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(d);
    const float denom = static_cast<float>(std::pow(static_cast<double>(a.theta), static_cast<double>(exponent)));
    inv_freq[i] = 1.0f / denom;
  }
  T* q = static_cast<T*>(a.q);
  T* k = static_cast<T*>(a.k);
  const int64_t work_per_token = (a.q_heads + a.kv_heads) * d;
  parallel_for(a.tokens, std::max<int64_t>(1, 8192 / std::max<int64_t>(work_per_token, 1)),
               [&](int64_t t0, int64_t t1) {
    std::vector<float> tab(3 * d);
    float* c = tab.data();
    float* s = c + half;
    float* cd = c + d;
    float* sd = cd + d;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pos = a.positions_int64 ? static_cast<const int64_t*>(a.positions)[t]
                                            : static_cast<const int32_t*>(a.positions)[t];
      const float fpos = static_cast<float>(pos);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = fpos * inv_freq[i];
        c[i] = std::cos(angle);
        s[i] = std::sin(angle);
      }
      if (a.interleaved) {
        for (int64_t i = 0; i < half; ++i) {
          cd[2 * i] = cd[2 * i + 1] = c[i];
          sd[2 * i] = -s[i];
          sd[2 * i + 1] = s[i];
        }
        for (int64_t h = 0; h < a.q_heads; ++h) rotate_interleaved(q + t * a.q_stride_t + h * a.q_stride_h, d, c, s, cd, sd);
        for (int64_t h = 0; h < a.kv_heads; ++h) rotate_interleaved(k + t * a.k_stride_t + h * a.k_stride_h, d, c, s, cd, sd);
      } else {
        for (int64_t h = 0; h < a.q_heads; ++h) rotate_half(q + t * a.q_stride_t + h * a.q_stride_h, d, c, s);
        for (int64_t h = 0; h < a.kv_heads; ++h) rotate_half(k + t * a.k_stride_t + h * a.k_stride_h, d, c, s);
      }
    }
  });
}

}  // namespace

void rotary_embedding(DType dt, const RotaryArgs& a) {
  if (a.head_dim % 2 != 0) throw std::invalid_argument("rotary_embedding: head_dim must be even");
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "rotary_embedding", { rotary_impl<scalar_t>(a); });
}

}  // namespace codellama::cpu
