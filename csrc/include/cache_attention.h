// cache_attention: append a decode step's K/V to a static cache, then attend the step's
// queries to the whole cache prefix (no mask). Kernel in cpu/cache_attention.cpp.
#pragma once
#include <cstdint>

#include "dispatch.h"

namespace detailflow::cpu {

// Element strides of a (B, H, n, d) tensor whose last dimension is contiguous.
struct BhnStrides {
  int64_t b, h, n;
};

// k_cache/v_cache: contiguous (B, H, L_max, d). Writes k_new/v_new into positions
// [start_pos, start_pos + n_q) of both caches, then
//   out[b,h,i] = softmax_j(scale * q[b,h,i] . k_cache[b,h,j]) v_cache[b,h,j],  j < start_pos + n_q,
// with fp32 scores, softmax and accumulation. T is float or bf16 (all tensors the same T).
template <typename T>
void cache_attention(const T* q, BhnStrides q_s, const T* k_new, BhnStrides k_s,
                     const T* v_new, BhnStrides v_s, T* k_cache, T* v_cache, T* out,
                     BhnStrides out_s, int64_t B, int64_t H, int64_t n_q, int64_t d,
                     int64_t L_max, int64_t start_pos, float scale, int num_threads);

}  // namespace detailflow::cpu
