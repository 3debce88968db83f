// codellama/launch.h: the per-thread scope of programmatic dependent launches, and which devices take them.
#include "codellama/launch.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace codellama::cuda {
namespace {

// Launches made in this thread's innermost scope; -1: none open (or CODELLAMA_PDL=0 when it opened).
thread_local int64_t t_launches = -1;

bool enabled_by_environment() {
  const char* v = std::getenv("CODELLAMA_PDL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// Compute capability 9.x (H100, H200), for the current device (asked once per device). Newer ones support it too,
// but nothing here has run on them, and captures of such launches were reported to fail on 12.0 (sgl-project/sglang
// pull request 18596).
bool current_device_supports() {
  constexpr int kCachedDevices = 64;
  static std::atomic<int8_t> cached[kCachedDevices];  // 0: not asked yet, 1: no, 2: yes
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the launch's own check
    return false;
  }
  const bool cacheable = dev >= 0 && dev < kCachedDevices;
  if (cacheable && cached[dev].load(std::memory_order_relaxed) != 0) return cached[dev].load() == 2;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (cacheable) cached[dev].store(major == 9 ? 2 : 1, std::memory_order_relaxed);
  return major == 9;
}

}  // namespace

DependentLaunchScope::DependentLaunchScope() : saved_(t_launches) { t_launches = enabled_by_environment() ? 0 : -1; }

DependentLaunchScope::~DependentLaunchScope() { t_launches = saved_; }

int64_t l2_prefetch_bytes() {
  static const int64_t bytes = [] {
    const char* v = std::getenv("CODELLAMA_L2_PREFETCH_MB");
    const long mb = v == nullptr ? 16 : std::strtol(v, nullptr, 10);
    return static_cast<int64_t>(mb > 0 ? mb : 0) << 20;
  }();
  return bytes;
}

bool next_launch_dependent() {
  if (t_launches < 0) return false;
  return t_launches++ > 0 && current_device_supports();
}

}  // namespace codellama::cuda
