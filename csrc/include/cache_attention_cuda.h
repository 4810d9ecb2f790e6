// cache_attention (CUDA): append a decode step's K/V to a static cache, then attend the step's
// queries to the whole cache prefix (no mask). Kernel in cuda/cache_attention.cu; same contract
// as the CPU kernel (cache_attention.h), plus float16 and an optional split over the keys.
#pragma once
#include <cstdint>

namespace detailflow::cuda {

// Element strides of a (B, H, n, d) tensor whose last dimension is contiguous.
struct CacheAttnStrides {
  int64_t b, h, n;
};

constexpr int64_t kCacheAttnMaxHeadDim = 256;

// Number of key splits actually launched for a request of `num_splits` over L keys: every split
// gets ceil(L / num_splits) keys (the last one fewer), so none is empty. Shared by the launcher
// and bindings.cpp (which checks the scratch size against it).
inline int64_t cache_attention_splits(int64_t L, int64_t num_splits) {
  if (num_splits <= 1 || L <= 1) return 1;
  if (num_splits > L) num_splits = L;
  const int64_t per = (L + num_splits - 1) / num_splits;
  return (L + per - 1) / per;
}

// fp32 scratch elements a launch with `splits` > 1 needs: per (split, b, h, query row) the
// unnormalized partial output (d floats) and its running max and sum (2 floats).
inline int64_t cache_attention_scratch_elems(int64_t splits, int64_t B, int64_t H, int64_t n_q,
                                             int64_t d) {
  return splits <= 1 ? 0 : splits * B * H * n_q * (d + 2);
}

// Writes k_new/v_new into positions [start_pos, start_pos + n_q) of the contiguous
// (B, H, L_max, d) caches, then
//   out[b,h,i] = softmax_j(scale * q[b,h,i] . k[b,h,j]) v[b,h,j],  j < L = start_pos + n_q,
// with fp32 math. dtype: detailflow::DType code (fp32, bf16, fp16; all tensors the same).
// num_splits > 1 splits the keys of each (b, h) across that many blocks (flash-decoding); then
// `scratch` must hold cache_attention_scratch_elems(cache_attention_splits(L, num_splits), ...)
// floats and a second kernel combines the partials. Launches on `stream`, never synchronizes
// (CUDA-graph capturable). Throws std::runtime_error if a launch fails.
void cache_attention(const void* q, CacheAttnStrides q_s, const void* k_new, CacheAttnStrides k_s,
                     const void* v_new, CacheAttnStrides v_s, void* k_cache, void* v_cache,
                     void* out, CacheAttnStrides out_s, int64_t B, int64_t H, int64_t n_q,
                     int64_t d, int64_t L_max, int64_t start_pos, float scale, int dtype,
                     int64_t num_splits, float* scratch, uintptr_t stream);

}  // namespace detailflow::cuda
