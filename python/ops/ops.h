// Every op's torch-facing entry point, implemented in python/ops/<family>.cpp and registered in
// python/bindings.cpp. Each validates its inputs (ValueError naming the argument and the rule), allocates
// outputs and calls the CPU or CUDA kernel for the tensors' device on the current stream.
#pragma once

#include <torch/all.h>

#include <optional>
#include <tuple>

namespace codellama::bind {

// normalization.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);

// rotary.cpp
void rotary_embedding(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, double theta, bool interleaved);

// attention.cpp
void kv_cache_append(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& slots, const at::Tensor& positions);
at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& cu_seqlens, const at::Tensor& start_pos, const at::Tensor& slots,
                             int64_t max_query_len, double scale);
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& seq_lens, double scale);

// While one lives on a thread, the three ops above skip the value checks of their index tensors (slots, positions,
// lengths; on CUDA each check copies to the host and synchronises). For callers that have just passed the same
// index tensors through the same ops over caches of the same shape: decoder_layers after its first layer.
class IndexValuesChecked {
 public:
  IndexValuesChecked();
  ~IndexValuesChecked();
  IndexValuesChecked(const IndexValuesChecked&) = delete;
  IndexValuesChecked& operator=(const IndexValuesChecked&) = delete;

 private:
  bool previous_;
};

// activation.cpp
at::Tensor silu_and_mul(const at::Tensor& x);

// linear.cpp
// The most rows of x in dtype dt that take our CPU GEMV (more: a GEMM), for int8 weights or weights in dt, on this
// CPU (the dispatch rule of codellama/linear.h). int8 weights [N, K] with G scales per row whose products run on
// AMX-INT8 tiles keep it longer (N = 0: a shape that does not).
int64_t cpu_gemv_max_rows(at::ScalarType dt, bool int8, int64_t N = 0, int64_t K = 0, int64_t G = 1);
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& weight, int64_t group_size);
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
at::Tensor linear_silu_and_mul(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales);

// decoder.cpp
std::tuple<at::Tensor, at::Tensor> decoder_layers(const at::Tensor& x, at::TensorList weights, at::TensorList scales,
                                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions,
                                                  const at::Tensor& token_slots, const at::Tensor& slots,
                                                  const std::optional<at::Tensor>& seq_lens,
                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                  const std::optional<at::Tensor>& start_pos, int64_t max_query_len,
                                                  double eps, double theta, bool interleaved);

// sampling.cpp
at::Tensor argmax(const at::Tensor& logits);
at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& uniform);

}  // namespace codellama::bind
