// Binding of rotary_embedding: validate, then rotate q and k in place on the current stream.
#include "codellama/rotary.h"

#include "checks.h"
#include "ops.h"

namespace codellama::bind {

// q [T, Hq, D], k [T, Hkv, D] (any strides for T and H, last dim contiguous), positions [T] int32/int64
void rotary_embedding(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, double theta, bool interleaved) {
  const char* op = "rotary_embedding";
  check_devices(op, {{"q", &q}, {"k", &k}, {"positions", &positions}});
  const DType dt = float_dtype(op, "q", q);
  check_same_dtype(op, {"q", &q}, {{"k", &k}});
  check_dim(op, "q", q, 3, "[tokens, q_heads, head_dim]");
  check_dim(op, "k", k, 3, "[tokens, kv_heads, head_dim]");
  const int64_t tokens = q.size(0), d = q.size(2);
  check_size(op, "k", k, 0, tokens, "the number of tokens of q");
  check_size(op, "k", k, 2, d, "the head_dim of q");
  CODELLAMA_CHECK(op, d > 0 && d % 2 == 0, "head_dim (q.shape[2]) must be even and positive, got ", d);
  CODELLAMA_CHECK(op, q.stride(2) == 1, "q must have a contiguous last dimension (stride 1), got strides ", q.strides());
  CODELLAMA_CHECK(op, k.stride(2) == 1, "k must have a contiguous last dimension (stride 1), got strides ", k.strides());
  CODELLAMA_CHECK(op, positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
                  "positions must be int32 or int64, got ", positions.scalar_type());
  check_dim(op, "positions", positions, 1, "[tokens]");
  check_contiguous(op, "positions", positions);
  check_size(op, "positions", positions, 0, tokens, "the number of tokens of q");
  CODELLAMA_CHECK(op, theta > 0 && std::isfinite(theta), "theta must be positive and finite, got ", theta);
  if (tokens == 0) return;
  if (positions.is_cpu()) {  // CPU only: a CUDA check would synchronise
    const bool wide = positions.scalar_type() == at::kLong;
    const int64_t* p64 = wide ? positions.data_ptr<int64_t>() : nullptr;
    const int32_t* p32 = wide ? nullptr : positions.data_ptr<int32_t>();
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t p = wide ? p64[t] : p32[t];
      CODELLAMA_CHECK(op, p >= 0, "positions must be >= 0, got positions[", t, "] = ", p);
    }
  }
  RotaryArgs a{q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
               positions.data_ptr(), positions.scalar_type() == at::kLong, tokens, q.size(1), k.size(1), d,
               static_cast<float>(theta), interleaved};
  if (q.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    cuda::rotary_embedding(dt, a, current_stream(q));
#endif
  } else {
    cpu::rotary_embedding(dt, a);
  }
}

}  // namespace codellama::bind
