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

// y[m, n] = sum_k x[m, k] * W[n, k] with fp32 accumulation; x rows have stride ldx, y rows
// stride ldy (unit last stride both). X is float or bf16 (y has X's type), Wt is float, bf16
// or int8_t (the packed layout above). `scales` (N floats) is required for int8_t W, where
// y[m, n] = scales[n] * sum_k x[m, k] * Q[n, k], and must be null otherwise. Any M >= 1 works;
// it is fast for M <= 64.
template <typename X, typename Wt>
void decode_gemm(const X* x, int64_t M, int64_t K, int64_t ldx, const Wt* packed,
                 const float* scales, int64_t N, X* y, int64_t ldy, int num_threads);

// Which inner loop decode_gemm uses for these types on this CPU (for reports and tests):
// "avx512-fp32", "avx512-bf16-dot" (vdpbf16ps, bf16 x and bf16 W), "avx512-bf16-widen",
// "avx512-int8", or "portable".
template <typename X, typename Wt>
const char* decode_gemm_variant();

}  // namespace detailflow::cpu
