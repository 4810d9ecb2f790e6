// decode_gemm: y[M, N] = x[M, K] @ W[N, K]^T for few rows M, W pre-packed into panels that
// stream sequentially. Kernel in cpu/decode_gemm.cpp; packing in detailflow_engine/ops/decode_gemm.py.
#pragma once
#include <cstdint>

#include "dispatch.h"

namespace detailflow::cpu {

// Output rows per packed panel (one 16-lane fp32 register).
constexpr int64_t kDecodePanel = 16;

// Packed layouts (Np = ceil(N / 16) panels; rows n >= N and columns k >= K are zero):
//   float32: P[p][k][j]      = W[16 p + j][k]                     shape (Np, K, 16)
//   bf16:    P[p][k2][j][t]  = W[16 p + j][2 k2 + t]              shape (Np, ceil(K / 2), 16, 2)
//   int8:    P[p][k][j]      = Q[16 p + j][k]                     shape (Np, K, 16)
// so panel p is one contiguous block and consecutive panels are adjacent. int8 is weight-only
// quantization with per-output-row fp32 scales s (N of them, unpadded): W[n][k] ~ s[n] Q[n][k].
inline int64_t decode_gemm_packed_numel(int64_t N, int64_t K, bool bf16_weights) {
  const int64_t np = (N + kDecodePanel - 1) / kDecodePanel;
  const int64_t kp = bf16_weights ? (K + 1) / 2 * 2 : K;
  return np * kp * kDecodePanel;
}

// int4 weight-only (its own entry point, decode_gemm_int4): symmetric codes q in [-7, 7] per
// output row and group of G consecutive k (G even; the last group is short when G does not
// divide K), stored as nibbles q + 8, two k per byte (low nibble k = 2 k2, high 2 k2 + 1;
// k >= K and rows n >= N hold q = 0, nibble 8):
//   int4:    P[p][k2][j] = (Q[16 p + j][2 k2] + 8) | (Q[16 p + j][2 k2 + 1] + 8) << 4   shape (Np, ceil(K / 2), 16)
// with fp32 group scales S[p][g][j] = s[16 p + j][g], shape (Np, ceil(K / G), 16) (pad rows 0):
// W[n][k] ~ s[n][k / G] Q[n][k].
struct int4x2 {  // tag type of the int4 layout: one byte, two k of one output row
  uint8_t bits;
};
inline int64_t decode_gemm_int4_packed_numel(int64_t N, int64_t K) {
  return (N + kDecodePanel - 1) / kDecodePanel * ((K + 1) / 2) * kDecodePanel;
}

// y[m, n] = sum_k x[m, k] * W[n, k] with fp32 accumulation; x rows have stride ldx, y rows
// stride ldy (unit last stride both). X is float or bf16 (y has X's type), Wt is float, bf16
// or int8_t (the packed layout above). `scales` (N floats) is required for int8_t W, where
// y[m, n] = scales[n] * sum_k x[m, k] * Q[n, k], and must be null otherwise. Any M >= 1 works;
// it is fast for M <= 64.
template <typename X, typename Wt>
void decode_gemm(const X* x, int64_t M, int64_t K, int64_t ldx, const Wt* packed,
                 const float* scales, int64_t N, X* y, int64_t ldy, int num_threads);

// int4 W (layout above; `group_scales` (Np, ceil(K / G), 16) fp32, `group` = G, even): y[m, n] =
// sum_g s[n][g] * sum_{k in group g} x[m, k] q[n, k], groups summed in k order.
template <typename X>
void decode_gemm_int4(const X* x, int64_t M, int64_t K, int64_t ldx, const int4x2* packed,
                      const float* group_scales, int64_t group, int64_t N, X* y, int64_t ldy,
                      int num_threads);

// Forces the portable loops for every type (tests run both variants on one machine); off by default.
void decode_gemm_force_portable(bool on);

// Which inner loop decode_gemm uses for these types on this CPU (for reports and tests):
// "avx512-fp32", "avx512-bf16-dot" (vdpbf16ps, bf16 x and bf16 W), "avx512-bf16-widen",
// "avx512-int8" (fp32 x), "avx512-int8-bf16-dot" (bf16 x), "avx512-int4-bf16-dot" (bf16 x),
// "avx512-int4-widen" (fp32 x), or "portable". Wt = int4x2 names the int4 entry point's loop.
template <typename X, typename Wt>
const char* decode_gemm_variant();

}  // namespace detailflow::cpu
