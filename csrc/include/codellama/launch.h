// Programmatic dependent launch (PDL; used on compute capability 9.x, see launch.cu). A kernel launched so may
// start while the kernel before it in the stream is still running: its blocks run up to griddepcontrol.wait, which
// waits for that kernel to finish and its writes to be visible. Every kernel of csrc/cuda starts with that wait,
// after which it lets the next kernel launch (grid_dependency_sync, cuda_common.cuh); the GEMVs issue their first
// weight loads, and their first blocks an L2 prefetch of their rows, before it. In a decode step the small kernels
// between two GEMVs (norms, RoPE, the cache append, attention) then run while the next GEMV's weights are already on
// their way, and each kernel's launch and ramp-up overlap the previous one's tail.
//
// Reading weights before the wait is only safe where no kernel that may still be running writes them. So a launch
// is dependent only inside a DependentLaunchScope, which its opener opens over kernels that never write weights
// (decoder_layers), and never the scope's first launch: that one waits for everything before the scope as usual,
// and each later kernel starts after its predecessor's wait, so no kernel from before the scope is still running.
// CODELLAMA_PDL=0 in the environment (read when a scope opens) turns it off.
#pragma once

#include <cstdint>

#include "codellama/stream.h"

namespace codellama::cuda {

// Launches on this thread while the scope is alive are programmatic dependent launches (on compute capability 9.x),
// except its first and any on another stream or device than the scope's launch before it. Scopes nest; an inner one
// starts afresh (its first launch is not dependent).
class DependentLaunchScope {
 public:
  DependentLaunchScope();
  ~DependentLaunchScope();
  DependentLaunchScope(const DependentLaunchScope&) = delete;
  DependentLaunchScope& operator=(const DependentLaunchScope&) = delete;

 private:
  int64_t saved_;
};

// Whether the next kernel launch on this thread, on `stream` of the current device, is a programmatic dependent
// launch; counts it as made. Kernels that write weights never ask (launch_kernel(false, ...)).
bool next_launch_dependent(cudaStream_t stream);

// next_launch_dependent's answer for a launch made now, without counting one.
bool launch_would_be_dependent(cudaStream_t stream);

// Asks L2 to fetch weights [p, p + bytes) while the kernels launched after this call run. A decode step's RoPE, cache
// append and attention are latency-bound (a few us each, session 12's profile in benchmarks/RESULTS.md) and leave
// the memory bus idle; the output projection's weights can stream meanwhile, so that its GEMV reads them from L2.
// Launches a dependent kernel whose blocks first let the next kernel launch, then issue the prefetches, then wait
// for the kernel before them: a kernel after it still waits (through it) for everything before it. Launches
// nothing unless that launch would be dependent (launch_would_be_dependent) and p is 16-byte aligned.
void l2_prefetch(const void* p, int64_t bytes, cudaStream_t stream);

// Bytes of weights a GEMV launched as a dependent asks L2 to fetch before its wait: the rows of its first blocks
// past their first loads, so the weight stream goes on while the kernels before it end. CODELLAMA_L2_PREFETCH_MB
// (read once; default 16, a third of an H100's 50 MB L2; 0: none) exists to tune it on a GPU.
int64_t l2_prefetch_bytes();

// Bytes of a layer's output projection that decoder_layers prefetches (l2_prefetch) before a decode step's RoPE:
// CODELLAMA_L2_PREFETCH_ATTENTION_MB (read once; default 32, which holds a 7B wo; 0: none).
int64_t attention_l2_prefetch_bytes();

}  // namespace codellama::cuda
