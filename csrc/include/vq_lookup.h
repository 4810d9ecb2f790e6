// VQ decode front end: gather + L2-normalize codebook rows, project, add bias and position
// embedding, in one pass (see csrc/cpu/vq_lookup.cpp).
#pragma once
#include <cstdint>

namespace detailflow::cpu {

// out[b, t, :] = weight @ (e / max(|e|, 1e-12)) + bias + pos_embed[t], e = codebook[codes[b, t]].
// codes: (B, T) int64, rows `codes_stride` apart, unit last stride; codebook: (K, D) rows
// `codebook_stride` apart; weight: (C, D) rows `weight_stride` apart; bias: C values or null;
// pos_embed: (>= T, C) rows `pos_stride` apart or null; out: contiguous (B, T, C).
// E (codebook) and W (weight, bias, pos_embed, out): float or bf16; fp32 accumulation.
// Returns -1 on success, or the flat position b*T + t of the first code outside [0, K), in
// which case nothing is written.
template <typename E, typename W>
int64_t vq_lookup(const int64_t* codes, int64_t B, int64_t T, int64_t codes_stride,
                  const E* codebook, int64_t K, int64_t D, int64_t codebook_stride,
                  const W* weight, int64_t C, int64_t weight_stride, const W* bias,
                  const W* pos_embed, int64_t pos_stride, W* out, int num_threads);

}  // namespace detailflow::cpu
