// decode_gemm_w4a8: y[M, N] = x[M, K] @ W[N, K]^T with int4 weights (the int4 mode's group-wise
// symmetric codes and scales) and int8 activations quantized per row inside the call: an exact
// int32 dot product per group, the group scales applied in fp32 in a fixed order.
// Kernel in cpu/decode_gemm_w4a8.cpp; packing and the torch reference in
// detailflow_engine/ops/decode_gemm_w4a8.py.
#pragma once
#include <cstdint>

#include "decode_gemm.h"

namespace detailflow::cpu {

// Packed layout (Np = ceil(N / 16) panels, K8 = ceil(K / 8); rows n >= N and k >= K hold Q = 0):
//   P[p][k8][j][t] = (Q[16 p + j][8 k8 + t] + 8) | (Q[16 p + j][8 k8 + 4 + t] + 8) << 4
// bytes, shape (Np, K8, 16, 4): one 64-byte vector holds 8 consecutive k of 16 output rows, its
// low nibbles the first 4 k (one vpdpbusd operand after an AND), its high nibbles the next 4.
// Group scales S[p][g][j] = s[16 p + j][g] (Np, ceil(K / group), 16) fp32, as decode_gemm_int4.
inline int64_t decode_gemm_w4a8_packed_numel(int64_t N, int64_t K) {
  return (N + kDecodePanel - 1) / kDecodePanel * ((K + 7) / 8) * 4 * kDecodePanel;
}

// Groups are whole k8 blocks; the largest keeps a group's int32 sums far from overflow.
constexpr int64_t kW4A8MaxGroup = 65536;

// Per row m of x: s_x[m], q[m, k] as decode_gemm_w8a8 (quantize_rows_int8.h);
// acc[m, n, g] = sum_{k in group g} q[m, k] Q[n, k] (int32, exact);
// f = 0; for g = 0, 1, ...: f = f + float(acc[m, n, g]) * s[n][g]   (fp32, no FMA, in g order)
// y[m, n] = f * s_x[m], in x's type (bf16 rounded to nearest even). A row with a non-finite x
// gives NaN outputs. Returns the inner loop's name: "avx512-vnni" or "portable" (same bits).
template <typename X>
const char* decode_gemm_w4a8(const X* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                             const float* group_scales, int64_t group, int64_t N, X* y, int64_t ldy,
                             int num_threads);

// Forces the portable loops (tests run both variants on one machine); off by default.
void decode_gemm_w4a8_force_portable(bool on);

}  // namespace detailflow::cpu
