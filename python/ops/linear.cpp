// Binding of linear / quantize_int8 / linear_int8: validate, pick GEMV or GEMM, launch on the current stream.
//
// Dispatch rule (codellama/linear.h): M = x.numel() / K activation rows.
//   M <= 8 (decode): our GEMV kernels, CPU (AVX2, threads over N) or CUDA (warp per output row).
//   M >  8 (prefill): a GEMM through torch here: at::matmul (cuBLAS tensor cores on CUDA, oneDNN on CPU); for
//                     int8 weights on CUDA, our dequantize_int8 kernel writes W in x's dtype into a temporary first.
//   Exception, 16-bit / fp32 weights on CUDA: our GEMV for M = 1 only (kCudaGemvMaxRows): on an H200 it matched
//                     cuBLAS at M = 1 (83-85% of HBM bandwidth) and reached 0.62x cuBLAS at M = 8.
//   Exception, CPU: int8 weights, and 16-bit ones where the CPU has no native bf16 / fp16 matmul (no
//                     AVX512-BF16 / AVX512-FP16 / AMX; e.g. the 2-core AVX2 EPYC of benchmarks/RESULTS.md), use
//                     our GEMV (8 rows per pass over W) up to kCpuGemvMaxRows (48) rows, kCpuInt8GemvMaxRows (64)
//                     for int8; above, W is converted to fp32 a block of rows at a time and multiplied by fp32
//                     sgemm (cpu_gemm_blocks below).
//                     There oneDNN's bf16 matmul measured 5.3x slower than that at M = 128.
//   Exception, CPU with AMX-BF16 and bf16 x: oneDNN's GEMM above kCpuAmxGemvMaxRows (4) rows, and int8 weights
//                     above kCpuAmxInt8GemvMaxRows (12), dequantised to bf16 a block of rows at a time for it;
//                     up to kCpuAmxTransposedMaxRows (256) rows, as y^T = W x^T.
//   Exception, CPU with AMX-INT8, int8 weights and 16-bit x whose shape fits the tiles (cpu::linear_int8_on_tiles):
//                     our GEMV, its integer products on tiles, up to kCpuInt8TilesMaxRows (64) rows.
//   cpu_gemv_max_rows holds these thresholds.
// Every path accumulates in fp32 and rounds once to x's dtype (cuBLAS/oneDNN reduced-precision GEMMs
// accumulate in fp32 by default).
#include "codellama/linear.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <utility>

#include "checks.h"
#include "ops.h"

namespace codellama::bind {
namespace {

// What this CPU multiplies natively (x86, from cpuid; torch 2.14 no longer exports its own checks): bf16 with
// AVX512-BF16 or AMX-BF16, fp16 with AVX512-FP16 or AMX-FP16. Other architectures: assumed native (at::matmul
// decides), no AMX.
struct CpuMatmul {
  bool bf16 = true, fp16 = true;
  bool amx_bf16 = false;  // oneDNN's bf16 GEMM on AMX tiles: 1.34 TFLOP/s at M = 128 on 2 Xeon cores (RESULTS.md)
};

const CpuMatmul& cpu_matmul() {
  static const CpuMatmul features = [] {
    CpuMatmul f;
#if defined(__x86_64__) || defined(__i386__)
    unsigned a0 = 0, b0 = 0, c0 = 0, d0 = 0, a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    __get_cpuid_count(7, 0, &a0, &b0, &c0, &d0);
    __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    f.amx_bf16 = d0 >> 22 & 1;
    f.bf16 = (a1 >> 5 & 1) || f.amx_bf16;        // AVX512_BF16, AMX-BF16
    f.fp16 = (d0 >> 23 & 1) || (a1 >> 21 & 1);  // AVX512_FP16, AMX-FP16
#endif
    return f;
  }();
  return features;
}

bool cpu_has_native_matmul(at::ScalarType dt) {
  if (dt == at::kBFloat16) return cpu_matmul().bf16;
  if (dt == at::kHalf) return cpu_matmul().fp16;
  return true;
}

// Whether a CPU GEMM of M rows with x in dtype dt runs as y^T = W x^T (kCpuAmxTransposedMaxRows in
// codellama/linear.h: oneDNN then packs only x for its AMX kernel, not W).
bool cpu_gemm_transposed(at::ScalarType dt, int64_t M) {
  return dt == at::kBFloat16 && cpu_matmul().amx_bf16 && M <= kCpuAmxTransposedMaxRows;
}

// y^T [N, M], 16-bit and contiguous -> y [M, N]. With torch's own copy of the transposed view, int8 products of 2048
// rows took 1.3-1.6x as long in all (benchmarks/RESULTS.md, session 18).
at::Tensor transposed_back(const at::Tensor& yt) {
  at::Tensor y = at::empty({yt.size(1), yt.size(0)}, yt.options());
  cpu::transpose_16bit(y.data_ptr(), yt.data_ptr(), yt.size(0), yt.size(1));
  return y;
}

// x2 [M, K] (CPU) times W^T, W [N, K] given block-wise in `dt`: fill(block [n, K], n0, n) writes rows n0 .. n0+n
// of W. -> [M, N] in x2's dtype: the GEMM (fp32 sgemm, or oneDNN's bf16 GEMM with fp32 sums) rounds once to dt,
// and dt is fp32 or x2's. Blocks of 16 MiB: each GEMM call packs x again, and 4 MiB blocks made an int8
// 4096 -> 11008 product of 128 rows 1.4x slower (13.8 against 9.9 ms; benchmarks/RESULTS.md, session 18).
template <typename Fill>
at::Tensor cpu_gemm_blocks(const at::Tensor& x2, int64_t N, at::ScalarType dt, const Fill& fill) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const at::Tensor xb = x2.to(dt);
  const bool transposed = cpu_gemm_transposed(dt, M);
  at::Tensor y = transposed ? at::empty({N, M}, xb.options()) : at::empty({M, N}, xb.options());
  const int64_t block = std::min(N, std::max<int64_t>(16, (int64_t{16} << 20) / (K * xb.element_size())));
  at::Tensor wb = at::empty({block, K}, xb.options());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n = std::min(block, N - n0);
    at::Tensor w = wb.narrow(0, 0, n);
    fill(w, n0, n);
    if (transposed) {
      at::Tensor yb = y.narrow(0, n0, n);
      at::mm_out(yb, w, xb.t());
    } else {
      at::Tensor yb = y.narrow(1, n0, n);  // row stride N: the GEMM writes it in place (ldc = N)
      at::mm_out(yb, xb, w.t());
    }
  }
  return (transposed ? transposed_back(y) : y).to(x2.scalar_type());
}

// x [..., K] -> [M, K] with a contiguous last dim (a view when possible).
at::Tensor rows_of(const at::Tensor& x, int64_t K) {
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

void check_x(const char* op, const at::Tensor& x) {
  float_dtype(op, "x", x);
  CODELLAMA_CHECK(op, x.dim() >= 1, "x must have at least one dimension [..., K], got a scalar");
  CODELLAMA_CHECK(op, x.size(-1) > 0, "x must have a non-empty last dimension K, got shape ", x.sizes());
}

// The most rows the CUDA GEMV takes (more: a GEMM), for int8 or activation-dtype weights (the dispatch rule above).
// One place, because linear_silu_and_mul fuses exactly the calls that take the GEMV.
int64_t cuda_gemv_max_rows(bool int8) { return int8 ? kGemvMaxRows : kCudaGemvMaxRows; }

// x [..., K], weight [N, K] in x's dtype
void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_devices(op, {{"x", &x}, {"weight", &weight}});
  check_x(op, x);
  check_same_dtype(op, {"x", &x}, {{"weight", &weight}});
  check_dim(op, "weight", weight, 2, "[N, K]");
  check_size(op, "weight", weight, 1, x.size(-1), "K, the last dimension of x");
  check_contiguous(op, "weight", weight);
}

// x [..., K], qweight int8 [N, K], scales float32 [N, G] with G dividing K
void check_int8_args(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_devices(op, {{"x", &x}, {"qweight", &qweight}, {"scales", &scales}});
  check_x(op, x);
  check_dtype(op, "qweight", qweight, at::kChar);
  check_dim(op, "qweight", qweight, 2, "[N, K]");
  check_size(op, "qweight", qweight, 1, x.size(-1), "K, the last dimension of x");
  check_contiguous(op, "qweight", qweight);
  check_dtype(op, "scales", scales, at::kFloat);
  check_dim(op, "scales", scales, 2, "[N, G]");
  check_size(op, "scales", scales, 0, qweight.size(0), "N, the rows of qweight");
  check_contiguous(op, "scales", scales);
  const int64_t K = x.size(-1), G = scales.size(1);
  CODELLAMA_CHECK(op, G > 0 && K % G == 0, "scales.shape[1] (groups G) must divide K (", K, "), got ", G);
}

}  // namespace

int64_t cpu_gemv_max_rows(at::ScalarType dt, bool int8, int64_t N, int64_t K, int64_t G) {
  const bool amx = dt == at::kBFloat16 && cpu_matmul().amx_bf16;
  const DType d = dt == at::kFloat ? DType::kFloat32 : dt == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  if (int8 && N > 0 && cpu::linear_int8_on_tiles(d, N, K, G)) return kCpuInt8TilesMaxRows;
  if (int8) return amx ? kCpuAmxInt8GemvMaxRows : kCpuInt8GemvMaxRows;
  if (!cpu_has_native_matmul(dt)) return kCpuGemvMaxRows;
  return amx ? kCpuAmxGemvMaxRows : kGemvMaxRows;
}

// x [..., K], weight [N, K] -> [..., N]
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "linear";
  check_linear_args(op, x, weight);
  const int64_t K = x.size(-1), N = weight.size(0);
  const at::Tensor x2 = rows_of(x, K);
  const int64_t M = x2.size(0);
  const bool cpu_blocks = !x.is_cuda() && !cpu_has_native_matmul(x.scalar_type());
  if (M > (x.is_cuda() ? cuda_gemv_max_rows(false) : cpu_gemv_max_rows(x.scalar_type(), false))) {
    if (cpu_blocks) {
      return cpu_gemm_blocks(x2, N, at::kFloat, [&](at::Tensor& w, int64_t n0, int64_t n) {
        w.copy_(weight.narrow(0, n0, n));
      }).view(out_shape(x, N));
    }
    if (!x.is_cuda() && cpu_gemm_transposed(x.scalar_type(), M)) {
      return transposed_back(at::mm(weight, x2.t())).view(out_shape(x, N));
    }
    return at::matmul(x2, weight.t()).view(out_shape(x, N));  // GEMM: cuBLAS / oneDNN
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const DType dt = float_dtype(op, "x", x);
  if (M > 0 && N > 0) {
    if (x.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      cuda::linear_gemv(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), weight.data_ptr(), M, N, K,
                        current_stream(x));
#endif
    } else {
      cpu::linear_gemv(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), weight.data_ptr(), M, N, K);
    }
  }
  return out.view(out_shape(x, N));
}

// weight [N, K] -> (qweight int8 [N, K], scales float32 [N, G]); G = 1 (group_size 0) or K / group_size
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& weight, int64_t group_size) {
  const char* op = "quantize_int8";
  check_devices(op, {{"weight", &weight}});
  const DType dt = float_dtype(op, "weight", weight);
  check_dim(op, "weight", weight, 2, "[N, K]");
  check_contiguous(op, "weight", weight);
  const int64_t N = weight.size(0), K = weight.size(1);
  CODELLAMA_CHECK(op, K > 0, "weight must have a non-empty second dimension K, got shape ", weight.sizes());
  CODELLAMA_CHECK(op, group_size >= 0, "group_size must be >= 0 (0: one scale per row), got ", group_size);
  CODELLAMA_CHECK(op, group_size == 0 || K % group_size == 0, "group_size must divide K (", K, "), got ",
                  group_size);
  // A NaN or inf leaves its group without a meaningful scale (the kernels' max skips NaN, the reference's turns
  // NaN): such a weight is a broken checkpoint, refused here rather than quantised into finite nonsense. Load time
  // only, so the device sync of the check on CUDA costs nothing that matters.
  CODELLAMA_CHECK(op, N == 0 || at::isfinite(weight).all().item<bool>(),
                  "weight must be finite, got a NaN or inf among its values");
  const int64_t G = group_size == 0 ? 1 : K / group_size;
  at::Tensor q = at::empty({N, K}, weight.options().dtype(at::kChar));
  at::Tensor scales = at::empty({N, G}, weight.options().dtype(at::kFloat));
  if (N > 0) {
    if (weight.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
      const c10::cuda::CUDAGuard guard(weight.device());
      cuda::quantize_int8(dt, q.data_ptr<int8_t>(), scales.data_ptr<float>(), weight.data_ptr(), N, K, group_size,
                          current_stream(weight));
#endif
    } else {
      cpu::quantize_int8(dt, q.data_ptr<int8_t>(), scales.data_ptr<float>(), weight.data_ptr(), N, K, group_size);
    }
  }
  return {q, scales};
}

// x [..., K], qweight int8 [N, K], scales float32 [N, G] -> [..., N] in x's dtype
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  const char* op = "linear_int8";
  check_int8_args(op, x, qweight, scales);
  const int64_t K = x.size(-1), N = qweight.size(0), G = scales.size(1);
  const DType dt = float_dtype(op, "x", x);
  const at::Tensor x2 = rows_of(x, K);
  const int64_t M = x2.size(0);
  if (x.is_cuda() && M > cuda_gemv_max_rows(true)) {  // GEMM: dequantise into x's dtype, then cuBLAS
    at::Tensor w = at::empty({N, K}, x.options());
#ifdef CODELLAMA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::dequantize_int8(dt, w.data_ptr(), qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), N, K, G,
                          current_stream(x));
#endif
    return at::matmul(x2, w.t()).view(out_shape(x, N));
  }
  if (!x.is_cuda() && M > cpu_gemv_max_rows(x.scalar_type(), true, N, K, G)) {
    // GEMM: blocks of W dequantised to bf16 for AMX (into x's dtype, as on CUDA), else to fp32 for sgemm
    const int8_t* q = qweight.data_ptr<int8_t>();
    const float* s = scales.data_ptr<float>();
    const bool amx = x.scalar_type() == at::kBFloat16 && cpu_matmul().amx_bf16;
    return cpu_gemm_blocks(x2, N, amx ? at::kBFloat16 : at::kFloat, [&](at::Tensor& w, int64_t n0, int64_t n) {
      cpu::dequantize_int8(amx ? DType::kBFloat16 : DType::kFloat32, w.data_ptr(), q + n0 * K, s + n0 * G, n, K, G);
    }).view(out_shape(x, N));
  }
  // GEMV: CUDA for M <= 8; CPU for the remaining M (see the dispatch rule above)
  at::Tensor out = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    if (x.is_cuda()) {
#ifdef CODELLAMA_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      cuda::linear_int8(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), qweight.data_ptr<int8_t>(),
                        scales.data_ptr<float>(), M, N, K, G, current_stream(x));
#endif
    } else {
      cpu::linear_int8(dt, out.data_ptr(), x2.data_ptr(), x2.stride(0), qweight.data_ptr<int8_t>(),
                       scales.data_ptr<float>(), M, N, K, G);
    }
  }
  return out.view(out_shape(x, N));
}

// x [..., K], weight [2F, K] (gate rows, then up rows; int8 with scales [2F, G]) -> [..., F]:
// silu_and_mul(linear(x, weight)), or with linear_int8. On CUDA, rows that take the GEMV run one fused kernel (each
// warp computes a gate row and its up row and writes only their gated value: the [.., 2F] projection is never
// stored, and the step loses a launch per layer), with the roundings of the two ops, so the results are equal
// bitwise; elsewhere (CPU, GEMM rows) it is the two ops.
at::Tensor linear_silu_and_mul(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
  const char* op = "linear_silu_and_mul";
  if (scales) {
    check_int8_args(op, x, weight, *scales);
  } else {
    check_linear_args(op, x, weight);
  }
  const int64_t K = x.size(-1), N = weight.size(0), F = N / 2;
  CODELLAMA_CHECK(op, N > 0 && N % 2 == 0, "weight must have an even, positive number of rows [2F, K] (gate rows, "
                  "then up rows), got shape ", weight.sizes());
  const at::Tensor x2 = rows_of(x, K);
  const int64_t M = x2.size(0);
  if (!x.is_cuda() || M == 0 || M > cuda_gemv_max_rows(scales.has_value())) {
    return bind::silu_and_mul(scales ? bind::linear_int8(x, weight, *scales) : bind::linear(x, weight));
  }
  at::Tensor out = at::empty({M, F}, x.options());
#ifdef CODELLAMA_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::linear_silu_and_mul(float_dtype(op, "x", x), out.data_ptr(), x2.data_ptr(), x2.stride(0), weight.data_ptr(),
                            scales ? scales->data_ptr<float>() : nullptr, M, F, K, scales ? scales->size(1) : 1,
                            current_stream(x));
#endif
  return out.view(out_shape(x, F));
}

}  // namespace codellama::bind
