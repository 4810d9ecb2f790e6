// decode_gemm_w8a8: y[M, N] = x[M, K] @ W[N, K]^T with int8 weights (per-output-row symmetric
// scales) and int8 activations quantized per row inside the call, an exact int32 dot product.
// Kernel in cpu/decode_gemm_w8a8.cpp; packing and the torch reference in
// detailflow_engine/ops/decode_gemm_w8a8.py.
#pragma once
#include <cstdint>

#include "decode_gemm.h"

namespace detailflow::cpu {

// Packed layout (Np = ceil(N / 16) panels, K4 = ceil(K / 4); rows n >= N and k >= K are 0):
//   P[p][k4][j][t] = Q[16 p + j][4 k4 + t]   int8, shape (Np, K4, 16, 4)
// so one 64-byte vector holds 4 consecutive k of 16 output rows: the operand layout of
// vpdpbusd (16 int32 lanes, each a dot product of 4 bytes). colsum[n] = sum_k Q[n][k] (N
// int32) undoes the +128 that makes activations unsigned; scales (N fp32): W[n][k] ~ s[n] Q[n][k].
inline int64_t decode_gemm_w8a8_packed_numel(int64_t N, int64_t K) {
  return (N + kDecodePanel - 1) / kDecodePanel * ((K + 3) / 4) * 4 * kDecodePanel;
}

// Largest K whose int32 sums cannot overflow: sum_k (q_x + 128) Q <= 255 * 127 * K < 2^31.
constexpr int64_t kW8A8MaxK = 65536;

// Per row m of x (float or bf16, row stride ldx): s_x[m] = max_k |x[m, k]| / 127 (fp32),
// q[m, k] = round_half_even(clamp(x[m, k] / s_x[m], -127, 127)) (an all-zero row: s_x = 0, q = 0);
// acc[m, n] = sum_k q[m, k] Q[n, k] (int32, exact); y[m, n] = (float(acc) * s_x[m]) * s[n], in
// x's type (bf16 rounded to nearest even). A row with a non-finite x gives NaN outputs. Returns
// the inner loop's name: "avx512-vnni" (vpdpbusd) or "portable" (same bits).
template <typename X>
const char* decode_gemm_w8a8(const X* x, int64_t M, int64_t K, int64_t ldx, const int8_t* packed,
                             const float* scales, const int32_t* colsum, int64_t N, X* y, int64_t ldy,
                             int num_threads);

// Forces the portable loops (tests run both variants on one machine); off by default.
void decode_gemm_w8a8_force_portable(bool on);

}  // namespace detailflow::cpu
