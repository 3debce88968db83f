// Device-side vocabulary shared by the CUDA kernels: element types, float conversions, warp/block
// reductions, launch checking and the dtype dispatch macro.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "codellama/common.h"
#include "codellama/launch.h"

namespace codellama::cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The value a T tensor would hold after storing v.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// 16 bytes of T: kVec16<T> elements moved in one load / store (p 16-byte aligned), converted to / from floats.
template <typename T> constexpr int kVec16 = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int e = 0; e < kVec16<T>; ++e) out[e] = to_f(t[e]);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const float* in) {
  uint4 u;
  T* t = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int e = 0; e < kVec16<T>; ++e) t[e] = from_f<T>(in[e]);
  *reinterpret_cast<uint4*>(p) = u;
}

// silu_and_mul's element (codellama/activation.h): round(round(silu(gate)) * up) for gate and up already rounded to
// T. expf, not __expf: the result must round like torch's silu. Shared by its kernel and the gated GEMV, so the
// two give equal bits.
template <typename T>
__device__ __forceinline__ T silu_mul(float gate, float up) {
  const float s = round_to<T>(gate / (1.0f + expf(-gate)));
  return from_f<T>(s * up);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? partial[lane] : 0.f;
  return warp_sum(v);
}

// f(std::integral_constant<int, B>{}) for the smallest B of 1, 2, 4, 8 with n <= B (n >= 1; above 4: 8): the
// template bucket of a count a kernel keeps per-item registers for (GEMV activation rows, decode heads per block).
template <typename F>
void with_pow2_bucket(int n, const F& f) {
  if (n == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (n == 2) {
    f(std::integral_constant<int, 2>{});
  } else if (n <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// Programmatic dependent launch (codellama/launch.h): waits until the kernel this one may have started beside has
// finished and its writes are visible, then lets the next kernel launch. Every kernel calls it before it touches
// memory that another kernel may write (only weights may be read before it, see launch.h). Returns at once when the
// kernel was launched normally, and when called again.
__device__ __forceinline__ void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 to fetch bytes [p, p + bytes) (p 16-byte aligned, bytes a multiple of 16) in pieces of up to kL2Piece
// bytes: cp.async.bulk.prefetch (sm_90); elsewhere nothing.
constexpr int64_t kL2Piece = 16384;
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int64_t o = 0; o < bytes; o += kL2Piece) {
    const uint32_t n = static_cast<uint32_t>(bytes - o < kL2Piece ? bytes - o : kL2Piece);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(static_cast<const char*>(p) + o), "r"(n)
                 : "memory");
  }
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when `dependent` (the value
// of next_launch_dependent() for this launch, asked by the caller when the kernel's arguments depend on it). A
// failure is left for check_launch.
template <typename... Params, typename... Args>
void launch_kernel(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  if (dependent) {
    config.attrs = &attr;
    config.numAttrs = 1;
  }
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// The same, dependent where next_launch_dependent() says so.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  launch_kernel(next_launch_dependent(stream), kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

inline void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

}  // namespace codellama::cuda

// As CODELLAMA_DISPATCH_FLOAT_TYPES, with `scalar_t` bound to the device type (float, __half, __nv_bfloat16).
#define CODELLAMA_DISPATCH_CUDA_TYPES(DT, NAME, ...)                                      \
  do {                                                                                    \
    switch (DT) {                                                                         \
      case ::codellama::DType::kFloat32: { using scalar_t = float; __VA_ARGS__ } break;   \
      case ::codellama::DType::kFloat16: { using scalar_t = __half; __VA_ARGS__ } break;  \
      case ::codellama::DType::kBFloat16: {                                               \
        using scalar_t = __nv_bfloat16; __VA_ARGS__ } break;                              \
      default: throw std::invalid_argument(std::string(NAME) + ": unsupported dtype");    \
    }                                                                                     \
  } while (0)
