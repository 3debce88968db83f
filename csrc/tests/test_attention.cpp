// CPU kv_cache_append / attention_prefill / attention_decode against a naive float64 softmax attention,
// GQA ratios, head dims 64 / 128 / 8, a prefix already in the cache (start_pos > 0), fp32 and bf16.
#include <cmath>
#include <tuple>

#include "check.h"
#include "codellama/attention.h"

using namespace codellama;

namespace {

// Naive: out[h] = sum_j softmax(q.k_j * scale)_j v_j over keys 0..n-1 of cache slot `slot`, kv head h / G.
template <typename T>
std::vector<double> naive(const T* q, int64_t Hq, const std::vector<T>& kc, const std::vector<T>& vc, int64_t slot,
                          int64_t n, int64_t S, int64_t Hkv, int64_t D, double scale) {
  std::vector<double> out(Hq * D, 0.0);
  const int64_t G = Hq / Hkv;
  for (int64_t h = 0; h < Hq; ++h) {
    const int64_t kvh = h / G;
    std::vector<double> s(n);
    double mx = -1e300, sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      double d = 0;
      for (int64_t e = 0; e < D; ++e) d += double(to_float(q[h * D + e])) * to_float(kc[((slot * S + j) * Hkv + kvh) * D + e]);
      s[j] = d * scale;
      mx = std::max(mx, s[j]);
    }
    for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - mx); sum += s[j]; }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t e = 0; e < D; ++e) out[h * D + e] += s[j] / sum * to_float(vc[((slot * S + j) * Hkv + kvh) * D + e]);
  }
  return out;
}

template <typename T>
void check(DType dt, int64_t Hq, int64_t Hkv, int64_t D) {
  const int64_t Bc = 3, S = 80;
  const double tol = dt == DType::kFloat32 ? 1e-5 : 3e-2;
  const float scale = 1.f / std::sqrt(float(D));
  std::vector<T> kc(Bc * S * Hkv * D), vc(kc.size());
  // fill the caches through kv_cache_append: every (slot, position) row, tokens in a scrambled order
  const int64_t rows = Bc * S;
  auto kf = test::random_floats(rows * Hkv * D, 1), vf = test::random_floats(rows * Hkv * D, 2);
  std::vector<T> k(kf.size()), v(vf.size());
  for (size_t i = 0; i < k.size(); ++i) { k[i] = from_float<T>(kf[i]); v[i] = from_float<T>(vf[i]); }
  std::vector<int32_t> slots(rows), pos(rows);
  for (int64_t t = 0; t < rows; ++t) { const int64_t r = (t * 7) % rows; slots[t] = r / S; pos[t] = r % S; }
  KVCache cache{kc.data(), vc.data(), Bc, S, Hkv, D};
  cpu::kv_cache_append(dt, cache, {k.data(), Hkv * D, D}, {v.data(), Hkv * D, D}, slots.data(), pos.data(), rows);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t e = 0; e < Hkv * D; ++e) {
      const int64_t c = (int64_t(slots[t]) * S + pos[t]) * Hkv * D + e;
      test::expect_near("append k", to_float(kc[c]), to_float(k[t * Hkv * D + e]), 0, 0);
      test::expect_near("append v", to_float(vc[c]), to_float(v[t * Hkv * D + e]), 0, 0);
    }
  // prefill: 2 sequences, lengths 5 and 70, starting at 3 and 0, in slots 2 and 0
  const std::vector<int32_t> cu = {0, 5, 75}, start = {3, 0}, pslots = {2, 0};
  const int64_t ntok = 75;
  auto qf = test::random_floats(ntok * Hq * D, 3);
  std::vector<T> q(qf.size()), out(qf.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = from_float<T>(qf[i]);
  cpu::attention_prefill(dt, out.data(), {q.data(), Hq * D, D}, ntok, Hq, cache, cu.data(), start.data(), pslots.data(),
                         2, scale);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
      auto want = naive(q.data() + t * Hq * D, Hq, kc, vc, pslots[b], start[b] + t - cu[b] + 1, S, Hkv, D, scale);
      for (int64_t i = 0; i < Hq * D; ++i) test::expect_near("prefill", to_float(out[t * Hq * D + i]), want[i], tol, tol);
    }
  // decode: 3 sequences, slots permuted, lengths 1, 33, 80
  const std::vector<int32_t> dslots = {1, 2, 0}, lens = {1, 33, 80};
  std::vector<T> dout(3 * Hq * D);
  cpu::attention_decode(dt, dout.data(), {q.data(), Hq * D, D}, 3, Hq, cache, dslots.data(), lens.data(), scale);
  for (int64_t b = 0; b < 3; ++b) {
    auto want = naive(q.data() + b * Hq * D, Hq, kc, vc, dslots[b], lens[b], S, Hkv, D, scale);
    for (int64_t i = 0; i < Hq * D; ++i) test::expect_near("decode", to_float(dout[b * Hq * D + i]), want[i], tol, tol);
  }
}

}  // namespace

int main() {
  const int64_t shapes[][3] = {{4, 4, 64}, {8, 2, 128}, {4, 1, 8}, {2, 2, 256}};
  for (const auto& sh : shapes) {
    const int64_t hq = sh[0], hkv = sh[1], d = sh[2];
    check<float>(DType::kFloat32, hq, hkv, d);
    check<BFloat16>(DType::kBFloat16, hq, hkv, d);
    check<Half>(DType::kFloat16, hq, hkv, d);
  }
  return test::finish("test_attention");
}
