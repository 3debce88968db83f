// out = round(sum_j round(exp(s_j - m)) v_j / sum_j exp(s_j - m)), s_j = q.k_j * scale in fp32, online over key
// chunks (GroupAttention: one kv head with all its Hq/Hkv query heads, for a block of query rows; each K/V row is
// loaded and converted to fp32 once for all those queries; a lone query reads them in place. LaneGroupAttention:
// the same for groups of 8k heads, vectorised across the heads). Prefill: one task = 16-64 query tokens of a
// sequence x one kv head. Decode: one task = a block of kv heads of one sequence, fed key chunks in step. Scores
// and P.v are small register-blocked matrix products; exp is 8-wide.
#include "codellama/attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "attention_amx.h"
#include "vec.h"

namespace codellama::cpu {
namespace {

constexpr int64_t kKeyChunk = 64;
// Prefill: a task takes enough consecutive query rows that its queries (rows x G heads) number at least
// kTaskQueries, at least kMinRowBlock rows: each K/V row is loaded and converted once for all of them.
// Measured at T=2048: 16 rows x 8 heads (1.1B-shaped GQA) and 64 rows x 1 head (7B) both beat 16 x 1 (7B:
// 520 vs 864 ms per layer).
constexpr int64_t kTaskQueries = 64;
constexpr int64_t kMinRowBlock = 16;
constexpr int64_t kMaxRowBlock = kTaskQueries;
constexpr int64_t kPrefetchRows = 8;  // K/V rows are a page apart (stride Hkv * D): prefetch ahead (0-32 measured)

// Scratch of one key chunk, shared by the kv heads a task walks: scores / probabilities of its queries, and the
// chunk's K and V rows in fp32 (converted once, read by every query of the kv group).
struct ChunkScratch {
  std::vector<float> s, kf, vf;
  void resize(int64_t nq, int64_t d) {
    s.resize(nq * kKeyChunk); kf.resize(kKeyChunk * d); vf.resize(kKeyChunk * d);
  }
};

// Rows j0 .. j0+n-1 of a cache head (row stride `stride`) -> dst [n, D] fp32, prefetching kPrefetchRows ahead
// (measured: 1.16x the time for decode when the whole next chunk was prefetched at once instead).
template <typename T>
void load_chunk(const T* src, int64_t stride, int64_t j0, int64_t n, int64_t max_keys, int64_t D, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const T* r = src + (j0 + j) * stride;
    if (j0 + j + kPrefetchRows < max_keys) {
      const char* ahead = reinterpret_cast<const char*>(r + kPrefetchRows * stride);
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) prefetch(ahead + b);
    }
    for (int64_t c = 0; c < D; c += 8) store8(dst + j * D + c, load8(r + c));
  }
}

// Prefetches rows j .. j + count - 1 (those below avail) of a cache head, D elements each.
template <typename T>
inline void prefetch_rows(const T* base, int64_t stride, int64_t j, int64_t count, int64_t avail, int64_t D) {
  for (int64_t t = j; t < std::min(j + count, avail); ++t) {
    const char* r = reinterpret_cast<const char*>(base + t * stride);
    for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) prefetch(r + b);
  }
}
// s[r][j] = (q_r . k_j) * scale for R queries (rows of q, stride D) and keys j < n (rows of kf, stride k_stride:
// fp32 scratch with avail = 0, or the cache itself, whose rows below `avail` are prefetched kPrefetchRows ahead):
// R queries x 4 keys per step, each K vector loaded once for the R queries, sums reduced 4 keys at
// a time. The last step pads with copies of key n-1 (scores never read): every key goes through the same
// reduction, so a query's scores do not depend on the chunk's length.
template <int R, typename K>
void scores(const float* q, const K* kf, int64_t k_stride, int64_t n, int64_t avail, int64_t D, float scale,
            float* s) {
  for (int64_t j = 0; j < n; j += 4) {
    const K* kr[4];
    for (int t = 0; t < 4; ++t) kr[t] = kf + std::min(j + t, n - 1) * k_stride;
    prefetch_rows(kf, k_stride, j + kPrefetchRows, 4, avail, D);
    vec8 a[R][4];
    for (auto& row : a) for (auto& v : row) v = zero8();
    for (int64_t c = 0; c < D; c += 8) {
      vec8 kv[4];
      for (int t = 0; t < 4; ++t) kv[t] = load8(kr[t] + c);
      for (int r = 0; r < R; ++r) {
        const vec8 qv = load8(q + r * D + c);
        for (int t = 0; t < 4; ++t) a[r][t] = fmadd(qv, kv[t], a[r][t]);
      }
    }
    for (int r = 0; r < R; ++r) hsum4(a[r][0], a[r][1], a[r][2], a[r][3], scale, s + r * kKeyChunk + j);
  }
}

// acc[r][c .. c + 8C) += sum_{j < n} p[r][j] * v_j[c .. c + 8C) for R queries (p[r][j] at p[r * PR + j * PJ]; v_j:
// rows of vf, stride v_stride; scratch or cache as in scores): the R x C accumulators stay in registers over the
// whole chunk, each V vector is loaded once for the R queries.
template <int R, int C, int64_t PR, int64_t PJ, typename V>
void weighted_columns(const float* p, const V* vf, int64_t v_stride, int64_t n, int64_t avail, int64_t D, float* acc,
                      int64_t c) {
  vec8 o[R][C];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < C; ++u) o[r][u] = load8(acc + r * D + c + 8 * u);
  for (int64_t j = 0; j < n; ++j) {
    if (c == 0) prefetch_rows(vf, v_stride, j + kPrefetchRows, 1, avail, D);
    vec8 v[C];
    for (int u = 0; u < C; ++u) v[u] = load8(vf + j * v_stride + c + 8 * u);
    for (int r = 0; r < R; ++r) {
      const vec8 pr = set1(p[r * PR + j * PJ]);
      for (int u = 0; u < C; ++u) o[r][u] = fmadd(pr, v[u], o[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < C; ++u) store8(acc + r * D + c + 8 * u, o[r][u]);
}

// acc[r] += sum_{j < n} p[r][j] * v_j for R queries, 16 columns at a time (then 8 when D = 16k + 8). p[r][j] at
// p[r * PR + j * PJ]: scores in rows per query (GroupAttention) or in rows per key (LaneGroupAttention).
template <int R, int64_t PR = kKeyChunk, int64_t PJ = 1, typename V>
void weighted_values(const float* p, const V* vf, int64_t v_stride, int64_t n, int64_t avail, int64_t D, float* acc) {
  int64_t c = 0;
  for (; c + 16 <= D; c += 16) weighted_columns<R, 2, PR, PJ>(p, vf, v_stride, n, avail, D, acc, c);
  if (c < D) weighted_columns<R, 1, PR, PJ>(p, vf, v_stride, n, avail, D, acc, c);
}

// Online-softmax update of one query over its first ni keys of the chunk (s: its scores, n entries): new
// running max m and sum l, acc rescaled, s overwritten by p_j = exp(s_j - m) rounded to T, 0 for j >= ni
// (keys the query does not see), so P.v can run over the whole chunk.
template <typename T>
void softmax_update(float* s, int64_t ni, int64_t n, float& m, float& l, float* acc, int64_t D) {
  if (ni <= 0) { std::fill(s, s + n, 0.f); return; }
  float mx = m;
  for (int64_t j = 0; j < ni; ++j) mx = std::max(mx, s[j]);
  const float alpha = std::exp(m - mx);
  const vec8 vmx = set1(mx);
  vec8 vsum = zero8();
  int64_t j = 0;
  for (; j + 8 <= ni; j += 8) {
    const vec8 p = exp8_nonpositive(sub(load8(s + j), vmx));
    vsum = add(vsum, p);
    store8(s + j, round_through<T>(p));
  }
  float sum = hsum(vsum);
  for (; j < ni; ++j) {
    const float p = std::exp(s[j] - mx);
    sum += p;
    s[j] = round_to<T>(p);
  }
  std::fill(s + ni, s + n, 0.f);
  l = l * alpha + sum;
  m = mx;
  if (alpha != 1.f) {
    const vec8 va = set1(alpha);
    for (int64_t c = 0; c < D; c += 8) store8(acc + c, mul(load8(acc + c), va));
  }
}

// Flash-style attention of M query rows x G heads of one kv group, fed one key chunk at a time: query (r, g) at
// q + r * q_rs + g * q_hs sees keys 0 .. nkeys[r]-1 (nkeys[r] >= 1). D a multiple of 8. Per chunk: K and V
// rows to fp32 scratch, scores of all queries (2 at a time), softmax, P.v (4 queries at a time). A single query
// (decode with one query head per kv head: 7B, 13B) reads K and V straight from the cache instead, converting
// each element in registers: the same sums in the same order, 1.5-1.6x faster at 4096-16384 keys (7B shapes,
// benchmarks/RESULTS.md, session 14), where the scratch's stores and reloads cost more than they saved.
template <typename T>
class GroupAttention {
 public:
  void begin(const T* q, int64_t q_rs, int64_t q_hs, int64_t M, int64_t G, const int64_t* nkeys, int64_t D) {
    nq_ = M * G, G_ = G, D_ = D, max_keys_ = 0;
    q_.resize(nq_ * D); acc_.assign(nq_ * D, 0.f);
    m_.assign(nq_, -std::numeric_limits<float>::infinity()); l_.assign(nq_, 0.f); keys_.resize(nq_);
    for (int64_t r = 0; r < M; ++r) max_keys_ = std::max(max_keys_, nkeys[r]);
    for (int64_t i = 0; i < nq_; ++i) {
      keys_[i] = nkeys[i / G];  // keys seen by query i (no division in the inner loops)
      const T* qi = q + (i / G) * q_rs + (i % G) * q_hs;
      for (int64_t c = 0; c < D; c += 8) store8(q_.data() + i * D + c, load8(qi + c));
    }
  }
  int64_t max_keys() const { return max_keys_; }
  // Keys j0 .. j0 + kKeyChunk - 1 (up to max_keys): rows of k / v at k + j * kv_stride.
  void chunk(const T* k, const T* v, int64_t kv_stride, int64_t j0, float scale, ChunkScratch& cs) {
    const int64_t n = std::min(kKeyChunk, max_keys_ - j0), D = D_;
    cs.resize(nq_, D);
    float* const s = cs.s.data();
    float* const acc = acc_.data();
    if (nq_ == 1) {  // straight from the cache, prefetched kPrefetchRows ahead
      const T* kr = k + j0 * kv_stride;
      const T* vr = v + j0 * kv_stride;
      const int64_t avail = max_keys_ - j0;
      scores<1>(q_.data(), kr, kv_stride, n, avail, D, scale, s);
      softmax_update<T>(s, std::min(n, keys_[0] - j0), n, m_[0], l_[0], acc, D);
      weighted_values<1>(s, vr, kv_stride, n, avail, D, acc);
      return;
    }
    load_chunk(k, kv_stride, j0, n, max_keys_, D, cs.kf.data());
    load_chunk(v, kv_stride, j0, n, max_keys_, D, cs.vf.data());
    const float* kf = cs.kf.data();
    const float* vf = cs.vf.data();
    int64_t i = 0;
    for (; i + 2 <= nq_; i += 2) scores<2>(q_.data() + i * D, kf, D, n, 0, D, scale, s + i * kKeyChunk);
    if (i < nq_) scores<1>(q_.data() + i * D, kf, D, n, 0, D, scale, s + i * kKeyChunk);
    for (i = 0; i < nq_; ++i) {
      softmax_update<T>(s + i * kKeyChunk, std::min(n, keys_[i] - j0), n, m_[i], l_[i], acc + i * D, D);
    }
    for (i = 0; i + 4 <= nq_; i += 4) weighted_values<4>(s + i * kKeyChunk, vf, D, n, 0, D, acc + i * D);
    for (; i < nq_; ++i) weighted_values<1>(s + i * kKeyChunk, vf, D, n, 0, D, acc + i * D);
  }
  // Writes query (r, g) to out + r * o_rs + g * o_hs.
  void end(T* out, int64_t o_rs, int64_t o_hs) const {
    for (int64_t i = 0; i < nq_; ++i) {
      const float* a = acc_.data() + i * D_;
      const vec8 inv = set1(l_[i] > 0.f ? 1.f / l_[i] : 0.f);
      T* o = out + (i / G_) * o_rs + (i % G_) * o_hs;
      for (int64_t c = 0; c < D_; c += 8) store8(o + c, mul(load8(a + c), inv));
    }
  }

 private:
  int64_t nq_ = 0, G_ = 1, D_ = 0, max_keys_ = 0;
  std::vector<float> q_, acc_, m_, l_;
  std::vector<int64_t> keys_;
};

// The same attention for a kv group of G = 8k query heads (every GQA CodeLlama: 34B, 70B have 8 per kv head),
// vectorised across the group instead of along D: a lane block is the 8 heads g0 .. g0+7 of one query row, and
// each of its scores and softmax statistics is one 8-wide vector (lane = head): q is held transposed ([D][8]) and
// K elements are broadcast from the fp32 chunk, so the dot products are plain FMA chains over c (no horizontal
// sums) and the softmax max / exp / sum are elementwise. P.v is GroupAttention's (4 heads x 16 columns in
// registers, V rows straight from the cache, converted in registers: the same sums, 1.08-1.21x faster per call
// than broadcasting each V element from an fp32 chunk as the scores do). The scores' sums run in another order than
// GroupAttention's (c sequential per lane, not 8 partial sums), within the same precision order. Measured against
// GroupAttention, benchmarks/RESULTS.md, session 15.
template <typename T>
class LaneGroupAttention {
 public:
  void begin(const T* q, int64_t q_rs, int64_t q_hs, int64_t M, int64_t G, const int64_t* nkeys, int64_t D) {
    nb_ = M * G / 8, G_ = G, D_ = D, max_keys_ = 0;
    qt_.resize(nb_ * D * 8); acc_.assign(nb_ * 8 * D, 0.f); keys_.resize(nb_);
    m_.assign(nb_ * 8, -std::numeric_limits<float>::infinity()); l_.assign(nb_ * 8, 0.f);
    for (int64_t b = 0; b < nb_; ++b) {
      const int64_t r = b / (G / 8), g0 = b % (G / 8) * 8;
      keys_[b] = nkeys[r];
      max_keys_ = std::max(max_keys_, nkeys[r]);
      for (int64_t g = 0; g < 8; ++g) {
        const T* qi = q + r * q_rs + (g0 + g) * q_hs;
        for (int64_t c = 0; c < D; ++c) qt_[(b * D + c) * 8 + g] = to_float(qi[c]);
      }
    }
  }
  int64_t max_keys() const { return max_keys_; }
  // Keys j0 .. j0 + kKeyChunk - 1 (up to max_keys): rows of k / v at k + j * kv_stride.
  void chunk(const T* k, const T* v, int64_t kv_stride, int64_t j0, float scale, ChunkScratch& cs) {
    const int64_t n = std::min(kKeyChunk, max_keys_ - j0), D = D_;
    cs.resize(nb_ * 8, D);
    load_chunk(k, kv_stride, j0, n, max_keys_, D, cs.kf.data());
    float* const s = cs.s.data();  // [kKeyChunk][8], one lane block at a time
    // The first lane block's scores prefetch the chunk's V rows, spread over its compute (a burst of prefetches at
    // the chunk's start measured slower, session 7).
    Rows ahead{v + j0 * kv_stride, kv_stride, n};
    const T* vr = v + j0 * kv_stride;
    for (int64_t b = 0; b < nb_; ++b) {
      const int64_t ni = std::min(n, keys_[b] - j0);
      if (ni <= 0) continue;  // a causal row that sees none of the chunk: nothing to add
      float* const acc = acc_.data() + b * 8 * D;
      lane_scores(qt_.data() + b * D * 8, cs.kf.data(), ni, D, scale, s, ahead);
      lane_softmax_update(s, ni, m_.data() + b * 8, l_.data() + b * 8, acc, D);
      weighted_values<4, 1, 8>(s, vr, kv_stride, ni, 0, D, acc);
      weighted_values<4, 1, 8>(s + 4, vr, kv_stride, ni, 0, D, acc + 4 * D);
      ahead.avail = 0;
    }
  }
  // Writes query (r, g) to out + r * o_rs + g * o_hs.
  void end(T* out, int64_t o_rs, int64_t o_hs) const {
    float inv[8];
    for (int64_t b = 0; b < nb_; ++b) {
      const float* l = l_.data() + b * 8;
      for (int g = 0; g < 8; ++g) inv[g] = l[g] > 0.f ? 1.f / l[g] : 0.f;
      const int64_t r = b / (G_ / 8), g0 = b % (G_ / 8) * 8;
      const float* a = acc_.data() + b * 8 * D_;
      for (int64_t g = 0; g < 8; ++g) {
        T* o = out + r * o_rs + (g0 + g) * o_hs;
        const vec8 vi = set1(inv[g]);
        for (int64_t c = 0; c < D_; c += 8) store8(o + c, mul(load8(a + g * D_ + c), vi));
      }
    }
  }

 private:
  struct Rows { const T* base; int64_t stride, avail; };  // cache rows to prefetch, those below avail

  // s[j] = (q . k_j) * scale for the block's 8 heads, keys j < n (rows of kf, stride D), 8 keys at a time; the
  // last step pads with copies of key n-1 (written past n, never read). Prefetches rows j .. j+7 of `ahead`.
  static void lane_scores(const float* qt, const float* kf, int64_t n, int64_t D, float scale, float* s,
                          const Rows& ahead) {
    for (int64_t j = 0; j < n; j += 8) {
      prefetch_rows(ahead.base, ahead.stride, j, 8, ahead.avail, D);
      const float* kr[8];
      for (int t = 0; t < 8; ++t) kr[t] = kf + std::min(j + t, n - 1) * D;
      vec8 a[8];
      for (auto& x : a) x = zero8();
      for (int64_t c = 0; c < D; ++c) {
        const vec8 qc = load8(qt + c * 8);
        for (int t = 0; t < 8; ++t) a[t] = fmadd(qc, set1(kr[t][c]), a[t]);
      }
      const vec8 vs = set1(scale);
      for (int t = 0; t < 8; ++t) store8(s + (j + t) * 8, mul(a[t], vs));
    }
  }
  // Online softmax over keys j < n of each lane; s[j] becomes p_j = exp(s_j - m) rounded to T.
  // m, l: the 8 lanes' running max and sum; acc: the 8 heads' accumulators [8][D], rescaled.
  static void lane_softmax_update(float* s, int64_t n, float* m, float* l, float* acc, int64_t D) {
    vec8 mx = load8(m);
    for (int64_t j = 0; j < n; ++j) mx = vmax(mx, load8(s + j * 8));
    const vec8 alpha = exp8_nonpositive(sub(load8(m), mx));
    vec8 sum = zero8();
    for (int64_t j = 0; j < n; ++j) {
      const vec8 p = exp8_nonpositive(sub(load8(s + j * 8), mx));
      sum = add(sum, p);
      store8(s + j * 8, round_through<T>(p));
    }
    store8(l, fmadd(load8(l), alpha, sum));
    store8(m, mx);
    float a[8];
    store8(a, alpha);
    for (int g = 0; g < 8; ++g) {
      const vec8 ag = set1(a[g]);
      for (int64_t c = 0; c < D; c += 8) store8(acc + g * D + c, mul(load8(acc + g * D + c), ag));
    }
  }
  int64_t nb_ = 0, G_ = 8, D_ = 0, max_keys_ = 0;
  std::vector<float> qt_, acc_, m_, l_;
  std::vector<int64_t> keys_;
};

// Calls fn with a default-constructed kernel object for kv groups of G query heads (LaneGroupAttention when G is
// a multiple of 8).
template <typename T, typename F>
void with_group_kernel(int64_t G, const F& fn) {
  if (G % 8 == 0) fn(LaneGroupAttention<T>{});
  else fn(GroupAttention<T>{});
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
  if (dt == DType::kBFloat16 &&
      attention_prefill_amx(out, q, tokens, q_heads, cache, cu_seqlens, start_pos, slots, batch, scale)) {
    return;  // on AMX tiles (attention_amx.cpp)
  }
  const int64_t Hkv = cache.kv_heads, D = cache.head_dim, G = q_heads / Hkv, S = cache.capacity;
  // tasks: blocks of up to row_block consecutive tokens of one sequence, times kv heads
  const int64_t row_block = std::clamp(kTaskQueries / std::max<int64_t>(G, 1), kMinRowBlock, kMaxRowBlock);
  struct Block { int64_t b, t0, rows; };
  std::vector<Block> blocks;
  std::vector<char> covered(tokens, 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t t_begin = std::max<int64_t>(cu_seqlens[b], 0), t_end = std::min<int64_t>(cu_seqlens[b + 1], tokens);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += row_block) {
      blocks.push_back({b, t0, std::min(row_block, t_end - t0)});
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
    with_group_kernel<scalar_t>(G, [&](auto kind) {
    parallel_for(n, 1, [&](int64_t i0, int64_t i1) {
      decltype(kind) ga;
      ChunkScratch cs;
      int64_t nkeys[kMaxRowBlock];
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
        ga.begin(qp + blk.t0 * q.row_stride + kvh * G * q.head_stride, q.row_stride, q.head_stride, blk.rows, G,
                 nkeys, D);
        for (int64_t j0 = 0; j0 < ga.max_keys(); j0 += kKeyChunk) ga.chunk(kc + off, vc + off, Hkv * D, j0, scale, cs);
        ga.end(ob, q_heads * D, D);
      }
    });
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
    // A task = hb kv heads of one sequence, walked chunk by chunk: all hb heads take a chunk of keys before the
    // next, so a thread reads hb * D contiguous elements of every cache row instead of D-element slices a page
    // apart, one head after another.
    const int64_t hb = std::clamp<int64_t>((batch * Hkv + max_threads() - 1) / max_threads(), 1, Hkv);
    const int64_t blocks = (Hkv + hb - 1) / hb;
    with_group_kernel<scalar_t>(G, [&](auto kind) {
    parallel_for(batch * blocks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<decltype(kind)> heads(hb);
      ChunkScratch cs;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / blocks, h0 = (i % blocks) * hb, h1 = std::min(Hkv, h0 + hb);
        scalar_t* ob = o + b * q_heads * D;
        const int64_t slot = slots[b];
        const int64_t nkeys = std::min<int64_t>(seq_lens[b], S);
        if (slot < 0 || slot >= cache.batch || nkeys <= 0) {
          zero_heads(ob + h0 * G * D, (h1 - h0) * G, D);
          continue;
        }
        const int64_t off = slot * S * Hkv * D;
        for (int64_t h = h0; h < h1; ++h) {
          heads[h - h0].begin(qp + b * q.row_stride + h * G * q.head_stride, 0, q.head_stride, 1, G, &nkeys, D);
        }
        for (int64_t j0 = 0; j0 < nkeys; j0 += kKeyChunk) {
          for (int64_t h = h0; h < h1; ++h) {
            heads[h - h0].chunk(kc + off + h * D, vc + off + h * D, Hkv * D, j0, scale, cs);
          }
        }
        for (int64_t h = h0; h < h1; ++h) heads[h - h0].end(ob + h * G * D, 0, D);
      }
    });
    });
  });
}

}  // namespace codellama::cpu
