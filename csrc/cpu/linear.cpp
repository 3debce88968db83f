// y[m, n] = round(sum_k x[m, k] * w[n, k]) and its int8 variant w[n, k] = q[n, k] * s[n, k / group_size]:
// weight-streaming GEMV for decode (few rows). Dispatch rule (see codellama/linear.h): the binding calls these
// for M <= 8 rows of `linear` (more rows go to at::matmul / oneDNN there) and for every M of `linear_int8`.
//
// The kernel is memory-bound: every weight row is read from memory once (per chunk of 8 activation rows) and
// dotted with all M activation rows, which are converted to fp32 once up front and stay in L1/L2. R weight
// rows are streamed together (R * M independent 8-lane fp32 accumulators, at most 8), rows of W are split over
// threads with parallel_for. int8 weights are widened int8 -> int32 -> fp32 and multiplied by their group's
// scale before the FMA (weight-only quantisation: activations stay float). Portable scalar fallback through
// vec.h when the compiler does not target AVX2.
#include "codellama/linear.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec.h"

namespace codellama::cpu {
namespace {

// ---- weight element loads: 8 lanes, and one element ----
#ifdef CODELLAMA_AVX2
inline vec8 wload8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
inline vec8 wload8(const int8_t* p) { vec8 r; for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]); return r; }
#endif
template <typename T> inline vec8 wload8(const T* p) { return load8(p); }
inline float wload1(const int8_t* p) { return static_cast<float>(*p); }
template <typename T> inline float wload1(const T* p) { return to_float(*p); }

// out[r * M + m] += sum_{k in [kb, ke)} s[r, g(k)] * xf[m * K + k] * w_r[k] for R consecutive rows of w (row
// stride K; s = 1 without kScaled). xf holds the M activation rows in fp32, contiguous. With few accumulators
// (R * M <= 4) the scale is applied once per group to the group's partial sums (kDefer); otherwise each
// 8-weight vector is scaled before the FMAs (one multiply shared by the M rows, keeps registers free).
// While streaming these R rows it prefetches the same columns of the next R rows: rows are short streams (2-11
// KiB) that the hardware prefetcher picks up late. On the 2-core EPYC a 1.1B-shaped decode step went from ~100
// to ~85 ms (bf16) and from ~75 to ~57 ms (int8) with it (benchmarks/RESULTS.md); prefetching further ahead
// (2R rows) or streaming 8 rows at once measured slower.
template <int M, int R, bool kScaled, typename W>
inline void dot_rows(float* out, const W* w, const float* scales, int64_t K, int64_t G, const float* xf,
                     int64_t kb, int64_t ke) {
  constexpr bool kDefer = kScaled && R * M <= 4;
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  const W* next = w + R * K;
  const int64_t gs = K / G;
  vec8 acc[R][M], tot[R][M];
  float tail[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) { acc[r][m] = zero8(); tot[r][m] = zero8(); tail[r][m] = 0.f; }
  for (int64_t g = kb / gs; g * gs < ke; ++g) {
    float s[R];
    vec8 sv[R];
    for (int r = 0; r < R; ++r) {
      s[r] = kScaled ? scales[r * G + g] : 1.f;
      sv[r] = set1(s[r]);
    }
    const int64_t k1 = std::min(ke, (g + 1) * gs);
    int64_t k = std::max(kb, g * gs);
    for (; k + 8 <= k1; k += 8) {
      if (k % kLine == 0)
        for (int r = 0; r < R; ++r) prefetch(next + r * K + k);
      for (int r = 0; r < R; ++r) {
        vec8 wv = wload8(w + r * K + k);
        if constexpr (kScaled && !kDefer) wv = mul(wv, sv[r]);
        for (int m = 0; m < M; ++m) acc[r][m] = fmadd(wv, load8(xf + m * K + k), acc[r][m]);
      }
    }
    if constexpr (kDefer) {
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) { tot[r][m] = fmadd(sv[r], acc[r][m], tot[r][m]); acc[r][m] = zero8(); }
    }
    for (; k < k1; ++k) {
      for (int r = 0; r < R; ++r) {
        const float wf = kScaled ? wload1(w + r * K + k) * s[r] : wload1(w + r * K + k);
        for (int m = 0; m < M; ++m) tail[r][m] += wf * xf[m * K + k];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[r * M + m] += hsum(kDefer ? tot[r][m] : acc[r][m]) + tail[r][m];
}

// Rows [n0, n1) of y for M (compile-time) activation rows, in tiles of kTile weight rows. Few activation rows
// (M <= 4): whole weight rows are streamed R at a time, x (M * K fp32) is small. More rows: the FMAs outnumber
// the weight bytes and x would be re-read from L2 for every weight row, so K is cut into slices of 512
// columns (M * 2 KiB of x, held in L1) and each slice is swept over the tile before the next one.
template <int M, bool kScaled, typename W, typename T>
void gemv_rows(T* y, int64_t ldy, const W* w, const float* scales, const float* xf, int64_t n0, int64_t n1,
               int64_t K, int64_t G) {
  // R * M <= 8 accumulators (4 when the int8 scale is deferred, which doubles them).
  constexpr int R = kScaled ? (M == 1 ? 4 : M == 2 ? 2 : 1) : (M <= 2 ? 4 : M <= 4 ? 2 : 1);
  constexpr int kTile = 8;
  const int64_t kslice = M <= 4 ? K : 512;
  for (int64_t n = n0; n < n1; n += kTile) {
    const int rows = static_cast<int>(std::min<int64_t>(kTile, n1 - n));
    float out[kTile * M] = {};
    for (int64_t kb = 0; kb < K; kb += kslice) {
      const int64_t ke = std::min(K, kb + kslice);
      int r = 0;
      for (; r + R <= rows; r += R) {
        dot_rows<M, R, kScaled>(out + r * M, w + (n + r) * K, kScaled ? scales + (n + r) * G : nullptr, K, G, xf,
                                kb, ke);
      }
      for (; r < rows; ++r) {
        dot_rows<M, 1, kScaled>(out + r * M, w + (n + r) * K, kScaled ? scales + (n + r) * G : nullptr, K, G, xf,
                                kb, ke);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int m = 0; m < M; ++m) y[m * ldy + n + r] = from_float<T>(out[r * M + m]);
  }
}

template <bool kScaled, typename W, typename T>
void gemv_chunk(int mc, T* y, int64_t ldy, const W* w, const float* scales, const float* xf, int64_t n0,
                int64_t n1, int64_t K, int64_t G) {
  switch (mc) {
    case 1: gemv_rows<1, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
    case 2: gemv_rows<2, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
    case 3: gemv_rows<3, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
    case 4: gemv_rows<4, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
    case 5: gemv_rows<5, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
    case 6: gemv_rows<6, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
    case 7: gemv_rows<7, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
    default: gemv_rows<8, kScaled>(y, ldy, w, scales, xf, n0, n1, K, G); break;
  }
}

// The driver: activation rows in chunks of 8, each chunk converted to fp32 once, then W streamed over threads.
template <bool kScaled, typename W, typename T>
void gemv(T* y, const T* x, int64_t x_stride, const W* w, const float* scales, int64_t M, int64_t N, int64_t K,
          int64_t G) {
  if (M <= 0 || N <= 0) return;
  std::vector<float> buf(static_cast<size_t>(std::min<int64_t>(M, kGemvMaxRows) * K));
  // Blocks of rows of ~256 KiB of weights (a multiple of the 8-row tile): long runs of consecutive rows for the
  // prefetch in dot_rows (64 KiB blocks measured a few % slower), still dozens of blocks per matrix to balance.
  const int64_t block_rows =
      std::max<int64_t>(8, ((int64_t{1} << 18) / (K * static_cast<int64_t>(sizeof(W)))) & ~int64_t{7});
  for (int64_t m0 = 0; m0 < M; m0 += kGemvMaxRows) {
    const int mc = static_cast<int>(std::min<int64_t>(kGemvMaxRows, M - m0));
    for (int m = 0; m < mc; ++m) {
      const T* xr = x + (m0 + m) * x_stride;
      float* xo = buf.data() + m * K;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) store8(xo + k, load8(xr + k));
      for (; k < K; ++k) xo[k] = to_float(xr[k]);
    }
    const float* xf = buf.data();
    T* yc = y + m0 * N;
    // Dynamic blocks of rows rather than one static chunk per thread: a thread slowed by another process on
    // its core (shared machines) then takes fewer blocks instead of making the others wait for it.
    const int64_t blocks = (N + block_rows - 1) / block_rows;
    const int threads = static_cast<int>(std::min<int64_t>(max_threads(), blocks));
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
#endif
    for (int64_t b = 0; b < blocks; ++b) {
      gemv_chunk<kScaled>(mc, yc, N, w, scales, xf, b * block_rows, std::min(N, (b + 1) * block_rows), K, G);
    }
  }
}

}  // namespace

void linear_gemv(DType dt, void* y, const void* x, int64_t x_stride, const void* w, int64_t M, int64_t N, int64_t K) {
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "linear", {
    gemv<false>(static_cast<scalar_t*>(y), static_cast<const scalar_t*>(x), x_stride,
                static_cast<const scalar_t*>(w), static_cast<const float*>(nullptr), M, N, K, int64_t{1});
  });
}

void linear_int8(DType dt, void* y, const void* x, int64_t x_stride, const int8_t* q, const float* scales,
                 int64_t M, int64_t N, int64_t K, int64_t G) {
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "linear_int8", {
    gemv<true>(static_cast<scalar_t*>(y), static_cast<const scalar_t*>(x), x_stride, q, scales, M, N, K, G);
  });
}

void quantize_int8(DType dt, int8_t* q, float* scales, const void* w, int64_t N, int64_t K, int64_t group_size) {
  const int64_t gs = group_size == 0 ? K : group_size;
  const int64_t G = K / gs;
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "quantize_int8", {
    const auto* wi = static_cast<const scalar_t*>(w);
    parallel_for(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* wr = wi + n * K + g * gs;
          int8_t* qr = q + n * K + g * gs;
          float amax = 0.f;
          for (int64_t k = 0; k < gs; ++k) amax = std::max(amax, std::fabs(to_float(wr[k])));
          const float s = amax > 0.f ? amax / 127.f : 1.f;
          scales[n * G + g] = s;
          for (int64_t k = 0; k < gs; ++k) {
            // nearbyint: the current rounding mode, round-half-even by default (as torch.round)
            const float v = std::nearbyint(to_float(wr[k]) / s);
            qr[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
          }
        }
      }
    });
  });
}

void dequantize_int8(DType dt, void* w, const int8_t* q, const float* scales, int64_t N, int64_t K, int64_t G) {
  const int64_t gs = K / G;
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "dequantize_int8", {
    auto* wo = static_cast<scalar_t*>(w);
    parallel_for(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t k0 = g * gs;
          const float s = scales[n * G + g];
          const vec8 sv = set1(s);
          int64_t k = 0;
          for (; k + 8 <= gs; k += 8) store8(wo + n * K + k0 + k, mul(wload8(q + n * K + k0 + k), sv));
          for (; k < gs; ++k) wo[n * K + k0 + k] = from_float<scalar_t>(static_cast<float>(q[n * K + k0 + k]) * s);
        }
      }
    });
  });
}

}  // namespace codellama::cpu
