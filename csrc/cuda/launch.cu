// codellama/launch.h: the per-thread scope of programmatic dependent launches, and which devices take them.
#include "codellama/launch.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

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

}  // namespace

DependentLaunchScope::DependentLaunchScope() : saved_(t_scope.launches) {
  t_scope.launches = enabled_by_environment() ? 0 : -1;
}

DependentLaunchScope::~DependentLaunchScope() { t_scope.launches = saved_; }

int64_t l2_prefetch_bytes() {
  static const int64_t bytes = [] {
    const char* v = std::getenv("CODELLAMA_L2_PREFETCH_MB");
    const long mb = v == nullptr ? 16 : std::strtol(v, nullptr, 10);
    return static_cast<int64_t>(std::clamp<long>(mb, 0, 1 << 20)) << 20;
  }();
  return bytes;
}

bool next_launch_dependent(cudaStream_t stream) {
  ScopeState& s = t_scope;
  if (s.launches < 0) return false;
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    dev = -1;
  }
  // a launch on another stream or device than the scope's last one follows no kernel of the scope there
  const bool follows = s.launches > 0 && stream == s.stream && dev == s.device && dev >= 0;
  ++s.launches;
  s.stream = stream;
  s.device = dev;
  return follows && device_supports(dev);
}

}  // namespace codellama::cuda
