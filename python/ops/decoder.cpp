// Binding of decoder_layers: the model's layer loop (codellama_ext/model.py) in C++, so that a forward pass costs
// one dispatch from Python instead of ~13 per layer. Each layer calls the other ops' entry points directly (not
// through the dispatcher), so every kernel input is still validated by its own op; the index tensors' values
// (positions, slots, lengths: the same in every layer) only in the first layer. On the 2-core CPU of
// benchmarks/RESULTS.md the Python loop cost 3-4 ms per decode step of a 22-layer model (4-6 us per op call,
// more per nn.Module call), 5-10% of a 1.1B-shaped step.
#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"
#include "ops.h"

#ifdef CODELLAMA_WITH_CUDA
#include "codellama/launch.h"
#endif

namespace codellama::bind {
namespace {

// Per layer, in this order: attention_norm, wqkv, wo, ffn_norm, w13, w2 (the four matrices int8 when `scales`
// holds their scales, in the order wqkv, wo, w13, w2).
constexpr int64_t kTensorsPerLayer = 6;
constexpr int64_t kMatricesPerLayer = 4;

}  // namespace

// x [T, dim] embedded tokens at cache coordinates (token_slots[t], positions[t]); caches [L, Bc, S, Hkv, D].
// Decode (one token per sequence): seq_lens [B]; prefill: cu_seqlens [B+1], start_pos [B], max_query_len.
// -> (the last layer's FFN output, the residual stream before it), both [T, dim]
std::tuple<at::Tensor, at::Tensor> decoder_layers(const at::Tensor& x, at::TensorList weights, at::TensorList scales,
                                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions,
                                                  const at::Tensor& token_slots, const at::Tensor& slots,
                                                  const std::optional<at::Tensor>& seq_lens,
                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                  const std::optional<at::Tensor>& start_pos, int64_t max_query_len,
                                                  double eps, double theta, bool interleaved) {
  const char* op = "decoder_layers";
  check_dim(op, "x", x, 2, "[tokens, dim]");
  check_dim(op, "k_cache", k_cache, 5, "[layers, batch, max_seq_len, kv_heads, head_dim]");
  check_dim(op, "v_cache", v_cache, 5, "[layers, batch, max_seq_len, kv_heads, head_dim]");
  const int64_t L = k_cache.size(0), T = x.size(0), Hkv = k_cache.size(3), D = k_cache.size(4);
  CODELLAMA_CHECK(op, L >= 1 && v_cache.size(0) == L, "k_cache and v_cache must hold the same number (>= 1) of layers, "
                  "got shapes ", k_cache.sizes(), " and ", v_cache.sizes());
  CODELLAMA_CHECK(op, static_cast<int64_t>(weights.size()) == kTensorsPerLayer * L, "weights must hold ",
                  kTensorsPerLayer, " tensors per layer (attention_norm, wqkv, wo, ffn_norm, w13, w2) for the ", L,
                  " layers of k_cache, got ", weights.size());
  const bool int8 = !scales.empty();
  CODELLAMA_CHECK(op, !int8 || static_cast<int64_t>(scales.size()) == kMatricesPerLayer * L, "scales must be empty "
                  "or hold ", kMatricesPerLayer, " tensors per layer (wqkv, wo, w13, w2) for the ", L,
                  " layers, got ", scales.size());
  const bool decode = seq_lens.has_value();
  CODELLAMA_CHECK(op, decode ? !cu_seqlens && !start_pos : cu_seqlens && start_pos,
                  "give either seq_lens (decode) or cu_seqlens and start_pos (prefill)");
  CODELLAMA_CHECK(op, Hkv >= 1 && D >= 1 && weights[1].dim() == 2 && weights[1].size(0) % D == 0 &&
                      weights[1].size(0) / D > 2 * Hkv,
                  "wqkv (weights[1]) must be [(q_heads + 2 kv_heads) head_dim, dim] with the caches' kv_heads (", Hkv,
                  ") and head_dim (", D, "), got shape ", weights[1].sizes());
  const int64_t Hq = weights[1].size(0) / D - 2 * Hkv;
  const double scale = std::pow(static_cast<double>(D), -0.5);  // as ops.attention_*: head_dim ** -0.5

#ifdef CODELLAMA_WITH_CUDA
  // The layers' kernels may overlap their predecessors (codellama/launch.h): none of them writes a weight.
  std::optional<cuda::DependentLaunchScope> dependent;
  if (x.is_cuda()) dependent.emplace();
#endif
  at::Tensor h, residual, hidden = x;
  std::optional<IndexValuesChecked> checked;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = weights.data() + kTensorsPerLayer * i;
    const auto project = [&](const at::Tensor& in, int64_t matrix, const at::Tensor& weight) {
      return int8 ? bind::linear_int8(in, weight, scales[kMatricesPerLayer * i + matrix]) : bind::linear(in, weight);
    };
    if (i == 0) {
      h = bind::rms_norm(hidden, w[0], eps);
      residual = hidden;
    } else {
      std::tie(h, residual) = fused_add_rms_norm(hidden, residual, w[0], eps);
    }
    const at::Tensor qkv = project(h, 0, w[1]).view({T, Hq + 2 * Hkv, D});
    // strided views of the fused projection: the ops take any token / head strides
    at::Tensor q = qkv.narrow(1, 0, Hq), k = qkv.narrow(1, Hq, Hkv);
    const at::Tensor v = qkv.narrow(1, Hq + Hkv, Hkv);
#ifdef CODELLAMA_WITH_CUDA
    if (decode && x.is_cuda()) {  // wo streams into L2 during RoPE, the cache append and attention (launch.h)
      cuda::l2_prefetch(w[2].data_ptr(), std::min<int64_t>(w[2].nbytes(), cuda::attention_l2_prefetch_bytes()),
                        current_stream(x));
    }
#endif
    rotary_embedding(q, k, positions, theta, interleaved);
    at::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);
    kv_cache_append(k, v, kc, vc, token_slots, positions);
    const at::Tensor attn = decode ? attention_decode(q, kc, vc, slots, *seq_lens, scale)
                                   : attention_prefill(q, kc, vc, *cu_seqlens, *start_pos, slots, max_query_len, scale);
    std::tie(h, residual) = fused_add_rms_norm(project(attn.view({T, Hq * D}), 1, w[2]), residual, w[3], eps);
    const at::Tensor gated =
        linear_silu_and_mul(h, w[4], int8 ? std::optional<at::Tensor>(scales[kMatricesPerLayer * i + 2]) : std::nullopt);
    hidden = project(gated, 3, w[5]);
    if (i == 0) checked.emplace();  // layer 0's ops checked the index values against caches of every layer's shape
  }
  return {hidden, residual};
}

}  // namespace codellama::bind
