// y[m, n] = round(sum_k x[m, k] * w[n, k]) and its int8 variant w[n, k] = q[n, k] * s[n, k / group_size]:
// weight-streaming GEMV for decode (few rows). Dispatch rule (see codellama/linear.h): the binding calls these
// for M <= 8 rows of `linear` (more rows go to at::matmul / oneDNN there) and for every M of `linear_int8`.
//
// The kernel is memory-bound: every weight row is read from memory once (per chunk of 8 activation rows) and
// dotted with all M activation rows, which are converted once up front and stay in L1/L2. R weight rows are
// streamed together (R * M independent 8-lane accumulators, at most 8), rows of W are split over threads. (One
// weight row at a time, for int8 weights and one activation row, read 1.01-1.11x faster on the 2-core Zen 3 of
// earlier sessions, but decoded a 1.1B-shaped int8 model 1.19x slower on the 2-core Xeon of session 16:
// benchmarks/RESULTS.md. One path serves both.)
// Activations in fp32 for 16-bit and fp32 weights, and for int8 weights with fp32 activations: int8 is widened
// int8 -> int32 -> fp32 and multiplied by its group's scale before the FMA.
// int8 weights with 16-bit activations (AVX2, K a multiple of 16, groups of whole 128-column blocks): x is held
// as int16 with one fp32 scale per 128-column block (max |x| / 32767), and each 16 weights cost one widening and
// one vpmaddwd per activation row. The int -> float conversion had made the fp32 route compute-bound on this
// 2-core Zen 3 (~1.3 cycles per 8 weights, one core could not keep up with its half of the memory bandwidth);
// an L3-resident 2048 x 5632 matrix went from 20 to 35 G weights/s (benchmarks/RESULTS.md). Precision: x's
// error is at most 2^-16 of its block's max |x| per element, below the 16-bit input's own rounding for every
// element within a factor 2^7 (bf16) / 2^4 (fp16) of the block max, and far below the int8 weights' error
// (2^-8 of the group max); fp32 activations keep the fp32 route. Portable scalar fallback through vec.h when
// the compiler does not target AVX2.
#include "codellama/linear.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "linear_amx.h"
#include "vec.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// The M activation rows of a call, converted once, each row starting on a cache line and rows ld elements apart.
// x is loaded once per 8 or 16 weights per row, and a 32-byte load that straddles two lines costs two: from
// malloc's 16-byte alignment to 64, the M = 8 bf16 loop on L1-resident data went from 42-49 to 70 GFLOP/s
// (benchmarks/RESULTS.md). ld is K rounded up to a line plus one line: rows a multiple of 4 KiB apart put the same
// columns of all M rows in one L1 set (the padding alone, at 8 rows: 0.82-0.94x the time).
template <typename E>
class XRows {
 public:
  XRows(int64_t rows, int64_t K) : ld_((K + kLine - 1) / kLine * kLine + kLine), mem_(rows * ld_ + kLine) {
    const auto addr = reinterpret_cast<std::uintptr_t>(mem_.data());
    data_ = mem_.data() + (-addr & 63) / sizeof(E);
  }
  E* row(int64_t m) { return data_ + m * ld_; }
  const E* data() const { return data_; }
  int64_t ld() const { return ld_; }

 private:
  static constexpr int64_t kLine = 64 / sizeof(E);
  int64_t ld_;
  std::vector<E> mem_;
  E* data_;
};

struct XFloat {  // activation rows in fp32: x[m, k] = f[m * ld + k]
  const float* f;
  int64_t ld;
};

// out[r * M + m] += sum_{k in [kb, ke)} s[r, g(k)] * x[m, k] * w_r[k] for R consecutive rows of w (row stride
// K; s = 1 without kScaled), x the M activation rows in fp32. With few accumulators
// (R * M <= 4) the scale is applied once per group to the group's partial sums (kDefer); otherwise each
// 8-weight vector is scaled before the FMAs (one multiply shared by the M rows, keeps registers free).
// While streaming these R rows it prefetches the same columns of the next R rows: rows are short streams (2-11
// KiB) that the hardware prefetcher picks up late. On the 2-core EPYC a 1.1B-shaped decode step went from ~100
// to ~85 ms (bf16) and from ~75 to ~57 ms (int8) with it (benchmarks/RESULTS.md); prefetching further ahead
// (2R rows) or streaming 8 rows at once measured slower.
template <int M, int R, bool kScaled, typename W>
inline void dot_rows(float* out, const W* w, const float* scales, int64_t K, int64_t G, const XFloat& x,
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
    const auto step8 = [&](int64_t kk) {
      for (int r = 0; r < R; ++r) {
        vec8 wv = wload8(w + r * K + kk);
        if constexpr (kScaled && !kDefer) wv = mul(wv, sv[r]);
        for (int m = 0; m < M; ++m) acc[r][m] = fmadd(wv, load8(x.f + m * x.ld + kk), acc[r][m]);
      }
    };
    // A cache line of each row per step, its prefetch unconditional: a test of k per 8 weights (and the
    // registers it held) cost the int8 fp32 route 13-15% of its in-cache speed (medians, benchmarks/RESULTS.md).
    for (; k + kLine <= k1; k += kLine) {
      for (int r = 0; r < R; ++r) prefetch(next + r * K + k);
      for (int64_t j = 0; j < kLine; j += 8) step8(k + j);
    }
    for (; k + 8 <= k1; k += 8) step8(k);
    if constexpr (kDefer) {
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) { tot[r][m] = fmadd(sv[r], acc[r][m], tot[r][m]); acc[r][m] = zero8(); }
    }
    for (; k < k1; ++k) {
      for (int r = 0; r < R; ++r) {
        const float wf = kScaled ? wload1(w + r * K + k) * s[r] : wload1(w + r * K + k);
        for (int m = 0; m < M; ++m) tail[r][m] += wf * x.f[m * x.ld + k];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[r * M + m] += hsum(kDefer ? tot[r][m] : acc[r][m]) + tail[r][m];
}

#ifdef CODELLAMA_AVX2
// 16-bit activations against int8 weights (see the file comment): each row of x held as int16 in blocks of
// kXBlock columns, x[m, k] ~= xq[m, k] * xs[m, k / kXBlock]. Integer products, exact: vpmaddwd adds pairs of
// int8 * int16 products into int32 lanes (|sum| <= 128 / 8 * 2 * 127 * 32767 < 2^31 per block), converted to
// fp32 once per block and scaled there by the block's x scale and the weight group's scale.
constexpr int64_t kXBlock = 128;

struct XInt16 {
  const int16_t* q;  // [M, K] rows ld apart
  int64_t ld;
  const float* s;    // [M, nb], nb = ceil(K / kXBlock)
  int64_t nb;
};

// Usable when K is a multiple of 16 (the step) and every x block lies in one weight group.
inline bool int16_x_fits(int64_t K, int64_t G) { return K % 16 == 0 && (G == 1 || (K / G) % kXBlock == 0); }

// Smallest nonzero block max |x| the int16 route takes. Below ~32767 * FLT_MIN (3.9e-34, reachable in bf16) the
// block scale is subnormal and 1 / scale overflows: every x of the block became -32768 (wrong sign, ~3x the
// truth). 2^-64 also keeps the product of the x scale and a weight group's scale (>= 7e-15) a normal float.
constexpr float kXMinBlockMax = 0x1p-64f;

// xq / xs for one activation row: scale = max |x| / 32767 over each block (1 for an all-zero block), x / scale
// rounded to nearest even. A NaN or inf in a block makes its scale NaN, so every output is NaN (the reference
// gives NaN, or inf for an inf with no NaN: both are non-finite). Returns false when a block's max |x| is in
// (0, kXMinBlockMax): the row must take the fp32 route (xq / xs are then incomplete).
template <typename T>
bool quantize_x_int16(int16_t* q, float* s, const T* x, int64_t K) {
  for (int64_t b = 0; b * kXBlock < K; ++b) {
    const int64_t k0 = b * kXBlock, k1 = std::min(K, k0 + kXBlock);
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      const float a = std::fabs(to_float(x[k]));
      finite = finite && std::isfinite(a);
      amax = std::max(amax, a);
    }
    if (finite && amax > 0.f && amax < kXMinBlockMax) return false;
    const float sc = !finite ? NAN : amax > 0.f ? amax / 32767.f : 1.f;
    s[b] = sc;
    const vec8 inv = set1(1.f / sc);
    for (int64_t k = k0; k < k1; k += 8) {
      const __m256i v = _mm256_cvtps_epi32(mul(load8(x + k), inv));  // round to nearest even
      const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), h);
    }
  }
  return true;
}

// The vector operations of the int16 dot below. With AVX512-VNNI: 32 weights per step, widened to int16 once, and
// one vpdpwssd per activation row where AVX2 spends three instructions per 16 weights (int8 4096 -> 11008 at 8 rows,
// cold: 4.4-4.6 -> 3.5 ms); the same integer sums per block, the blocks' fp32 sums in 16 lanes.
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
struct Int16Lanes {
  using I = __m512i;
  using F = __m512;
  static constexpr int64_t kStep = 32;
  static I zero() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  // kStep weights (half: 16, the rest zero) widened to int16, and x's matching int16s
  static I weights(const int8_t* w, bool half) {
    const __m256i b = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm512_cvtepi8_epi16(b);
  }
  static I activations(const int16_t* x, bool half) {
    return half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)))
                : _mm512_loadu_si512(x);
  }
  static I dot(I acc, I w, I x) { return _mm512_dpwssd_epi32(acc, w, x); }
  static F scale_add(I acc, float s, F tot) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(s), tot); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
};
#else
struct Int16Lanes {
  using I = __m256i;
  using F = vec8;
  static constexpr int64_t kStep = 16;
  static I zero() { return _mm256_setzero_si256(); }
  static F zero_f() { return zero8(); }
  static I weights(const int8_t* w, bool) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  }
  static I activations(const int16_t* x, bool) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
  static I dot(I acc, I w, I x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
  static F scale_add(I acc, float s, F tot) { return fmadd(_mm256_cvtepi32_ps(acc), set1(s), tot); }
  static float sum(F v) { return hsum(v); }
};
#endif

template <int M, int R, bool kScaled>
inline void dot_rows(float* out, const int8_t* w, const float* scales, int64_t K, int64_t G, const XInt16& x,
                     int64_t kb, int64_t ke) {
  static_assert(kScaled, "int16 activations are for int8 weights");
  using L = Int16Lanes;
  constexpr int64_t kLine = 64;
  const int8_t* next = w + R * K;
  const int64_t gs = K / G;
  L::F tot[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) tot[r][m] = L::zero_f();
  for (int64_t b = kb / kXBlock; b * kXBlock < ke; ++b) {
    const int64_t k0 = b * kXBlock, k1 = std::min(ke, k0 + kXBlock);
    L::I acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = L::zero();
    for (int64_t k = k0; k < k1; k += L::kStep) {
      const bool half = k + L::kStep > k1;  // 16 columns left of a 32-column step (K is a multiple of 16)
      if (k % kLine == 0)  // per step here: prefetching both lines at the block start measured slower
        for (int r = 0; r < R; ++r) prefetch(next + r * K + k);
      for (int r = 0; r < R; ++r) {
        const L::I wv = L::weights(w + r * K + k, half);
        for (int m = 0; m < M; ++m) acc[r][m] = L::dot(acc[r][m], wv, L::activations(x.q + m * x.ld + k, half));
      }
    }
    const int64_t g = G == 1 ? 0 : k0 / gs;
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) tot[r][m] = L::scale_add(acc[r][m], scales[r * G + g] * x.s[m * x.nb + b], tot[r][m]);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[r * M + m] += L::sum(tot[r][m]);
}

#endif

// Rows [n0, n1) of y for M (compile-time) activation rows, in tiles of kTile weight rows. Few activation rows
// (M <= 4): whole weight rows are streamed R at a time, x (M * K fp32) is small. More rows: the FMAs outnumber
// the weight bytes and x would be re-read from L2 for every weight row, so K is cut into slices (held in L1)
// and each slice is swept over the tile before the next one: 512 columns of fp32 x (M * 2 KiB), 2048 of int16 x
// (M * 4 KiB; against 512: 0.83-0.97x the time at 6 and 8 rows, 1024: 0.90-0.99x, 4096: 0.84-0.97x, in paired
// runs, benchmarks/RESULTS.md; fp32 x measured 1.05-1.18x slower at 2048).
template <int M, bool kScaled, typename W, typename T, typename X>
void gemv_rows(T* y, int64_t ldy, const W* w, const float* scales, const X& x, int64_t n0, int64_t n1,
               int64_t K, int64_t G) {
  // R * M <= 8 accumulators (4 when the int8 scale is deferred, which doubles them).
  constexpr int R = kScaled ? (M == 1 ? 4 : M == 2 ? 2 : 1) : (M <= 2 ? 4 : M <= 4 ? 2 : 1);
  constexpr int kTile = 8;
  const int64_t kslice = M <= 4 ? K : std::is_same_v<X, XFloat> ? 512 : 2048;  // multiples of kXBlock
  for (int64_t n = n0; n < n1; n += kTile) {
    const int rows = static_cast<int>(std::min<int64_t>(kTile, n1 - n));
    float out[kTile * M] = {};
    for (int64_t kb = 0; kb < K; kb += kslice) {
      const int64_t ke = std::min(K, kb + kslice);
      int r = 0;
      for (; r + R <= rows; r += R) {
        dot_rows<M, R, kScaled>(out + r * M, w + (n + r) * K, kScaled ? scales + (n + r) * G : nullptr, K, G, x,
                                kb, ke);
      }
      for (; r < rows; ++r) {
        dot_rows<M, 1, kScaled>(out + r * M, w + (n + r) * K, kScaled ? scales + (n + r) * G : nullptr, K, G, x,
                                kb, ke);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int m = 0; m < M; ++m) y[m * ldy + n + r] = from_float<T>(out[r * M + m]);
  }
}

template <bool kScaled, typename W, typename T, typename X>
void gemv_chunk(int mc, T* y, int64_t ldy, const W* w, const float* scales, const X& x, int64_t n0,
                int64_t n1, int64_t K, int64_t G) {
  switch (mc) {
    case 1: gemv_rows<1, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
    case 2: gemv_rows<2, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
    case 3: gemv_rows<3, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
    case 4: gemv_rows<4, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
    case 5: gemv_rows<5, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
    case 6: gemv_rows<6, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
    case 7: gemv_rows<7, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
    default: gemv_rows<8, kScaled>(y, ldy, w, scales, x, n0, n1, K, G); break;
  }
}

// The driver: activation rows in chunks of 8, each chunk converted once (to fp32, or for int8 weights and
// 16-bit activations to int16 blocks), then W streamed over threads.
template <bool kScaled, typename W, typename T>
void gemv(T* y, const T* x, int64_t x_stride, const W* w, const float* scales, int64_t M, int64_t N, int64_t K,
          int64_t G) {
  if (M <= 0 || N <= 0) return;
  const int64_t mmax = std::min<int64_t>(M, kGemvMaxRows);
  // Blocks of rows of ~256 KiB of weights (a multiple of the 8-row tile): long runs of consecutive rows for the
  // prefetch in dot_rows (64 KiB blocks measured a few % slower), still dozens of blocks per matrix to balance.
  const int64_t block_rows =
      std::max<int64_t>(8, ((int64_t{1} << 18) / (K * static_cast<int64_t>(sizeof(W)))) & ~int64_t{7});
  const int64_t blocks = (N + block_rows - 1) / block_rows;
  const int threads = static_cast<int>(std::min<int64_t>(max_threads(), blocks));
  const auto stream_w = [&](int mc, T* yc, const auto& xv) {
    // Dynamic blocks of rows rather than one static chunk per thread: a thread slowed by another process on
    // its core (shared machines) then takes fewer blocks instead of making the others wait for it.
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
#endif
    for (int64_t b = 0; b < blocks; ++b) {
      gemv_chunk<kScaled>(mc, yc, N, w, scales, xv, b * block_rows, std::min(N, (b + 1) * block_rows), K, G);
    }
  };
  std::optional<XRows<float>> xf;  // allocated on the first chunk that takes the fp32 route
  const auto stream_fp32 = [&](int64_t m0, int mc) {
    if (!xf) xf.emplace(mmax, K);
    for (int m = 0; m < mc; ++m) {
      const T* xr = x + (m0 + m) * x_stride;
      float* xo = xf->row(m);
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) store8(xo + k, load8(xr + k));
      for (; k < K; ++k) xo[k] = to_float(xr[k]);
    }
    stream_w(mc, y + m0 * N, XFloat{xf->data(), xf->ld()});
  };
#ifdef CODELLAMA_AVX2
  if constexpr (kScaled && !std::is_same_v<T, float>) {
    if (int16_x_fits(K, G)) {
      // AMX-INT8 tiles take up to 64 activation rows per pass over W, the GEMV 8
      const bool amx = M >= kCpuInt8TilesMinRows && linear_int8_amx_fits(N, K);
      const int64_t chunk = amx ? kCpuInt8TilesMaxRows : kGemvMaxRows;
      const int64_t nb = (K + kXBlock - 1) / kXBlock;
      XRows<int16_t> xq(std::min(M, chunk), K);
      std::vector<float> xs(static_cast<size_t>(std::min(M, chunk) * nb));
      for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int mc = static_cast<int>(std::min<int64_t>(chunk, M - m0));
        bool fits = true;
        for (int m = 0; m < mc && fits; ++m)
          fits = quantize_x_int16(xq.row(m), xs.data() + m * nb, x + (m0 + m) * x_stride, K);
        if (!fits) {
          for (int m = 0; m < mc; m += kGemvMaxRows)
            stream_fp32(m0 + m, static_cast<int>(std::min<int64_t>(kGemvMaxRows, mc - m)));
        } else if (amx) {
          linear_int8_amx(std::is_same_v<T, BFloat16> ? DType::kBFloat16 : DType::kFloat16, y + m0 * N, N, xq.data(),
                          xq.ld(), xs.data(), nb, kXBlock, w, scales, mc, N, K, G);
        } else {
          stream_w(mc, y + m0 * N, XInt16{xq.data(), xq.ld(), xs.data(), nb});
        }
      }
      return;
    }
  }
#endif
  for (int64_t m0 = 0; m0 < M; m0 += kGemvMaxRows) {
    stream_fp32(m0, static_cast<int>(std::min<int64_t>(kGemvMaxRows, M - m0)));
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

bool linear_int8_on_tiles(DType dt, int64_t N, int64_t K, int64_t G) {
#ifdef CODELLAMA_AVX2
  return dt != DType::kFloat32 && int16_x_fits(K, G) && linear_int8_amx_fits(N, K);
#else
  return false;
#endif
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

namespace {

// w[k] = round(q[k] * s) for k in [0, n), 16 at a time where the CPU converts to bf16 in one instruction
// (vcvtneps2bf16: round to nearest even, NaN quiet, as from_float; it reads a subnormal product, below 1.2e-38,
// as 0). The AVX2 rounding (store8) costs ~10 instructions per 8 weights: the bf16 dequantisation for the AMX GEMM
// (python/ops/linear.cpp) was instruction-bound with it.
template <typename T>
inline void dequantize_run(T* w, const int8_t* q, float s, int64_t n) {
  int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    const __m512 sv = _mm512_set1_ps(s);
    for (; k + 16 <= n; k += 16) {
      const __m512 f =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(f, sv)));
    }
  }
#endif
  const vec8 sv = set1(s);
  for (; k + 8 <= n; k += 8) store8(w + k, mul(wload8(q + k), sv));
  for (; k < n; ++k) w[k] = from_float<T>(static_cast<float>(q[k]) * s);
}

// dst[c, r] = src[r, c] for 16-bit elements, an 8 x 8 block at a time: 8 row loads, three rounds of unpacks (16-,
// 32-, 64-bit interleaves), 8 column stores.
#if defined(__SSE2__)
inline void transpose8x8_16(uint16_t* dst, int64_t ldd, const uint16_t* src, int64_t lds) {
  __m128i r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * lds));
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      r[4 * i + j] = _mm_unpacklo_epi32(t[4 * i + j], t[4 * i + j + 2]);
      r[4 * i + j + 2] = _mm_unpackhi_epi32(t[4 * i + j], t[4 * i + j + 2]);
    }
  }
  // r[0..3] hold columns (0,1), (4,5), (2,3), (6,7) of rows 0-3; r[4..7] the same of rows 4-7
  const int col_of[4] = {0, 4, 2, 6};
  for (int i = 0; i < 4; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + col_of[i] * ldd), _mm_unpacklo_epi64(r[i], r[i + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (col_of[i] + 1) * ldd), _mm_unpackhi_epi64(r[i], r[i + 4]));
  }
}
#endif

}  // namespace

void transpose_16bit(void* dst, const void* src, int64_t rows, int64_t cols) {
  auto* d = static_cast<uint16_t*>(dst);
  const auto* s = static_cast<const uint16_t*>(src);
  // Threads over bands of 64 source columns (destination rows); within a band, 8 x 8 blocks down the source rows.
  constexpr int64_t kBand = 64;
  parallel_for((cols + kBand - 1) / kBand, std::max<int64_t>(1, 8192 / std::max<int64_t>(rows, 1)),
               [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * kBand; c0 < std::min(cols, b1 * kBand); c0 += kBand) {
      const int64_t c1 = std::min(cols, c0 + kBand);
      int64_t r = 0;
#if defined(__SSE2__)
      for (; r + 8 <= rows; r += 8) {
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8) transpose8x8_16(d + c * rows + r, rows, s + r * cols + c, cols);
        for (; c < c1; ++c) {
          for (int64_t i = r; i < r + 8; ++i) d[c * rows + i] = s[i * cols + c];
        }
      }
#endif
      for (; r < rows; ++r) {
        for (int64_t c = c0; c < c1; ++c) d[c * rows + r] = s[r * cols + c];
      }
    }
  });
}

void dequantize_int8(DType dt, void* w, const int8_t* q, const float* scales, int64_t N, int64_t K, int64_t G) {
  const int64_t gs = K / G;
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "dequantize_int8", {
    auto* wo = static_cast<scalar_t*>(w);
    parallel_for(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t g = 0; g < G; ++g) {
          dequantize_run(wo + n * K + g * gs, q + n * K + g * gs, scales[n * G + g], gs);
        }
      }
    });
  });
}

}  // namespace codellama::cpu
