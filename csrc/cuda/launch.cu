// codellama/launch.h: the per-thread scope of programmatic dependent launches, which devices take them, and the L2
// prefetch launched between kernels.
#include "codellama/launch.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

// This thread's innermost scope: launches made in it (-1: none open, or CODELLAMA_PDL=0 when it opened), and the
// stream and device of the last one.
struct ScopeState {
  int64_t launches = -1;
  cudaStream_t stream = nullptr;
  int device = -1;
};
thread_local ScopeState t_scope;

bool enabled_by_environment() {
  const char* v = std::getenv("CODELLAMA_PDL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// Compute capability 9.x (H100, H200), asked once per device. Newer ones support it too, but nothing here has run on
// them, and captures of such launches were reported to fail on 12.0 (sgl-project/sglang pull request 18596).
bool device_supports(int dev) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int8_t> cached[kCachedDevices];  // 0: not asked yet, 1: no, 2: yes
  const bool cacheable = dev >= 0 && dev < kCachedDevices;
  if (cacheable && cached[dev].load(std::memory_order_relaxed) != 0) return cached[dev].load() == 2;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the launch's own check
    return false;
  }
  if (cacheable) cached[dev].store(major == 9 ? 2 : 1, std::memory_order_relaxed);
  return major == 9;
}

int current_device() {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    dev = -1;
  }
  return dev;
}

// A launch on another stream or device than the scope's last one follows no kernel of the scope there.
bool follows_scope_launch(const ScopeState& s, cudaStream_t stream, int dev) {
  return s.launches > 0 && stream == s.stream && dev == s.device && dev >= 0;
}

// MiB from the environment variable `name` (default when unset), as bytes.
int64_t mib_from_environment(const char* name, long default_mib) {
  const char* v = std::getenv(name);
  const long mb = v == nullptr ? default_mib : std::strtol(v, nullptr, 10);
  return static_cast<int64_t>(std::clamp<long>(mb, 0, 1 << 20)) << 20;
}

// One kL2Piece per thread. The prefetches are issued after launch_dependents and before the wait, so they overlap the
// kernel before this one and the kernels after it.
__global__ void l2_prefetch_kernel(const char* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kL2Piece;
  if (o < bytes) prefetch_l2(p + o, bytes - o < kL2Piece ? bytes - o : kL2Piece);
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace

DependentLaunchScope::DependentLaunchScope() : saved_(t_scope.launches) {
  t_scope.launches = enabled_by_environment() ? 0 : -1;
}

DependentLaunchScope::~DependentLaunchScope() { t_scope.launches = saved_; }

int64_t l2_prefetch_bytes() {
  static const int64_t bytes = mib_from_environment("CODELLAMA_L2_PREFETCH_MB", 16);
  return bytes;
}

int64_t attention_l2_prefetch_bytes() {
  static const int64_t bytes = mib_from_environment("CODELLAMA_L2_PREFETCH_ATTENTION_MB", 32);
  return bytes;
}

bool launch_would_be_dependent(cudaStream_t stream) {
  const ScopeState& s = t_scope;
  if (s.launches < 0) return false;
  const int dev = current_device();
  return follows_scope_launch(s, stream, dev) && device_supports(dev);
}

bool next_launch_dependent(cudaStream_t stream) {
  ScopeState& s = t_scope;
  if (s.launches < 0) return false;
  const int dev = current_device();
  const bool follows = follows_scope_launch(s, stream, dev);
  ++s.launches;
  s.stream = stream;
  s.device = dev;
  return follows && device_supports(dev);
}

void l2_prefetch(const void* p, int64_t bytes, cudaStream_t stream) {
  bytes = bytes / 16 * 16;
  if (bytes <= 0 || !aligned16(p) || !launch_would_be_dependent(stream)) return;
  constexpr int kThreads = 64;
  const int64_t pieces = (bytes + kL2Piece - 1) / kL2Piece;
  const int64_t blocks = std::min<int64_t>((pieces + kThreads - 1) / kThreads, 0x7fffffff);
  launch_kernel(l2_prefetch_kernel, static_cast<unsigned>(blocks), kThreads, 0, stream, static_cast<const char*>(p),
                std::min<int64_t>(bytes, blocks * kThreads * kL2Piece));
  check_launch("l2_prefetch");
}

}  // namespace codellama::cuda
