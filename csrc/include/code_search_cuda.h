// Nearest L2-normalized codeword for each L2-normalized latent row, on CUDA (see
// csrc/cuda/code_search.cu). Plain C++ header: no CUDA types, so bindings.cpp compiles with the
// host compiler alone.
#pragma once
#include <cstdint>

namespace detailflow::cuda {

// Largest D the CUDA kernel takes (the generic-D path stages latents in shared memory).
constexpr int64_t kCodeSearchMaxD = 64;

// out[n] = argmin_k |e_k|^2 - 2 z_n . e_k with z_n = normalize(latents[n]) and
// e_k = normalize(codebook[k]) (or codebook[k] as is when codebook_normalized); ties -> lowest k,
// the same formula and rounding steps as the CPU kernel (csrc/cpu/code_search.cpp).
// All pointers are device pointers. latents: (N, D) rows `latents_stride` elements apart, unit
// last stride, dtype code `latents_dtype`; codebook: (K, D) rows `codebook_stride` apart, unit
// last stride, dtype code `codebook_dtype` (float32, bfloat16 or float16); out: N int64
// (also used as the scratch of the split-K reduction). K < 2^31. Math in fp32.
// Runs asynchronously on `stream` (a cudaStream_t as an integer); allocates nothing.
void code_search(const void* latents, int latents_dtype, int64_t N, int64_t D,
                 int64_t latents_stride, const void* codebook, int codebook_dtype, int64_t K,
                 int64_t codebook_stride, bool codebook_normalized, int64_t* out,
                 uintptr_t stream);

}  // namespace detailflow::cuda
