// argmax: first maximum per row (NaN largest). sample: per row, fp32 scaled logits, 64-bit sort keys
// (value bits, index), sorted prefix built incrementally with nth_element + sort (most rows stop after a few
// dozen entries), Meta's top-p rule and the inverse CDF walked in sorted order with double accumulators.
// Rows in parallel.
#include "codellama/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "vec.h"

namespace codellama::cpu {
namespace {

// a is "greater" than the current best b (NaN largest; the caller keeps the first of equals).
inline bool better(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

template <typename T>
int64_t argmax_row(const T* p, int64_t v) {
  int64_t best_i = 0;
  float best = to_float(p[0]);
  for (int64_t i = 1; i < v; ++i) {
    const float x = to_float(p[i]);
    if (better(x, best)) { best = x; best_i = i; }
  }
  return best_i;
}

// Sort key: order-preserving bits of x above ~index, so that a larger key comes earlier in the sorted order
// (x descending, equal x by ascending index; -0 counts as +0). The CUDA kernel uses the same keys.
inline uint64_t make_key(float x, int64_t i) {
  if (x == 0.f) x = 0.f;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(i));
}
inline int64_t key_index(uint64_t k) { return static_cast<int64_t>(~static_cast<uint32_t>(k)); }

template <typename T>
int64_t sample_row(const T* p, int64_t v, float temperature, int32_t top_k, float top_p, float uniform,
                   std::vector<float>& e, std::vector<uint64_t>& keys) {
  if (!(temperature > 0.f)) return argmax_row(p, v);
  e.resize(v);
  keys.resize(v);
  float m = -INFINITY;
  for (int64_t i = 0; i < v; ++i) {
    e[i] = to_float(p[i]) / temperature;
    m = std::max(m, e[i]);
  }
  for (int64_t i = 0; i < v; ++i) {
    keys[i] = make_key(e[i], i);
    e[i] = std::exp(e[i] - m);
  }
  const int64_t kp = (top_k >= 1 && top_k < v) ? top_k : v;

  // keys[0, sorted) is the final sorted prefix; it grows geometrically with nth_element + sort.
  int64_t sorted = 0;
  const auto ensure_sorted = [&](int64_t n) {
    if (n <= sorted) return;
    n = std::max<int64_t>(n, std::min<int64_t>(v, 2 * sorted + 64));
    n = std::min(n, v);
    std::nth_element(keys.begin() + sorted, keys.begin() + (n - 1), keys.end(), std::greater<uint64_t>());
    std::sort(keys.begin() + sorted, keys.begin() + n, std::greater<uint64_t>());
    sorted = n;
  };
  const auto e_at = [&](int64_t j) { return static_cast<double>(e[key_index(keys[j])]); };

  double z = 0;
  if (kp == v) {
    for (int64_t i = 0; i < v; ++i) z += e[i];
  } else {
    ensure_sorted(kp);
    for (int64_t j = 0; j < kp; ++j) z += e_at(j);
  }
  int64_t kept = kp;
  double z_kept = z;
  if (top_p < 1.f) {
    const double limit = static_cast<double>(top_p) * z;
    double cum = 0;
    kept = 0;
    for (int64_t j = 0; j < kp; ++j) {
      if (j > 0 && cum > limit) break;  // the first entry is always kept
      ensure_sorted(j + 1);
      cum += e_at(j);
      ++kept;
    }
    z_kept = cum;
  }
  const double target = static_cast<double>(uniform) * z_kept;
  double cum = 0;
  for (int64_t j = 0; j < kept; ++j) {
    ensure_sorted(j + 1);
    cum += e_at(j);
    if (cum > target) return key_index(keys[j]);
  }
  ensure_sorted(kept);
  return key_index(keys[kept - 1]);
}

}  // namespace

void argmax(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab) {
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "argmax", {
    const auto* l = static_cast<const scalar_t*>(logits);
    parallel_for(rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) out[r] = argmax_row(l + r * stride, vocab);
    });
  });
}

void sample(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab,
            const float* temperature, const int32_t* top_k, const float* top_p, const float* uniform) {
  CODELLAMA_DISPATCH_FLOAT_TYPES(dt, "sample", {
    const auto* l = static_cast<const scalar_t*>(logits);
    parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)), [&](int64_t r0, int64_t r1) {
      std::vector<float> e;
      std::vector<uint64_t> keys;
      for (int64_t r = r0; r < r1; ++r) {
        out[r] = sample_row(l + r * stride, vocab, temperature[r], top_k[r], top_p[r], uniform[r], e, keys);
      }
    });
  });
}

}  // namespace codellama::cpu
