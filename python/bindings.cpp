// The one place that lists every op of the `codellama` torch library: schema (outputs first, mutated
// arguments marked with `!`), a comment giving shapes and math, and the CPU / CUDA implementations.
// Shapes: T tokens (packed over the batch), B sequences, S cache capacity, Hq / Hkv query / key-value
// heads, D head_dim, K in-features, N out-features, V vocabulary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "codellama/linear.h"
#include "ops/ops.h"

TORCH_LIBRARY(codellama, m) {
  // out = round(w * round(x * rsqrt(mean(x^2) + eps))) over the last dim.   x [..., dim], weight [dim]
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // new_residual = round(x + residual); out = rms_norm(new_residual).       x, residual [..., dim]
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor out, Tensor new_residual)");
  // In-place rotary embedding at per-token positions, angles pos * theta^(-2i/D) in fp32, rotation in fp32.
  // interleaved=True: Meta's adjacent pairs (2i, 2i+1); False: HF rotate-half pairs (i, i + D/2).
  // q [T, Hq, D], k [T, Hkv, D] (last dim contiguous), positions [T] int32 or int64
  m.def("rotary_embedding(Tensor(a!) q, Tensor(b!) k, Tensor positions, float theta, bool interleaved) -> ()");
  // k_cache[slots[t], positions[t]] = k[t] (and v).  k, v [T, Hkv, D]; caches [B, S, Hkv, D]; slots, positions [T] int32
  m.def("kv_cache_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor positions) -> ()");
  // Causal grouped-query attention of packed query tokens over the cache (keys must already be appended):
  // sequence b owns tokens cu_seqlens[b] .. cu_seqlens[b+1]-1 at positions start_pos[b] + i, and query at
  // position p attends cache[slots[b], 0..p]; query head h reads kv head h / (Hq / Hkv); softmax in fp32.
  // q [T, Hq, D]; caches [B, S, Hkv, D]; cu_seqlens [B+1], start_pos [B], slots [B] int32 -> [T, Hq, D]
  m.def("attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens, Tensor start_pos, Tensor slots, int max_query_len, float scale) -> Tensor");
  // One query per sequence over cache[slots[b], 0 .. seq_lens[b]-1], split over the sequence for long caches.
  // q [B, Hq, D]; caches [Bc, S, Hkv, D]; slots, seq_lens [B] int32 -> [B, Hq, D]
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor seq_lens, float scale) -> Tensor");
  // out = round(round(silu(gate)) * up) with gate = x[..., :F], up = x[..., F:].   x [..., 2F] -> [..., F]
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // y = x W^T; GEMV kernels for few rows (decode), GEMM for many (see linear.cpp).  x [..., K], weight [N, K]
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  // Symmetric int8 weights: scale = max|w| / 127 per output row (group_size 0) or per group of K columns.
  // weight [N, K] -> (qweight int8 [N, K], scales float32 [N, K / group_size or 1])
  m.def("quantize_int8(Tensor weight, int group_size) -> (Tensor qweight, Tensor scales)");
  // y = x (qweight * scales)^T in the activation dtype.  x [..., K], qweight int8 [N, K], scales [N, G]
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  // silu_and_mul(linear(x, weight)) (linear_int8 with scales), equal bitwise; on CUDA decode rows one kernel that
  // never stores the [..., 2F] projection.  x [..., K], weight [2F, K] (int8 with scales [2F, G]) -> [..., F]
  m.def("linear_silu_and_mul(Tensor x, Tensor weight, Tensor? scales) -> Tensor");
  // The decoder layers over T tokens at cache coordinates (token_slots[t], positions[t]), each layer exactly the ops
  // above in the model's order: h = rms_norm(x + residual); q, k, v = linear(h, wqkv); rotary; kv_cache_append;
  // attention (decode when seq_lens is given, else prefill); h = rms_norm(linear(attn, wo) + residual);
  // x = linear(linear_silu_and_mul(h, w13), w2) (linear_int8 with `scales` when given).
  // x [T, dim]; weights: 6 per layer (attention_norm, wqkv [(Hq + 2Hkv) D, dim], wo, ffn_norm, w13, w2);
  // scales: none or 4 per layer (wqkv, wo, w13, w2); caches [L, Bc, S, Hkv, D]; positions, token_slots [T],
  // slots [B] int32 -> (the last layer's x, the residual before it), both [T, dim]
  m.def("decoder_layers(Tensor x, Tensor[] weights, Tensor[] scales, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, Tensor token_slots, Tensor slots, Tensor? seq_lens, Tensor? cu_seqlens, Tensor? start_pos, int max_query_len, float eps, float theta, bool interleaved) -> (Tensor, Tensor)");
  // Index of the first maximum of each row.  logits [B, V] -> [B] int64
  m.def("argmax(Tensor logits) -> Tensor");
  // Per-row sampling: temperature 0 -> argmax; else softmax(logits / T), top-k (k <= 0: off), Meta's
  // top-p rule, then the inverse CDF at uniform[b].  logits [B, V]; temperature, top_p, uniform [B] float32;
  // top_k [B] int32 -> [B] int64
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor uniform) -> Tensor");
}

namespace {

// The same entry points serve both devices: each validates and picks the kernel for its tensors' device.
void register_impls(torch::Library& m) {
  using namespace codellama::bind;
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("kv_cache_append", &kv_cache_append);
  m.impl("attention_prefill", &attention_prefill);
  m.impl("attention_decode", &attention_decode);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("linear", &linear);
  m.impl("quantize_int8", &quantize_int8);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_silu_and_mul", &linear_silu_and_mul);
  m.impl("decoder_layers", &decoder_layers);
  m.impl("argmax", &argmax);
  m.impl("sample", &sample);
}

}  // namespace

TORCH_LIBRARY_IMPL(codellama, CPU, m) { register_impls(m); }
#ifdef CODELLAMA_WITH_CUDA
TORCH_LIBRARY_IMPL(codellama, CUDA, m) { register_impls(m); }
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "codellama_ext kernels; the ops themselves live in torch.ops.codellama";
#ifdef CODELLAMA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // CPU GEMV / GEMM crossovers on this CPU (codellama/linear.h), for the tests and tools/bench_gemv_crossover.py
  m.def(
      "cpu_gemv_max_rows",
      [](const std::string& dtype, bool int8, int64_t n, int64_t k, int64_t groups) {
        if (dtype == "bfloat16") return codellama::bind::cpu_gemv_max_rows(at::kBFloat16, int8, n, k, groups);
        if (dtype == "float16") return codellama::bind::cpu_gemv_max_rows(at::kHalf, int8, n, k, groups);
        if (dtype == "float32") return codellama::bind::cpu_gemv_max_rows(at::kFloat, int8, n, k, groups);
        throw std::invalid_argument("dtype must be 'bfloat16', 'float16' or 'float32', got '" + dtype + "'");
      },
      "The most activation rows of `dtype` ('bfloat16', 'float16', 'float32') that take the CPU GEMV on this CPU, "
      "for int8 weights or weights in that dtype (more rows: a GEMM); for int8 weights [n, k] with `groups` scales "
      "per row the shape can raise it (n = 0: the limit of shapes whose products do not run on AMX-INT8 tiles)",
      pybind11::arg("dtype"), pybind11::arg("int8"), pybind11::arg("n") = 0, pybind11::arg("k") = 0,
      pybind11::arg("groups") = 1);
}
