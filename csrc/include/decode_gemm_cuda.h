// decode_gemm on the GPU: y[M, N] = x[M, K] @ W[N, K]^T for few rows M, W row-major (no
// packing), in x's float type or int8 with per-row fp32 scales. Kernel in cuda/decode_gemm.cu;
// wrapper (split choice, scratch) in detailflow_engine/ops/decode_gemm.py.
#pragma once
#include <cstdint>

namespace detailflow::cuda {

// Weight rows per block (8 warps x 2 rows) and the K tile of x staged in shared memory. The
// Python wrapper mirrors these two numbers to pick the split count (ops/decode_gemm.py).
constexpr int64_t kDecodeCudaRowsPerBlock = 16;
constexpr int64_t kDecodeCudaKTile = 256;

// The number of K splits actually launched for a request of `splits` (>= 1): every split gets
// the same whole number of K tiles and none is empty. The scratch needs splits * M * N floats
// when this is > 1.
inline int64_t decode_gemm_cuda_splits(int64_t K, int64_t splits) {
  const int64_t tiles = (K + kDecodeCudaKTile - 1) / kDecodeCudaKTile;
  if (splits < 1) splits = 1;
  if (splits > tiles) splits = tiles;
  if (splits > 65535) splits = 65535;  // gridDim.y limit
  const int64_t per = (tiles + splits - 1) / splits;
  return (tiles + per - 1) / per;
}

// x: (M, K) rows with stride ldx (unit last stride), dtype x_dtype (fp32/bf16/fp16 codes of
// dispatch.h). w: (N, K) contiguous, dtype w_dtype = x_dtype, or Int8 with `scales` (N fp32;
// null otherwise). y: (M, N) rows with stride ldy, x's dtype. splits > 1 (after
// decode_gemm_cuda_splits) needs `scratch` of splits * M * N floats; the sum over splits is
// done by a second kernel in a fixed order (deterministic, no atomics). Runs on `stream`,
// never synchronizes or allocates (CUDA-graph capturable).
void decode_gemm_cuda(const void* x, int64_t M, int64_t K, int64_t ldx, int x_dtype, const void* w,
                      int w_dtype, const float* scales, int64_t N, void* y, int64_t ldy, float* scratch,
                      int64_t splits, uintptr_t stream);

// int4 weight-only twin of the CPU's decode_gemm_int4: w the (N, ceil(K / 2)) row-major nibbles
// (low nibble k = 2 i, high 2 i + 1, code q + 8), `group_scales` the CPU's (Np, ceil(K / G), 16)
// fp32 layout (G = group, even). One warp per output row, lanes over k, a fixed xor-shuffle
// reduction: a row's bits never depend on M. No split-K (a first version: correct, not tuned).
void decode_gemm_int4_cuda(const void* x, int64_t M, int64_t K, int64_t ldx, int x_dtype, const uint8_t* w,
                           const float* group_scales, int64_t group, int64_t N, void* y, int64_t ldy,
                           uintptr_t stream);

}  // namespace detailflow::cuda
