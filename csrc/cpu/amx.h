// What the AMX kernels (attention_amx.cpp, linear_amx.cpp) share: whether this CPU and OS grant the tiles, the one
// tile configuration they use, and a 16 x 16 dword transpose on AVX-512.
#pragma once

#if defined(__AMX_TILE__) && defined(__AVX512F__) && defined(__linux__)
#define CODELLAMA_AMX_TILE 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace codellama::cpu::amx {

constexpr int kRows = 16;  // every tile: 16 rows of 64 bytes

enum class Kind { kBF16 = 22, kInt8 = 25 };  // cpuid leaf 7, EDX bits

// A process must ask Linux for the tile state before its first tile instruction (arch_prctl ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA; Linux 5.16+). Asked once.
inline bool available(Kind kind) {
  static const unsigned edx = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1)) return 0u;  // AMX-TILE
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? d : 0u;
  }();
  return edx >> static_cast<int>(kind) & 1;
}

// Palette 1, all eight tiles 16 rows x 64 bytes. Per thread, before its first tile instruction; _tile_release after.
inline void configure_tiles() {
  struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kRows;
  }
  _tile_loadconfig(&cfg);
}

// Transposes 16 x 16 dwords in place: rows[i] lane j <- rows[j] lane i.
inline void transpose16x16(__m512i (&rows)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // dword pairs: t[i] = (a0 b0 a1 b1 | ...), per 128-bit lane
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // qword pairs: 4 rows' dwords per 128-bit lane
    rows[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    rows[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    rows[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    rows[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // rows[4g + j] holds, in 128-bit lane l, column 4l + j of source rows 4g .. 4g+3; gather the 4 groups' lanes
  const __m512i lo = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_permutex2var_epi64(rows[j], lo, rows[4 + j]);   // lanes (g0 l0, g1 l0, g0 l1, g1 l1)
    const __m512i b = _mm512_permutex2var_epi64(rows[j], hi, rows[4 + j]);   // (g0 l2, g1 l2, g0 l3, g1 l3)
    const __m512i c = _mm512_permutex2var_epi64(rows[8 + j], lo, rows[12 + j]);
    const __m512i d = _mm512_permutex2var_epi64(rows[8 + j], hi, rows[12 + j]);
    t[j] = _mm512_shuffle_i64x2(a, c, 0x44);        // l0: g0 g1 g2 g3
    t[4 + j] = _mm512_shuffle_i64x2(a, c, 0xee);    // l1
    t[8 + j] = _mm512_shuffle_i64x2(b, d, 0x44);    // l2
    t[12 + j] = _mm512_shuffle_i64x2(b, d, 0xee);   // l3
  }
  for (int i = 0; i < 16; ++i) rows[i] = t[i];
}

}  // namespace codellama::cpu::amx
#endif
