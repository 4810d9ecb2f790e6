// Nearest L2-normalized codeword for each L2-normalized latent row (see csrc/cpu/code_search.cpp).
#pragma once
#include <cstdint>

namespace detailflow::cpu {

// out[n] = argmin_k |e_k|^2 - 2 z_n . e_k with z_n = normalize(latents[n]) and
// e_k = normalize(codebook[k]) (or codebook[k] as is when codebook_normalized); ties -> lowest k.
// latents: (N, D) rows `latents_stride` elements apart, unit last stride; codebook: (K, D) rows
// `codebook_stride` apart, unit last stride; out: N int64. Z, E: float or bf16 (math in fp32).
template <typename Z, typename E>
void code_search(const Z* latents, int64_t N, int64_t D, int64_t latents_stride,
                 const E* codebook, int64_t K, int64_t codebook_stride, bool codebook_normalized,
                 int64_t* out, int num_threads);

}  // namespace detailflow::cpu
