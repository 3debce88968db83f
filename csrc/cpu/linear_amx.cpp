// int8 weights against 16-bit activations on AMX-INT8 tiles: linear.cpp's int16 route (x held as int16 in blocks
// with one fp32 scale each, exact integer sums per block) with the integer products on tiles. The VNNI GEMV does
// 32 products per instruction and activation row and turned compute-bound at a few rows (2-core Xeon, 1.1B-shaped
// int8 decode at batch 8: 54% of the read bandwidth, benchmarks/RESULTS.md); a tile product does 16 x 16 x 64.
// Tile products take int8 operands, so x = 256 hi + lo is split into signed high bytes and unsigned low bytes,
// each a product of its own (tdpbssd, tdpbsud) whose sums are recombined exactly: per 128-column block
// |256 sum(q hi)| + |sum(q lo)| <= 127 * 128 * (128 * 256 + 255) < 2^31.
// W is the A operand as it lies in memory, 16 weight rows by 64 columns a tile (stride K); x is the B operand,
// copied once per call into its 4-byte-interleaved layout. Each block's two sum tiles (16 weight rows x 16
// activation rows) are stored, recombined, converted to fp32 and scaled on AVX-512. Threads take chunks of tiles.
#include "linear_amx.h"

#include "amx.h"

#if defined(CODELLAMA_AMX_TILE) && defined(__AMX_INT8__) && defined(__AVX512BW__)
#define CODELLAMA_AMX_INT8 1
#include <algorithm>
#include <vector>

#include "vec.h"
#endif

namespace codellama::cpu {

#ifndef CODELLAMA_AMX_INT8
bool linear_int8_amx_fits(int64_t, int64_t) { return false; }

void linear_int8_amx(DType, void*, int64_t, const int16_t*, int64_t, const float*, int64_t, int64_t, const int8_t*,
                     const float*, int64_t, int64_t, int64_t, int64_t) {}
#else
namespace {

constexpr int kRows = amx::kRows;  // weight rows per tile (A), activation rows per tile (B's 16 dword columns)
constexpr int64_t kStep = 64;      // columns per tile product
// W's memory: each thread takes chunks of kChunk tiles of 16 weight rows; while one tile is multiplied, the next
// one of the chunk streams into L2 in address order (16 lines per step), and each row of the current tile is
// prefetched kAhead bytes ahead (the chunk's first tile has only that). 1.1B-shaped int8 decode, --no-hf: b=1 12.6
// tok/s with neither, 14.7 with the row prefetch alone, 15.9 with both; b=8 91.0, 108.3, 114.1.
constexpr int64_t kChunk = 8;
constexpr int64_t kAhead = 512;
constexpr int64_t kTileBytes = kRows * 64;

// Tiles: the two sum tiles (0: hi, 1: lo), W (2), x's hi and lo bytes (3, 4).
// hi / lo [K / 64][m tiles][16 tile rows][16 activation rows][4 bytes]: tile row j of step s holds columns
// 64 s + 4 j .. + 3 of each activation row of the m tile (rows past M zero): per step and m tile, 16 rows of 64
// bytes transposed as 16 x 16 dwords.
void pack_x(uint8_t* hi, uint8_t* lo, const int16_t* xq, int64_t ldx, int64_t M, int64_t K) {
  const __m512i mask = _mm512_set1_epi16(0xff);
  const int64_t mtiles = (M + kRows - 1) / kRows;
  for (int64_t s = 0; s < K / kStep; ++s) {
    for (int64_t i = 0; i < mtiles; ++i) {
      __m512i h[kRows], l[kRows];
      for (int r = 0; r < kRows; ++r) {
        const int64_t m = i * kRows + r;
        __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
        if (m < M) {
          a = _mm512_loadu_si512(xq + m * ldx + s * kStep);
          b = _mm512_loadu_si512(xq + m * ldx + s * kStep + 32);
        }
        h[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srai_epi16(a, 8))),
                                  _mm512_cvtepi16_epi8(_mm512_srai_epi16(b, 8)), 1);
        l[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_and_si512(a, mask))),
                                  _mm512_cvtepi16_epi8(_mm512_and_si512(b, mask)), 1);
      }
      amx::transpose16x16(h);
      amx::transpose16x16(l);
      const int64_t off = (s * mtiles + i) * kTileBytes;
      for (int j = 0; j < kRows; ++j) {
        _mm512_storeu_si512(hi + off + j * 64, h[j]);
        _mm512_storeu_si512(lo + off + j * 64, l[j]);
      }
    }
  }
}

// Per 16 weight rows (a thread task), per x block: each m tile's two sum tiles over the block's columns (W's tile
// reloaded per m tile, from L1), recombined and scaled into that m tile's fp32 sums.
template <typename T>
void run(T* y, int64_t ldy, const int16_t* xq, int64_t ldx, const float* xs, int64_t nb, int64_t xblock,
         const int8_t* q, const float* scales, int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t steps = K / kStep, mtiles = (M + kRows - 1) / kRows;
  std::vector<uint8_t> hi(steps * mtiles * kTileBytes), lo(steps * mtiles * kTileBytes);
  pack_x(hi.data(), lo.data(), xq, ldx, M, K);
  std::vector<float> xst(nb * mtiles * kRows, 0.f);  // [nb][M rounded up to 16]: block scales (0 past M)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) xst[b * mtiles * kRows + m] = xs[m * nb + b];
  const int64_t tiles = N / kRows, gs = K / G;
  const int64_t chunks = (tiles + kChunk - 1) / kChunk;
  const int threads = static_cast<int>(std::min<int64_t>(max_threads(), tiles));
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    amx::configure_tiles();
    alignas(64) int32_t chi[kRows][kRows], clo[kRows][kRows];
    std::vector<__m512> acc(mtiles * kRows);  // [m tile][weight row r]: lane m of the m tile
    // y's columns 16 t .. 16 t + 15; with_next: the chunk's next tile follows
    const auto multiply_tile = [&](int64_t t, bool with_next) {
      const int8_t* w = q + t * kRows * K;
      const int8_t* next = with_next ? w + kRows * K : nullptr;
      const float* ws = scales + t * kRows * G;
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t g = G == 1 ? 0 : b * xblock / gs, kend = std::min(K, (b + 1) * xblock);
        for (int64_t i = 0; i < mtiles; ++i) {
          _tile_zero(0);
          _tile_zero(1);
          for (int64_t k = b * xblock; k < kend; k += kStep) {
            const int64_t off = (k / kStep * mtiles + i) * kTileBytes;
            if (i == 0) {
              for (int r = 0; r < kRows; ++r) {
                prefetch(w + r * K + k + kAhead);
                if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * kRows + r * 64), _MM_HINT_T1);
              }
            }
            _tile_loadd(2, w + k, K);
            _tile_loadd(3, hi.data() + off, 64);
            _tile_loadd(4, lo.data() + off, 64);
            _tile_dpbssd(0, 2, 3);
            _tile_dpbsud(1, 2, 4);
          }
          _tile_stored(0, chi, 64);
          _tile_stored(1, clo, 64);
          const __m512 xsv = _mm512_loadu_ps(xst.data() + (b * mtiles + i) * kRows);
          __m512* a = acc.data() + i * kRows;
          for (int r = 0; r < kRows; ++r) {
            const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(chi[r]), 8),
                                                 _mm512_load_si512(clo[r]));
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_set1_ps(ws[r * G + g]), xsv), a[r]);
          }
        }
      }
      // acc[i][r] lane j = y[16 i + j, 16 t + r]: transposed to one vector per activation row
      for (int64_t i = 0; i < mtiles; ++i) {
        __m512i rows[kRows];
        for (int r = 0; r < kRows; ++r) rows[r] = _mm512_castps_si512(acc[i * kRows + r]);
        amx::transpose16x16(rows);
        alignas(64) float out[kRows];
        for (int64_t j = 0; j < std::min<int64_t>(kRows, M - i * kRows); ++j) {
          _mm512_store_ps(out, _mm512_castsi512_ps(rows[j]));
          T* yr = y + (i * kRows + j) * ldy + t * kRows;
          for (int r = 0; r < kRows; ++r) yr[r] = from_float<T>(out[r]);
        }
      }
    };
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t t1 = std::min(tiles, (c + 1) * kChunk);
      for (int64_t t = c * kChunk; t < t1; ++t) multiply_tile(t, t + 1 < t1);
    }
    _tile_release();
  }
}

}  // namespace

bool linear_int8_amx_fits(int64_t N, int64_t K) {
  return N % kRows == 0 && K % kStep == 0 && amx::available(amx::Kind::kInt8);
}

void linear_int8_amx(DType dt, void* y, int64_t ldy, const int16_t* xq, int64_t ldx, const float* xs, int64_t nb,
                     int64_t xblock, const int8_t* q, const float* scales, int64_t M, int64_t N, int64_t K,
                     int64_t G) {
  if (dt == DType::kBFloat16) {
    run(static_cast<BFloat16*>(y), ldy, xq, ldx, xs, nb, xblock, q, scales, M, N, K, G);
  } else {
    run(static_cast<Half*>(y), ldy, xq, ldx, xs, nb, xblock, q, scales, M, N, K, G);
  }
}
#endif

}  // namespace codellama::cpu
