// argmax: one block per row, (value, index) reduction (NaN largest, first index of equals).
// sample: one block of 1024 threads per row, no full sort and no host synchronisation:
//   keys = (order-preserving bits of x_i = logit_i / T) << 32 | ~i, unique, larger = earlier in sorted order.
//   Likely rows first (head path): a head is the entries within some whole number of half nats of the maximum m,
//   a prefix of the sorted order (a bound on x, not on e_i = expf(x_i - m): expf need not be monotonic). The pass
//   that sums Z also counts the entries and their mass (16-bit fixed point) in half-nat bins down to m - 16; the
//   smallest head that holds top-k's k entries, or enough mass for top-p's crossing (or, without top-p, the
//   inverse CDF's), is taken when it has at most 2048 entries: a pass gathers it, a bitonic sort and one double
//   prefix scan give top-k, top-p and the inverse CDF, 3 passes over the row in all. The scan checks that each
//   crossing lies inside the head; when one does not, or no head qualifies (flat rows, u near 1 without
//   top-p, a large k), the general path runs:
//   the key of any rank comes from an 8 x 8-bit radix select (shared histograms, warp-aggregated atomics);
//   the sorted order is walked in chunks of 1024 ranks: select the chunk's last key, gather the chunk's keys,
//   bitonic-sort them in shared memory, double prefix scan of e_i, first crossing by a block min-reduction.
//   Exact same rules as the CPU kernel (see sampling.h).
//   Differences from the CPU: the double sums run in block order (last-bit differences) and CUDA's expf may
//   differ from glibc's by an ulp, so a uniform within ~1e-7 of a CDF step may pick the neighbouring entry.
#include <climits>

#include "codellama/sampling.h"
#include "cuda_common.cuh"

namespace codellama::cuda {
namespace {

constexpr int kArgmaxThreads = 512;
constexpr int kChunk = 1024;  // threads of the sample kernel = ranks walked per chunk
constexpr int kHeadMax = 2 * kChunk;  // entries of the largest head (two per thread)
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Index of the first maximum of row [v] (NaN largest); every thread gets it.
template <typename T>
__device__ int block_argmax(const T* row, int v) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    const float x = to_f(row[i]);
    if (better(x, i, bv, bi)) { bv = x; bi = i; }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, bv, o);
    const int oi = __shfl_xor_sync(kFull, bi, o);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
  __syncthreads();
  if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
  __syncthreads();
  bv = lane < warps ? sv[lane] : -INFINITY;
  bi = lane < warps ? si[lane] : INT_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, bv, o);
    const int oi = __shfl_xor_sync(kFull, bi, o);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
  return bi;
}

template <typename T>
__global__ void argmax_kernel(int64_t* out, const T* logits, int64_t stride, int v) {
  grid_dependency_sync();
  const int i = block_argmax(logits + static_cast<int64_t>(blockIdx.x) * stride, v);
  if (threadIdx.x == 0) out[blockIdx.x] = i;
}

// ---- sample ----

__device__ __forceinline__ float block_max(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? part[lane] : -INFINITY);
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ double block_sum_d(double v) {
  __shared__ double part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  return warp_sum_d(lane < warps ? part[lane] : 0.0);
}

__device__ __forceinline__ int block_min_i(int v) {
  __shared__ int part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : INT_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Inclusive prefix sum over the block in thread order.
__device__ __forceinline__ double block_inclusive_scan(double v) {
  __shared__ double wsum[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) wsum[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double w = lane < warps ? wsum[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += n;
    }
    if (lane < warps) wsum[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += wsum[warp - 1];
  return v;
}

// Scaled logit; -0 becomes +0 so that equal values order by index, as on the CPU.
template <typename T>
__device__ __forceinline__ float scaled(const T* row, int i, float temp) {
  const float x = to_f(row[i]) / temp;
  return x == 0.f ? 0.f : x;
}

__device__ __forceinline__ uint64_t make_key(float x, int i) {
  const uint32_t u = __float_as_uint(x);
  const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(i));
}

__device__ __forceinline__ int key_index(uint64_t k) { return static_cast<int>(~static_cast<uint32_t>(k)); }

constexpr int kHeadBins = 32;          // half-nat bins of m - x: heads reach m - 16 at most
constexpr float kHeadBinsPerNat = 2.f;
constexpr float kMassUnit = 65536.f;   // bin masses in units of 2^-16: e <= 1, so a bin's sum fits 32 bits

struct SampleShared {
  uint64_t keys[kHeadMax];
  double incl[kHeadMax];
  int hist[256];
  int counter;
  int sel, rem;
  unsigned head_count[kHeadBins];
  unsigned head_mass[kHeadBins];
};

// The head bin of scaled logit x (kHeadBins: none). Monotonic in x, so the entries of bins <= j are a prefix of the
// sorted order; NaN goes nowhere.
__device__ __forceinline__ int head_bin(float x, float m) {
  const float d = (m - x) * kHeadBinsPerNat;
  return d < static_cast<float>(kHeadBins) ? (d > 0.f ? static_cast<int>(d) : 0) : kHeadBins;
}

// The last bin of the smallest head that should hold the crossings: with top-k (kp < v), its kp entries; else
// mass above `target` (p Z for top-p, u Z without it), counted with each entry's rounding error against it.
// -1 when that head would exceed kHeadMax entries or none does. Every thread computes the same.
__device__ int choose_head(const SampleShared& sh, int kp, int v, double target) {
  unsigned count = 0;
  double mass = 0.0;
  for (int j = 0; j < kHeadBins; ++j) {
    count += sh.head_count[j];
    mass += static_cast<double>(sh.head_mass[j]) / kMassUnit;
    if (count > static_cast<unsigned>(kHeadMax)) return -1;
    if (kp < v ? count >= static_cast<unsigned>(kp) : mass - 0.5 * count / kMassUnit > target) return j;
  }
  return -1;
}

// Key of the rank-th largest key of the row (1-based rank <= v).
template <typename T>
__device__ uint64_t select_key(const T* row, int v, float temp, int rank, SampleShared& sh) {
  uint64_t prefix = 0, mask = 0;
  int remaining = rank;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    for (int base = 0; base < v; base += blockDim.x) {  // uniform trip count: __match_any_sync needs the warp
      const int i = base + static_cast<int>(threadIdx.x);
      int bin = 256;
      if (i < v) {
        const uint64_t k = make_key(scaled(row, i, temp), i);
        if ((k & mask) == prefix) bin = static_cast<int>((k >> shift) & 255u);
      }
      const unsigned peers = __match_any_sync(kFull, bin);
      if (bin < 256 && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&sh.hist[bin], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int c = 0, sel = 0;
      for (int b = 255; b >= 0; --b) {
        if (c + sh.hist[b] >= remaining) { sel = b; break; }
        c += sh.hist[b];
      }
      sh.sel = sel;
      sh.rem = remaining - c;
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(sh.sel) << shift;
    mask |= static_cast<uint64_t>(0xffu) << shift;
    remaining = sh.rem;
  }
  return prefix;
}

// Sorts sh.keys[0, n) descending (n a power of two <= kHeadMax); every thread of the block calls it.
__device__ void bitonic_sort_desc(SampleShared& sh, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int j = size >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {  // the pairs of one step are disjoint
        const int ixj = i ^ j;
        if (ixj > i) {
          const uint64_t a = sh.keys[i], b = sh.keys[ixj];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) { sh.keys[i] = b; sh.keys[ixj] = a; }
        }
      }
      __syncthreads();
    }
  }
}

// Gathers the keys in [lo, hi) (no upper bound unless `bounded`) into sh.keys and sorts them descending;
// slots past the gathered ones hold 0, below every real key.
template <typename T>
__device__ void gather_sorted(const T* row, int v, float temp, uint64_t lo, uint64_t hi, bool bounded,
                              SampleShared& sh) {
  __syncthreads();  // previous readers of sh.keys are done
  sh.keys[threadIdx.x] = 0;
  if (threadIdx.x == 0) sh.counter = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    const uint64_t k = make_key(scaled(row, i, temp), i);
    if (k >= lo && (!bounded || k < hi)) {
      const int slot = atomicAdd(&sh.counter, 1);
      if (slot < kChunk) sh.keys[slot] = k;
    }
  }
  __syncthreads();
  bitonic_sort_desc(sh, kChunk);
}

struct WalkResult {
  int count;    // top-p mode: entries kept
  double mass;  // top-p mode: their mass
  int index;    // inverse-CDF mode: the chosen vocabulary index
};

// Walks the first `limit` entries of the sorted order. cdf=false (top-p): stops before the first entry
// (rank > 0) whose mass before it exceeds thr. cdf=true: stops at the first entry whose cumulative mass
// exceeds thr (the last entry when none does). Block-uniform result.
template <typename T>
__device__ WalkResult walk(const T* row, int v, float temp, float m, int limit, double thr, bool cdf,
                           SampleShared& sh) {
  double base = 0.0;
  int r0 = 0, last = 0;
  uint64_t hi = 0;
  bool bounded = false;
  while (r0 < limit) {
    const int n = min(kChunk, limit - r0);
    const uint64_t lo = select_key(row, v, temp, r0 + n, sh);
    gather_sorted(row, v, temp, lo, hi, bounded, sh);
    const int j = threadIdx.x;
    const double e = j < n ? static_cast<double>(expf(scaled(row, key_index(sh.keys[j]), temp) - m)) : 0.0;
    const double inc = block_inclusive_scan(e);
    sh.incl[j] = inc;
    __syncthreads();
    const double before = base + (j > 0 ? sh.incl[j - 1] : 0.0);
    const double after = base + inc;
    const bool hit = j < n && (cdf ? after > thr : (r0 + j > 0 && before > thr));
    const int first = block_min_i(hit ? j : INT_MAX);
    if (first != INT_MAX) {
      WalkResult r;
      r.count = r0 + first;
      r.mass = base + (first > 0 ? sh.incl[first - 1] : 0.0);
      r.index = key_index(sh.keys[first]);
      return r;
    }
    base += sh.incl[n - 1];
    last = key_index(sh.keys[n - 1]);
    r0 += n;
    hi = lo;
    bounded = true;
  }
  WalkResult r;
  r.count = limit;
  r.mass = base;
  r.index = last;
  return r;
}

// The first of entries j0 and j0 + 1 below `limit` whose inclusive mass exceeds thr (INT_MAX: neither).
__device__ __forceinline__ int first_above(int j0, double inc0, double inc1, int limit, double thr) {
  if (j0 < limit && inc0 > thr) return j0;
  return j0 + 1 < limit && inc1 > thr ? j0 + 1 : INT_MAX;
}

// Head path (see the top of the file): sh.keys[0, count) hold the head's keys (unsorted), z the mass of the whole
// row. Returns the sampled index, or -1 when a crossing lies past the head (the general path then decides).
// Block-uniform arguments; every thread of the block calls it.
template <typename T>
__device__ int sample_head(const T* row, int v, float temp, float m, int kp, float p, float u, int count, double z,
                           SampleShared& sh) {
  if (count > kHeadMax || (kp < v && kp > count)) return -1;
  const int n = min(kp, count);  // head entries inside the top-k set
  int n2 = 2;
  while (n2 < count) n2 <<= 1;
  bitonic_sort_desc(sh, n2);
  // inclusive masses in sorted order, entries j0 and j0 + 1 by thread j0 / 2: pair sums scanned over the block
  const int j0 = 2 * static_cast<int>(threadIdx.x);
  const auto e_at = [&](int j) {
    return j < n ? static_cast<double>(expf(scaled(row, key_index(sh.keys[j]), temp) - m)) : 0.0;
  };
  const double e0 = e_at(j0), e1 = e_at(j0 + 1);
  sh.incl[j0 + 1] = block_inclusive_scan(e0 + e1);
  __syncthreads();
  const double excl = j0 > 0 ? sh.incl[j0 - 1] : 0.0;
  __syncthreads();  // every thread has read its predecessor's pair sum
  const double inc0 = excl + e0, inc1 = inc0 + e1;
  sh.incl[j0] = inc0;
  sh.incl[j0 + 1] = inc1;
  __syncthreads();
  // top-k inside the head: its mass is the scan's; otherwise the whole row's.
  const double zk = kp < v ? sh.incl[kp - 1] : z;
  int kept = kp;  // entries kept by top-p, as a rank bound (> n: past the head)
  double mass = zk;
  if (p < 1.f) {
    const int first = block_min_i(first_above(j0, inc0, inc1, n, static_cast<double>(p) * zk));
    if (first != INT_MAX) {
      kept = first + 1;
      mass = sh.incl[first];
    } else if (kp > n) {
      return -1;
    }
  }
  const int first = block_min_i(first_above(j0, inc0, inc1, min(kept, n), static_cast<double>(u) * mass));
  if (first != INT_MAX) return key_index(sh.keys[first]);
  return kept <= n ? key_index(sh.keys[kept - 1]) : -1;
}

template <typename T>
__global__ void __launch_bounds__(kChunk) sample_kernel(int64_t* out, const T* logits, int64_t stride, int v,
                                                        const float* temperature, const int32_t* top_k,
                                                        const float* top_p, const float* uniform) {
  __shared__ SampleShared sh;
  const int b = blockIdx.x;
  const T* row = logits + static_cast<int64_t>(b) * stride;
  grid_dependency_sync();
  const float temp = temperature[b];
  if (!(temp > 0.f)) {
    const int i = block_argmax(row, v);
    if (threadIdx.x == 0) out[b] = i;
    return;
  }
  for (int j = threadIdx.x; j < kHeadMax; j += blockDim.x) sh.keys[j] = 0;
  if (threadIdx.x == 0) sh.counter = 0;
  if (threadIdx.x < kHeadBins) sh.head_count[threadIdx.x] = sh.head_mass[threadIdx.x] = 0;
  float mloc = -INFINITY;
  for (int i = threadIdx.x; i < v; i += blockDim.x) mloc = fmaxf(mloc, scaled(row, i, temp));
  const float m = block_max(mloc);  // its barriers also order the resets above before the atomics below
  const int k = top_k[b];
  const int kp = (k >= 1 && k < v) ? k : v;
  const float p = top_p[b], u = uniform[b];
  double zall = 0.0;
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    const float x = scaled(row, i, temp), e = expf(x - m);
    zall += static_cast<double>(e);
    const int bin = head_bin(x, m);
    if (bin < kHeadBins) {
      atomicAdd(&sh.head_count[bin], 1u);
      atomicAdd(&sh.head_mass[bin], __float2uint_rn(e * kMassUnit));
    }
  }
  const double z = block_sum_d(zall);  // its barriers make the bins visible
  const int last_bin = choose_head(sh, kp, v, static_cast<double>(p < 1.f ? p : u) * z);
  if (last_bin >= 0) {
    for (int base = 0; base < v; base += blockDim.x) {  // uniform trip count: the ballot needs the whole warp
      const int i = base + static_cast<int>(threadIdx.x);
      const float x = i < v ? scaled(row, i, temp) : 0.f;
      const bool in_head = i < v && head_bin(x, m) <= last_bin;
      const unsigned votes = __ballot_sync(kFull, in_head);
      const int lane = static_cast<int>(threadIdx.x & 31);
      int slot = 0;
      if (lane == 0 && votes) slot = atomicAdd(&sh.counter, __popc(votes));
      slot = __shfl_sync(kFull, slot, 0) + __popc(votes & ((1u << lane) - 1u));
      if (in_head && slot < kHeadMax) sh.keys[slot] = make_key(x, i);
    }
    __syncthreads();
    const int fast = sample_head(row, v, temp, m, kp, p, u, sh.counter, z, sh);
    if (fast >= 0) {
      if (threadIdx.x == 0) out[b] = fast < v ? fast : 0;
      return;
    }
  }
  double zloc = 0.0;
  if (kp < v) {
    const uint64_t lo = select_key(row, v, temp, kp, sh);
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
      const float x = scaled(row, i, temp);
      if (make_key(x, i) >= lo) zloc += static_cast<double>(expf(x - m));
    }
  }
  const double zk = kp < v ? block_sum_d(zloc) : z;
  int kept = kp;
  double mass = zk;
  if (p < 1.f) {
    const WalkResult r = walk(row, v, temp, m, kp, static_cast<double>(p) * zk, false, sh);
    kept = r.count;
    mass = r.mass;
  }
  const WalkResult r = walk(row, v, temp, m, kept, static_cast<double>(u) * mass, true, sh);
  if (threadIdx.x == 0) out[b] = (r.index >= 0 && r.index < v) ? r.index : 0;
}

}  // namespace

void argmax(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab,
            cudaStream_t stream) {
  if (rows == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "argmax", {
    launch_kernel(argmax_kernel<scalar_t>, static_cast<unsigned>(rows), kArgmaxThreads, 0, stream, out,
                  static_cast<const scalar_t*>(logits), stride, static_cast<int>(vocab));
  });
  check_launch("argmax");
}

void sample(DType dt, int64_t* out, const void* logits, int64_t stride, int64_t rows, int64_t vocab,
            const float* temperature, const int32_t* top_k, const float* top_p, const float* uniform,
            cudaStream_t stream) {
  if (rows == 0) return;
  CODELLAMA_DISPATCH_CUDA_TYPES(dt, "sample", {
    launch_kernel(sample_kernel<scalar_t>, static_cast<unsigned>(rows), kChunk, 0, stream, out,
                  static_cast<const scalar_t*>(logits), stride, static_cast<int>(vocab), temperature, top_k, top_p,
                  uniform);
  });
  check_launch("sample");
}

}  // namespace codellama::cuda
