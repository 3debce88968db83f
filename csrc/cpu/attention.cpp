// out = round(sum_j round(exp(s_j - m)) v_j / sum_j exp(s_j - m)), s_j = q.k_j * scale in fp32, online over key
// chunks. One task = a block of up to 16 query tokens of a sequence (decode: one sequence) x one kv head, with
// all Hq/Hkv query heads of that kv group: each K/V row is loaded once per task for all its queries.
// Dot products and P.v with 8-wide vectors.
#include "codellama/attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace codellama::cpu {
namespace {

constexpr int64_t kKeyChunk = 64;
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kRowBlock = 16;  // prefill query rows per task: each K/V row is loaded once for all of them
constexpr int64_t kPrefetchRows = 8;  // K/V rows are a page apart (stride Hkv * D): prefetch ahead of use

template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b);
}

// Scratch of one task: its query vectors in fp32, accumulators, chunk scores, running max and sum.
struct Scratch {
  std::vector<float> q, acc, s, m, l;
  std::vector<int64_t> keys;
  void resize(int64_t nq, int64_t d) {
    q.resize(nq * d); acc.resize(nq * d); s.resize(nq * kKeyChunk); m.resize(nq); l.resize(nq);
  }
};

// Attends M query rows x G heads of one kv group: query (r, g) at q + r * q_rs + g * q_hs sees keys
// 0 .. nkeys[r]-1 at k / v + j * kv_stride (nkeys[r] >= 1) and writes out + r * o_rs + g * o_hs.
// D a multiple of 8, at most kMaxHeadDim.
template <typename T>
void attend(const T* q, int64_t q_rs, int64_t q_hs, int64_t M, int64_t G, const int64_t* nkeys, const T* k,
            const T* v, int64_t kv_stride, int64_t D, float scale, T* out, int64_t o_rs, int64_t o_hs, Scratch& sc) {
  const int64_t nv = D / 8, nq = M * G;
  sc.resize(nq, D);
  int64_t max_keys = 0;
  for (int64_t r = 0; r < M; ++r) max_keys = std::max(max_keys, nkeys[r]);
  sc.keys.resize(nq);
  int64_t* row_keys = sc.keys.data();  // keys seen by query i (no division in the inner loops)
  for (int64_t i = 0; i < nq; ++i) {
    row_keys[i] = nkeys[i / G];
    const T* qi = q + (i / G) * q_rs + (i % G) * q_hs;
    for (int64_t c = 0; c < nv; ++c) store8(sc.q.data() + i * D + 8 * c, load8(qi + 8 * c));
    std::fill(sc.acc.begin() + i * D, sc.acc.begin() + (i + 1) * D, 0.f);
    sc.m[i] = -std::numeric_limits<float>::infinity();
    sc.l[i] = 0.f;
  }
  vec8 row[kMaxHeadDim / 8];
  for (int64_t j0 = 0; j0 < max_keys; j0 += kKeyChunk) {
    const int64_t n = std::min(kKeyChunk, max_keys - j0);
    for (int64_t j = 0; j < n; ++j) {  // scores s[i][j] = q_i . k_j * scale, -inf past the query's keys
      const T* kr = k + (j0 + j) * kv_stride;
      if (j0 + j + kPrefetchRows < max_keys) prefetch_row(kr + kPrefetchRows * kv_stride, D);
      for (int64_t c = 0; c < nv; ++c) row[c] = load8(kr + 8 * c);
      for (int64_t i = 0; i < nq; ++i) {
        if (j0 + j >= row_keys[i]) { sc.s[i * kKeyChunk + j] = -std::numeric_limits<float>::infinity(); continue; }
        const float* qi = sc.q.data() + i * D;
        vec8 a0 = zero8(), a1 = zero8();
        int64_t c = 0;
        for (; c + 2 <= nv; c += 2) {
          a0 = fmadd(load8(qi + 8 * c), row[c], a0);
          a1 = fmadd(load8(qi + 8 * c + 8), row[c + 1], a1);
        }
        if (c < nv) a0 = fmadd(load8(qi + 8 * c), row[c], a0);
        sc.s[i * kKeyChunk + j] = hsum(add(a0, a1)) * scale;
      }
    }
    for (int64_t i = 0; i < nq; ++i) {  // online softmax: new max, rescale, p rounded to T
      const int64_t ni = std::min(n, row_keys[i] - j0);
      if (ni <= 0) continue;
      float* s = sc.s.data() + i * kKeyChunk;
      float mx = sc.m[i];
      for (int64_t j = 0; j < ni; ++j) mx = std::max(mx, s[j]);
      const float alpha = std::exp(sc.m[i] - mx);
      float sum = 0.f;
      for (int64_t j = 0; j < ni; ++j) {
        const float p = std::exp(s[j] - mx);
        sum += p;
        s[j] = round_to<T>(p);
      }
      sc.l[i] = sc.l[i] * alpha + sum;
      sc.m[i] = mx;
      if (alpha != 1.f) {
        float* acc = sc.acc.data() + i * D;
        const vec8 va = set1(alpha);
        for (int64_t c = 0; c < nv; ++c) store8(acc + 8 * c, mul(load8(acc + 8 * c), va));
      }
    }
    for (int64_t j = 0; j < n; ++j) {  // acc[i] += p[i][j] * v_j for the queries that see key j
      const T* vr = v + (j0 + j) * kv_stride;
      if (j0 + j + kPrefetchRows < max_keys) prefetch_row(vr + kPrefetchRows * kv_stride, D);
      for (int64_t c = 0; c < nv; ++c) row[c] = load8(vr + 8 * c);
      for (int64_t i = 0; i < nq; ++i) {
        if (j0 + j >= row_keys[i]) continue;
        float* acc = sc.acc.data() + i * D;
        const vec8 p = set1(sc.s[i * kKeyChunk + j]);
        for (int64_t c = 0; c < nv; ++c) store8(acc + 8 * c, fmadd(p, row[c], load8(acc + 8 * c)));
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float* acc = sc.acc.data() + i * D;
    const vec8 inv = set1(sc.l[i] > 0.f ? 1.f / sc.l[i] : 0.f);
    T* o = out + (i / G) * o_rs + (i % G) * o_hs;
    for (int64_t c = 0; c < nv; ++c) store8(o + 8 * c, mul(load8(acc + 8 * c), inv));
  }
}

template <typename T>
void zero_heads(T* out, int64_t G, int64_t D) {
  for (int64_t i = 0; i < G * D; ++i) out[i] = from_float<T>(0.f);
}

}  // namespace

void kv_cache_append(DType dt, const KVCache& cache, HeadsView k, HeadsView v, const int32_t* slots,
                     const int32_t* positions, int64_t tokens) {
  const int64_t H = cache.kv_heads, D = cache.head_dim;
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "kv_cache_append", {
    auto* kc = static_cast<scalar_t*>(cache.k);
    auto* vc = static_cast<scalar_t*>(cache.v);
    const auto* kp = static_cast<const scalar_t*>(k.data);
    const auto* vp = static_cast<const scalar_t*>(v.data);
    parallel_for(tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * D, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t slot = slots[t], pos = positions[t];
        if (slot < 0 || slot >= cache.batch || pos < 0 || pos >= cache.capacity) continue;
        const int64_t base = (slot * cache.capacity + pos) * H * D;
        for (int64_t h = 0; h < H; ++h) {
          std::memcpy(kc + base + h * D, kp + t * k.row_stride + h * k.head_stride, D * sizeof(scalar_t));
          std::memcpy(vc + base + h * D, vp + t * v.row_stride + h * v.head_stride, D * sizeof(scalar_t));
        }
      }
    });
  });
}

void attention_prefill(DType dt, void* out, HeadsView q, int64_t tokens, int64_t q_heads, const KVCache& cache,
                       const int32_t* cu_seqlens, const int32_t* start_pos, const int32_t* slots, int64_t batch,
                       float scale) {
  const int64_t Hkv = cache.kv_heads, D = cache.head_dim, G = q_heads / Hkv, S = cache.capacity;
  // tasks: blocks of up to kRowBlock consecutive tokens of one sequence, times kv heads
  struct Block { int64_t b, t0, rows; };
  std::vector<Block> blocks;
  std::vector<char> covered(tokens, 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t t_begin = std::max<int64_t>(cu_seqlens[b], 0), t_end = std::min<int64_t>(cu_seqlens[b + 1], tokens);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kRowBlock) {
      blocks.push_back({b, t0, std::min(kRowBlock, t_end - t0)});
      for (int64_t t = t0; t < t0 + blocks.back().rows; ++t) covered[t] = 1;
    }
  }
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "attention_prefill", {
    auto* o = static_cast<scalar_t*>(out);
    const auto* qp = static_cast<const scalar_t*>(q.data);
    const auto* kc = static_cast<const scalar_t*>(cache.k);
    const auto* vc = static_cast<const scalar_t*>(cache.v);
    for (int64_t t = 0; t < tokens; ++t) {
      if (!covered[t]) zero_heads(o + t * q_heads * D, q_heads, D);  // tokens outside every sequence
    }
    const int64_t n = static_cast<int64_t>(blocks.size()) * Hkv;
    parallel_for(n, 1, [&](int64_t i0, int64_t i1) {
      Scratch sc;
      int64_t nkeys[kRowBlock];
      for (int64_t ii = i0; ii < i1; ++ii) {
        // interleave short (early) and long (late) causal blocks so each thread's contiguous range costs the same
        const int64_t i = ii % 2 == 0 ? ii / 2 : n - 1 - ii / 2;
        const Block& blk = blocks[i / Hkv];
        const int64_t kvh = i % Hkv, b = blk.b, slot = slots[b];
        scalar_t* ob = o + (blk.t0 * q_heads + kvh * G) * D;
        if (slot < 0 || slot >= cache.batch || start_pos[b] < 0) {
          for (int64_t r = 0; r < blk.rows; ++r) zero_heads(ob + r * q_heads * D, G, D);
          continue;
        }
        for (int64_t r = 0; r < blk.rows; ++r) {
          nkeys[r] = std::min<int64_t>(start_pos[b] + (blk.t0 + r - cu_seqlens[b]) + 1, S);
        }
        const int64_t off = slot * S * Hkv * D + kvh * D;
        attend(qp + blk.t0 * q.row_stride + kvh * G * q.head_stride, q.row_stride, q.head_stride, blk.rows, G, nkeys,
               kc + off, vc + off, Hkv * D, D, scale, ob, q_heads * D, D, sc);
      }
    });
  });
}

void attention_decode(DType dt, void* out, HeadsView q, int64_t batch, int64_t q_heads, const KVCache& cache,
                      const int32_t* slots, const int32_t* seq_lens, float scale) {
  const int64_t Hkv = cache.kv_heads, D = cache.head_dim, G = q_heads / Hkv, S = cache.capacity;
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "attention_decode", {
    auto* o = static_cast<scalar_t*>(out);
    const auto* qp = static_cast<const scalar_t*>(q.data);
    const auto* kc = static_cast<const scalar_t*>(cache.k);
    const auto* vc = static_cast<const scalar_t*>(cache.v);
    parallel_for(batch * Hkv, 1, [&](int64_t i0, int64_t i1) {
      Scratch sc;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, kvh = i % Hkv;
        scalar_t* ob = o + (b * q_heads + kvh * G) * D;
        const int64_t slot = slots[b];
        const int64_t nkeys = std::min<int64_t>(seq_lens[b], S);
        if (slot < 0 || slot >= cache.batch || nkeys <= 0) { zero_heads(ob, G, D); continue; }
        const int64_t off = slot * S * Hkv * D + kvh * D;
        attend(qp + b * q.row_stride + kvh * G * q.head_stride, 0, q.head_stride, 1, G, &nkeys, kc + off, vc + off,
               Hkv * D, D, scale, ob, 0, D, sc);
      }
    });
  });
}

}  // namespace codellama::cpu
