// Prefill attention on AMX tiles (csrc/cpu/attention_amx.cpp), used by attention_prefill for bf16.
#pragma once

#include <cstdint>

#include "codellama/attention.h"

namespace codellama::cpu {

// attention_prefill (codellama/attention.h) for bf16 q and caches with head_dim 64 or 128, on AMX tiles, where the
// build targets AMX-BF16 and this CPU and OS grant it. Returns false, having written nothing, elsewhere.
bool attention_prefill_amx(void* out, HeadsView q, int64_t tokens, int64_t q_heads, const KVCache& cache,
                           const int32_t* cu_seqlens, const int32_t* start_pos, const int32_t* slots, int64_t batch,
                           float scale);

}  // namespace codellama::cpu
