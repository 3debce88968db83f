// Binding of kv_cache_append / attention_prefill / attention_decode: validate shapes, dtypes, devices and (on the
// CPU always, on CUDA when the stream is not being captured into a CUDA graph) the values of the index tensors,
// allocate outputs (and the split-K workspace of decode), launch on the current stream.
#include "codellama/attention.h"

#include <optional>

#include "checks.h"
#include "ops.h"

#ifdef CODELLAMA_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

namespace codellama::bind {
namespace {

// The caches: 4-D [Bc, S, Hkv, D], contiguous, same shape and dtype; returns the KVCache view.
KVCache check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  float_dtype(op, "k_cache", k_cache);
  check_same_dtype(op, {"k_cache", &k_cache}, {{"v_cache", &v_cache}});
  check_dim(op, "k_cache", k_cache, 4, "[batch, max_seq_len, kv_heads, head_dim]");
  check_dim(op, "v_cache", v_cache, 4, "[batch, max_seq_len, kv_heads, head_dim]");
  CODELLAMA_CHECK(op, v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache (",
                  k_cache.sizes(), "), got ", v_cache.sizes());
  check_contiguous(op, "k_cache", k_cache);
  check_contiguous(op, "v_cache", v_cache);
  CODELLAMA_CHECK(op, k_cache.size(2) > 0, "k_cache must have at least one kv head, got shape ", k_cache.sizes());
  return KVCache{k_cache.data_ptr(), v_cache.data_ptr(), k_cache.size(0), k_cache.size(1), k_cache.size(2),
                 k_cache.size(3)};
}

// Head dims the attention kernels of this device handle.
void check_head_dim(const char* op, const at::Tensor& q, int64_t d) {
  if (q.is_cuda()) {
    CODELLAMA_CHECK(op, cuda::attention_head_dim_supported(d), "head_dim (q.shape[-1]) must be 64 or 128 on CUDA, got ",
                    d);
  } else {
    CODELLAMA_CHECK(op, d > 0 && d % 8 == 0 && d <= 256,
                    "head_dim (q.shape[-1]) must be a multiple of 8 in [8, 256] on the CPU, got ", d);
  }
}

void check_cuda_alignment(const char* op, const at::Tensor& q, const KVCache& c) {
  if (!q.is_cuda()) return;
  CODELLAMA_CHECK(op, reinterpret_cast<uintptr_t>(c.k) % 16 == 0 && reinterpret_cast<uintptr_t>(c.v) % 16 == 0,
                  "k_cache and v_cache must start at 16-byte aligned addresses on CUDA");
}

// q [rows, Hq, D] with a contiguous last dim, matching the caches' D and GQA ratio; returns Hq.
int64_t check_query(const char* op, const at::Tensor& q, const KVCache& c, const char* layout) {
  float_dtype(op, "q", q);
  check_dim(op, "q", q, 3, layout);
  check_last_dim_contiguous(op, "q", q);
  check_size(op, "q", q, 2, c.head_dim, "the head_dim of k_cache");
  check_head_dim(op, q, c.head_dim);
  CODELLAMA_CHECK(op, q.size(1) % c.kv_heads == 0, "number of heads in key/value must divide number of heads in query"
                  " (k_cache has ", c.kv_heads, " kv heads, q has ", q.size(1), " heads)");
  return q.size(1);
}

thread_local bool index_values_checked = false;  // an IndexValuesChecked lives on this thread

// A CPU copy of an index tensor for value checks; nullopt while the CUDA stream is capturing (no sync allowed) or
// when the caller has checked the values already (IndexValuesChecked).
std::optional<at::Tensor> host_values(const at::Tensor& t) {
  if (index_values_checked) return std::nullopt;
  if (t.is_cpu()) return t;
#ifdef CODELLAMA_WITH_CUDA
  // the current stream of t's device (not of the current device), as in c10::cuda::currentStreamCaptureStatus
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_stream(t), &status));
  if (status != cudaStreamCaptureStatusNone) return std::nullopt;
#endif
  return t.cpu();
}

// Every value of t (int32, 1-D) in [lo, hi): else "<arg>[i] = v is beyond <what> = hi-1+1".
void check_range(const char* op, const char* arg, const at::Tensor& host, int64_t lo, int64_t hi, const char* what) {
  const int32_t* p = host.data_ptr<int32_t>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    CODELLAMA_CHECK(op, p[i] >= lo, arg, "[", i, "] = ", p[i], " must be at least ", lo);
    CODELLAMA_CHECK(op, p[i] < hi, arg, "[", i, "] = ", p[i], " is beyond ", what, " = ", hi);
  }
}

HeadsView heads_view(const at::Tensor& t) { return HeadsView{t.data_ptr(), t.stride(0), t.stride(1)}; }

}  // namespace

IndexValuesChecked::IndexValuesChecked() : previous_(index_values_checked) { index_values_checked = true; }
IndexValuesChecked::~IndexValuesChecked() { index_values_checked = previous_; }

// k, v [T, Hkv, D] (last dim contiguous); caches [Bc, S, Hkv, D]; slots, positions [T] int32
void kv_cache_append(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& slots, const at::Tensor& positions) {
  const char* op = "kv_cache_append";
  check_devices(op, {{"k", &k}, {"v", &v}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"slots", &slots},
                     {"positions", &positions}});
  const KVCache c = check_caches(op, k_cache, v_cache);
  const DType dt = float_dtype(op, "k", k);
  check_same_dtype(op, {"k_cache", &k_cache}, {{"k", &k}, {"v", &v}});
  check_dim(op, "k", k, 3, "[tokens, kv_heads, head_dim]");
  CODELLAMA_CHECK(op, v.sizes() == k.sizes(), "v must have the shape of k (", k.sizes(), "), got ", v.sizes());
  check_size(op, "k", k, 1, c.kv_heads, "the kv heads of k_cache");
  check_size(op, "k", k, 2, c.head_dim, "the head_dim of k_cache");
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
  const int64_t T = k.size(0);
  check_index_vector(op, "slots", slots, T, "[tokens]");
  check_index_vector(op, "positions", positions, T, "[tokens]");
  if (T == 0) return;
  if (auto hs = host_values(slots)) check_range(op, "slots", *hs, 0, c.batch, "the number of cache slots Bc");
  if (auto hp = host_values(positions)) check_range(op, "positions", *hp, 0, c.capacity, "the cache length S");
  if (k.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(k.device());
    cuda::kv_cache_append(dt, c, heads_view(k), heads_view(v), slots.data_ptr<int32_t>(),
                          positions.data_ptr<int32_t>(), T, current_stream(k));
#endif
  } else {
    cpu::kv_cache_append(dt, c, heads_view(k), heads_view(v), slots.data_ptr<int32_t>(),
                         positions.data_ptr<int32_t>(), T);
  }
}

// q [T, Hq, D]; caches [Bc, S, Hkv, D]; cu_seqlens [B+1], start_pos [B], slots [B] int32 -> [T, Hq, D]
at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& cu_seqlens, const at::Tensor& start_pos, const at::Tensor& slots,
                             int64_t max_query_len, double scale) {
  const char* op = "attention_prefill";
  check_devices(op, {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"cu_seqlens", &cu_seqlens},
                     {"start_pos", &start_pos}, {"slots", &slots}});
  const KVCache c = check_caches(op, k_cache, v_cache);
  const int64_t Hq = check_query(op, q, c, "[tokens, q_heads, head_dim]");
  check_same_dtype(op, {"k_cache", &k_cache}, {{"q", &q}});
  check_cuda_alignment(op, q, c);
  check_dtype(op, "cu_seqlens", cu_seqlens, at::kInt);
  check_dim(op, "cu_seqlens", cu_seqlens, 1, "[batch + 1]");
  CODELLAMA_CHECK(op, cu_seqlens.size(0) >= 1, "cu_seqlens must have batch + 1 >= 1 entries, got none");
  check_contiguous(op, "cu_seqlens", cu_seqlens);
  const int64_t B = cu_seqlens.size(0) - 1, T = q.size(0);
  check_index_vector(op, "start_pos", start_pos, B, "[batch] (cu_seqlens has batch + 1 entries)");
  check_index_vector(op, "slots", slots, B, "[batch] (cu_seqlens has batch + 1 entries)");
  CODELLAMA_CHECK(op, max_query_len >= 0, "max_query_len must be >= 0, got ", max_query_len);
  if (auto hc = host_values(cu_seqlens)) {
    const int32_t* cu = hc->data_ptr<int32_t>();
    CODELLAMA_CHECK(op, cu[0] == 0, "cu_seqlens[0] must be 0, got ", cu[0]);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = int64_t(cu[b + 1]) - cu[b];
      CODELLAMA_CHECK(op, len >= 0, "cu_seqlens must be non-decreasing, got cu_seqlens[", b + 1, "] = ", cu[b + 1],
                      " < cu_seqlens[", b, "] = ", cu[b]);
      CODELLAMA_CHECK(op, len <= max_query_len, "sequence ", b, " has ", len, " tokens, more than max_query_len = ",
                      max_query_len);
    }
    CODELLAMA_CHECK(op, cu[B] == T, "cu_seqlens[-1] must equal the number of tokens in q (", T, "), got ", cu[B]);
    if (auto hs = host_values(start_pos)) {
      const int32_t* sp = hs->data_ptr<int32_t>();
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = int64_t(cu[b + 1]) - cu[b];
        CODELLAMA_CHECK(op, sp[b] >= 0, "start_pos[", b, "] = ", sp[b], " must be at least 0");
        CODELLAMA_CHECK(op, sp[b] + len <= c.capacity, "start_pos[", b, "] + its length (", sp[b], " + ", len,
                        ") is beyond the cache length S = ", c.capacity);
      }
    }
  }
  if (auto hs = host_values(slots)) check_range(op, "slots", *hs, 0, c.batch, "the number of cache slots Bc");
  at::Tensor out = at::empty({T, Hq, c.head_dim}, q.options());
  if (T == 0 || B == 0) return out.zero_();
  const DType dt = float_dtype(op, "q", q);
  if (q.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    cuda::attention_prefill(dt, out.data_ptr(), heads_view(q), T, Hq, c, cu_seqlens.data_ptr<int32_t>(),
                            start_pos.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), B, max_query_len,
                            static_cast<float>(scale), current_stream(q));
#endif
  } else {
    cpu::attention_prefill(dt, out.data_ptr(), heads_view(q), T, Hq, c, cu_seqlens.data_ptr<int32_t>(),
                           start_pos.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), B, static_cast<float>(scale));
  }
  return out;
}

// q [B, Hq, D]; caches [Bc, S, Hkv, D]; slots, seq_lens [B] int32 -> [B, Hq, D]
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& seq_lens, double scale) {
  const char* op = "attention_decode";
  check_devices(op, {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"slots", &slots},
                     {"seq_lens", &seq_lens}});
  const KVCache c = check_caches(op, k_cache, v_cache);
  const int64_t Hq = check_query(op, q, c, "[batch, q_heads, head_dim]");
  check_same_dtype(op, {"k_cache", &k_cache}, {{"q", &q}});
  check_cuda_alignment(op, q, c);
  const int64_t B = q.size(0);
  check_index_vector(op, "slots", slots, B, "[batch] (q.shape[0])");
  check_index_vector(op, "seq_lens", seq_lens, B, "[batch] (q.shape[0])");
  if (auto hs = host_values(slots)) check_range(op, "slots", *hs, 0, c.batch, "the number of cache slots Bc");
  if (auto hl = host_values(seq_lens)) {
    const int32_t* len = hl->data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      CODELLAMA_CHECK(op, len[b] >= 1 && len[b] <= c.capacity, "seq_lens[", b, "] = ", len[b],
                      " must be in [1, S] with S = ", c.capacity, " (the cache length)");
    }
  }
  at::Tensor out = at::empty({B, Hq, c.head_dim}, q.options());
  if (B == 0) return out;
  const DType dt = float_dtype(op, "q", q);
  if (q.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t splits = cuda::decode_num_splits(B, Hq, c.kv_heads, c.capacity);
    at::Tensor ws = at::empty({cuda::decode_workspace_floats(B, Hq, c.head_dim, splits)},
                              q.options().dtype(at::kFloat));
    cuda::attention_decode(dt, out.data_ptr(), heads_view(q), B, Hq, c, slots.data_ptr<int32_t>(),
                           seq_lens.data_ptr<int32_t>(), static_cast<float>(scale), ws.data_ptr<float>(), splits,
                           current_stream(q));
#endif
  } else {
    cpu::attention_decode(dt, out.data_ptr(), heads_view(q), B, Hq, c, slots.data_ptr<int32_t>(),
                          seq_lens.data_ptr<int32_t>(), static_cast<float>(scale));
  }
  return out;
}

}  // namespace codellama::bind
