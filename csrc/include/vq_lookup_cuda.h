// VQ decode front end on CUDA: gather + L2-normalize codebook rows, project, add bias and
// position embedding, in one pass (see csrc/cuda/vq_lookup.cu). Plain C++ header: no CUDA types,
// so bindings.cpp compiles with the host compiler alone.
#pragma once
#include <cstdint>

namespace detailflow::cuda {

// Largest D the CUDA kernel takes (its normalized rows are staged in 48 KiB of shared memory).
constexpr int64_t kVqLookupMaxD = 12288;

// out[b, t, :] = weight @ (e / max(|e|, 1e-12)) + bias + pos_embed[t], e = codebook[codes[b, t]].
// All pointers are device pointers. codes: (B, T) int64, rows `codes_stride` apart, unit last
// stride; codebook: (K, D) rows `codebook_stride` apart, dtype code `codebook_dtype`; weight:
// (C, D) rows `weight_stride` apart, dtype code `dtype` (also that of bias, pos_embed, out);
// bias: C values or null; pos_embed: (>= T, C) rows `pos_stride` apart or null; out: contiguous
// (B, T, C). Dtypes: float32, bfloat16, float16 (dispatch.h codes). fp32 accumulation.
// A code outside [0, K) is never read: its output row is NaN (the Python wrapper range-checks
// codes before the call, except while a CUDA graph is being captured).
// Runs asynchronously on `stream` (a cudaStream_t as an integer); allocates nothing.
void vq_lookup(const int64_t* codes, int64_t B, int64_t T, int64_t codes_stride,
               const void* codebook, int codebook_dtype, int64_t K, int64_t D,
               int64_t codebook_stride, const void* weight, int dtype, int64_t C,
               int64_t weight_stride, const void* bias, const void* pos_embed, int64_t pos_stride,
               void* out, uintptr_t stream);

}  // namespace detailflow::cuda
