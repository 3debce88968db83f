// Causal prefill attention on AMX tiles, bf16, head_dim 64 or 128: attention.cpp's rule (codellama/attention.h:
// scores and softmax in fp32, the unnormalised exp(s - m) rounded to bf16 before P.v, P.v summed in fp32, one
// rounding of the output) with both products on tiles, which sum bf16 products in fp32: S = Q K^T and P V, 16 query
// rows at a time. On the 2-core Xeon of benchmarks/RESULTS.md (session 16) the AVX2 kernel ran prefill attention at
// 0.11 TFLOP/s, 0.21x torch's SDPA, which uses these tiles through oneDNN.
// A tile product's B operand holds pairs along the summed dimension ("VNNI" layout): for S, each key's dims in pairs;
// for P V, pairs of keys per dim. Both are copied into that layout once per (sequence, kv head), for the keys up to
// the sequence's end in blocks of 32, zero past it. Each task then takes 16 query rows of one head through those
// blocks with flash attention's online softmax per row (running max m, sum l, fp32 accumulator O) on AVX-512.
// A row is computed alone (its scores, mask and softmax), over key blocks at fixed positions (0, 32, ...), and a
// block it cannot see leaves its state untouched, so its result does not depend on which rows share its tile:
// a prompt prefilled in parts gives the bits of the whole.
#include "attention_amx.h"

#include "amx.h"

#if defined(CODELLAMA_AMX_TILE) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define CODELLAMA_AMX 1
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "vec.h"
#endif

namespace codellama::cpu {

#ifndef CODELLAMA_AMX
bool attention_prefill_amx(void*, HeadsView, int64_t, int64_t, const KVCache&, const int32_t*, const int32_t*,
                           const int32_t*, int64_t, float) {
  return false;
}
#else
namespace {

// Tiles: Q in chunks of 32 dims (0-3), scores, P and P.V (4, 5), B operands (6, 7).
constexpr int kRows = amx::kRows;  // query rows per task: a tile's rows
constexpr int kBlock = 32;         // keys per block: P's tile row holds 32 bf16
constexpr int kTileDwords = 256;

// Keys [0, L) of one kv head (rows rs elements apart) in the B layouts, padded with zeros to lpad (a multiple of
// kBlock) keys. kt: per 16 keys and 32 dims a tile, row r = dims (2r, 2r + 1) of the 16 keys. vt: per 32 keys and
// 16 dims a tile, row r = keys (2r, 2r + 1) of the 16 dims.
void to_tile_layout(uint32_t* kt, uint32_t* vt, const BFloat16* k, const BFloat16* v, int64_t rs, int64_t L,
                    int64_t lpad, int D) {
  const int kchunks = D / 32, vchunks = D / 16;
  for (int64_t k0 = 0; k0 < lpad; k0 += 16) {
    for (int dc = 0; dc < kchunks; ++dc) {
      __m512i rows[16];  // 16 keys' dims dc*32 .. dc*32+31 as 16 pairs each, then transposed
      for (int c = 0; c < 16; ++c) {
        rows[c] = k0 + c < L ? _mm512_loadu_si512(k + (k0 + c) * rs + dc * 32) : _mm512_setzero_si512();
      }
      amx::transpose16x16(rows);
      uint32_t* dst = kt + ((k0 / 16) * kchunks + dc) * kTileDwords;
      for (int r = 0; r < 16; ++r) _mm512_storeu_si512(dst + r * 16, rows[r]);
    }
  }
  const auto row16 = [&](int64_t key, int dv) {  // 16 dims of one key, widened to dwords
    if (key >= L) return _mm512_setzero_si512();
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + key * rs + dv * 16)));
  };
  for (int64_t key = 0; key < lpad; key += 2) {
    uint32_t* dst = vt + (key / kBlock) * vchunks * kTileDwords + (key % kBlock) / 2 * 16;
    for (int dv = 0; dv < vchunks; ++dv) {
      const __m512i pair = _mm512_or_si512(row16(key, dv), _mm512_slli_epi32(row16(key + 1, dv), 16));
      _mm512_storeu_si512(dst + dv * kTileDwords, pair);
    }
  }
}

// One thread's buffers for a task (64-byte aligned rows for the tile loads and stores).
template <int D>
struct alignas(64) TaskScratch {
  BFloat16 q[kRows][D];
  float s[kRows][kBlock];
  BFloat16 p[kRows][kBlock];
  float pv[kRows][16];
  float o[kRows][D];
  float l[kRows][16];  // per row, the sum of its probabilities in 16 lanes (added up at the end)
  float m[kRows], alpha[kRows];
};


// Online softmax of key block kb for row i, whose last visible key is `last`: scores from w.s, probabilities
// (rounded to bf16) into w.p, the rescale of its accumulator into w.alpha. A block the row cannot see at all
// leaves its state as it was (alpha 1, P row 0).
template <int D>
void softmax_row(TaskScratch<D>& w, int i, int64_t kb, int64_t last, float scale) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i key0 = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(kb * kBlock)));
  const __m512i key1 = _mm512_add_epi32(key0, _mm512_set1_epi32(16));
  const __m512i lim = _mm512_set1_epi32(static_cast<int>(last));
  if (kb * kBlock > last) {
    std::memset(w.p[i], 0, sizeof w.p[i]);
    w.alpha[i] = 1.f;
    return;
  }
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 s0 = _mm512_mul_ps(_mm512_load_ps(w.s[i]), _mm512_set1_ps(scale));
  __m512 s1 = _mm512_mul_ps(_mm512_load_ps(w.s[i] + 16), _mm512_set1_ps(scale));
  if (kb * kBlock + kBlock - 1 > last) {  // the block crosses the row's diagonal
    s0 = _mm512_mask_mov_ps(s0, _mm512_cmpgt_epi32_mask(key0, lim), ninf);
    s1 = _mm512_mask_mov_ps(s1, _mm512_cmpgt_epi32_mask(key1, lim), ninf);
  }
  const float mx = std::max(w.m[i], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
  const __m512 vmx = _mm512_set1_ps(mx);
  const __m512 p0 = exp16_nonpositive(_mm512_sub_ps(s0, vmx)), p1 = exp16_nonpositive(_mm512_sub_ps(s1, vmx));
  const float alpha = w.m[i] == mx ? 1.f : _mm512_cvtss_f32(exp16_nonpositive(_mm512_set1_ps(w.m[i] - mx)));
  _mm512_store_ps(w.l[i], _mm512_fmadd_ps(_mm512_load_ps(w.l[i]), _mm512_set1_ps(alpha), _mm512_add_ps(p0, p1)));
  w.m[i] = mx;
  w.alpha[i] = alpha;
  _mm512_store_si512(w.p[i], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
}

// S += Q K^T for 32 dims (chunk C, a literal: GCC's AMX intrinsics paste tile numbers into the instruction) of the
// two 16-key halves of key block kb.
#define CODELLAMA_QK_CHUNK(C)                                            \
  _tile_loadd(6, kt + ((2 * kb) * kchunks + (C)) * kTileDwords, 64);     \
  _tile_dpbf16ps(4, C, 6);                                               \
  _tile_loadd(7, kt + ((2 * kb + 1) * kchunks + (C)) * kTileDwords, 64); \
  _tile_dpbf16ps(5, C, 7)

// Rows [0, rows) of one head: q rows q_rs apart, the last visible key of row i is last[i] (non-decreasing); out rows
// out_rs apart. The tiles are configured.
template <int D>
void attend(BFloat16* out, int64_t out_rs, const BFloat16* q, int64_t q_rs, int rows, const int64_t* last,
            const uint32_t* kt, const uint32_t* vt, float scale, TaskScratch<D>& w) {
  constexpr int kchunks = D / 32, vchunks = D / 16;
  for (int i = 0; i < kRows; ++i) {
    if (i < rows) {
      std::memcpy(w.q[i], q + i * q_rs, D * sizeof(BFloat16));
    } else {
      std::memset(w.q[i], 0, sizeof w.q[i]);  // padding rows: finite scores, never stored
    }
    std::memset(w.o[i], 0, sizeof w.o[i]);
    w.m[i] = -INFINITY;
    std::memset(w.l[i], 0, sizeof w.l[i]);
  }
  _tile_loadd(0, &w.q[0][0], D * 2);
  _tile_loadd(1, &w.q[0][32], D * 2);
  if constexpr (D == 128) {
    _tile_loadd(2, &w.q[0][64], D * 2);
    _tile_loadd(3, &w.q[0][96], D * 2);
  }
  const int64_t blocks = last[rows - 1] / kBlock + 1;
  for (int64_t kb = 0; kb < blocks; ++kb) {
    _tile_zero(4);
    _tile_zero(5);
    CODELLAMA_QK_CHUNK(0);
    CODELLAMA_QK_CHUNK(1);
    if constexpr (D == 128) {
      CODELLAMA_QK_CHUNK(2);
      CODELLAMA_QK_CHUNK(3);
    }
    _tile_stored(4, &w.s[0][0], kBlock * 4);
    _tile_stored(5, &w.s[0][16], kBlock * 4);
    for (int i = 0; i < kRows; ++i) softmax_row(w, i, kb, last[std::min(i, rows - 1)], scale);
    _tile_loadd(4, &w.p[0][0], kBlock * 2);
    for (int dv = 0; dv < vchunks; ++dv) {
      _tile_zero(5);
      _tile_loadd(6, vt + (kb * vchunks + dv) * kTileDwords, 64);
      _tile_dpbf16ps(5, 4, 6);
      _tile_stored(5, &w.pv[0][0], 64);
      for (int i = 0; i < kRows; ++i) {
        float* o = w.o[i] + dv * 16;
        _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o), _mm512_set1_ps(w.alpha[i]), _mm512_load_ps(w.pv[i])));
      }
    }
  }
  for (int i = 0; i < rows; ++i) {
    const __m512 inv_l = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_load_ps(w.l[i])));
    for (int d = 0; d < D; d += 16) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_div_ps(_mm512_load_ps(w.o[i] + d), inv_l));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * out_rs + d), (__m256i)r);
    }
  }
}

#undef CODELLAMA_QK_CHUNK

template <int D>
void prefill(BFloat16* out, HeadsView q, int64_t tokens, int64_t q_heads, const KVCache& cache,
             const int32_t* cu_seqlens, const int32_t* start_pos, const int32_t* slots, int64_t batch, float scale) {
  const int64_t Hkv = cache.kv_heads, G = q_heads / Hkv, S = cache.capacity, rs = Hkv * D;
  const auto* qp = static_cast<const BFloat16*>(q.data);
  const auto* kc = static_cast<const BFloat16*>(cache.k);
  const auto* vc = static_cast<const BFloat16*>(cache.v);
  // sequences with keys: their token range, key count and offset in the tile-layout buffers
  struct Seq { int64_t b, t0, n, L, lpad, buf; };
  std::vector<Seq> seqs;
  std::vector<char> covered(tokens, 0);
  int64_t buf = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t t0 = std::max<int64_t>(cu_seqlens[b], 0), t1 = std::min<int64_t>(cu_seqlens[b + 1], tokens);
    if (t1 <= t0) continue;
    std::fill(covered.begin() + t0, covered.begin() + t1, 1);
    if (slots[b] < 0 || slots[b] >= cache.batch || start_pos[b] < 0) {
      for (int64_t t = t0; t < t1; ++t) std::memset(out + t * q_heads * D, 0, q_heads * D * sizeof(BFloat16));
      continue;
    }
    const int64_t L = std::min<int64_t>(start_pos[b] + (t1 - t0), S), lpad = (L + kBlock - 1) / kBlock * kBlock;
    seqs.push_back({b, t0, t1 - t0, L, lpad, buf});
    buf += Hkv * lpad * D / 2;  // dwords of one of the two layouts
  }
  for (int64_t t = 0; t < tokens; ++t) {
    if (!covered[t]) std::memset(out + t * q_heads * D, 0, q_heads * D * sizeof(BFloat16));
  }
  std::vector<uint32_t> kt(buf), vt(buf);
  const int64_t pairs = static_cast<int64_t>(seqs.size()) * Hkv;
  parallel_for(pairs, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Seq& sq = seqs[i / Hkv];
      const int64_t kvh = i % Hkv, off = sq.buf + kvh * sq.lpad * D / 2, base = slots[sq.b] * S * rs + kvh * D;
      to_tile_layout(kt.data() + off, vt.data() + off, kc + base, vc + base, rs, sq.L, sq.lpad, D);
    }
  });
  // tasks: 16 rows of one head of one sequence
  struct Task { int64_t seq, h, r0; };
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s) {
    for (int64_t h = 0; h < q_heads; ++h) {
      for (int64_t r0 = 0; r0 < seqs[s].n; r0 += kRows) tasks.push_back({s, h, r0});
    }
  }
  const int64_t n = static_cast<int64_t>(tasks.size());
  parallel_for(n, 1, [&](int64_t i0, int64_t i1) {
    amx::configure_tiles();
    auto w = std::make_unique<TaskScratch<D>>();
    int64_t last[kRows];
    for (int64_t ii = i0; ii < i1; ++ii) {
      // interleave short (early) and long (late) causal rows so each thread's contiguous range costs the same
      const Task& task = tasks[ii % 2 == 0 ? ii / 2 : n - 1 - ii / 2];
      const Seq& sq = seqs[task.seq];
      const int rows = static_cast<int>(std::min<int64_t>(kRows, sq.n - task.r0));
      for (int r = 0; r < rows; ++r) last[r] = std::min<int64_t>(start_pos[sq.b] + task.r0 + r, S - 1);
      const int64_t t = sq.t0 + task.r0, off = sq.buf + (task.h / G) * sq.lpad * D / 2;
      attend<D>(out + t * q_heads * D + task.h * D, q_heads * D, qp + t * q.row_stride + task.h * q.head_stride,
                q.row_stride, rows, last, kt.data() + off, vt.data() + off, scale, *w);
    }
    _tile_release();
  });
}

}  // namespace

bool attention_prefill_amx(void* out, HeadsView q, int64_t tokens, int64_t q_heads, const KVCache& cache,
                           const int32_t* cu_seqlens, const int32_t* start_pos, const int32_t* slots, int64_t batch,
                           float scale) {
  const int64_t D = cache.head_dim;
  if ((D != 64 && D != 128) || !amx::available(amx::Kind::kBF16)) return false;
  auto* o = static_cast<BFloat16*>(out);
  if (D == 64) {
    prefill<64>(o, q, tokens, q_heads, cache, cu_seqlens, start_pos, slots, batch, scale);
  } else {
    prefill<128>(o, q, tokens, q_heads, cache, cu_seqlens, start_pos, slots, batch, scale);
  }
  return true;
}
#endif

}  // namespace codellama::cpu
