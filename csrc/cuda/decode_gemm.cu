// decode_gemm (CUDA): y[m, n] = sum_k x[m, k] * W[n, k] for the few rows of a decode step.
//
// Same contract as cpu/decode_gemm.cpp, but W stays row-major (N, K): a GPU streams rows
// fine, so no packing. W is x's float type (fp32/bf16/fp16), or int8 weight-only with per-row
// fp32 scales s (y[m, n] = s[n] * sum_k x[m, k] Q[n, k], Q converted to fp32 in registers).
// fp32 accumulation; y in x's dtype.
//
// Why: at M <= 64 the product is 2M flops per weight, so the time is the time to read W once;
// the kernel's job is to keep enough 128-bit loads in flight on all SMs.
//
// Work split:
//   - block = 8 warps; warp w of block b owns the 2 weight rows n = 16 b + 2 w + {0, 1}
//     (kDecodeCudaRowsPerBlock = 16) and dots them with all M rows of x;
//   - lanes split K: in the vector path (W 16-byte aligned and K * sizeof(W) % 16 == 0, checked
//     by the launcher) lane l reads 16-byte chunks l, l + 32, ... of each of its 2 rows (8 bf16 /
//     4 fp32 / 16 int8 per load, coalesced 512 bytes a warp); otherwise the scalar path reads
//     one element per lane (still coalesced). Each lane keeps MT x 2 partial sums over its k,
//     reduced across the warp with xor shuffles (fixed order) once at the end;
//   - x is staged in shared memory as fp32, one K tile (256) of MT rows at a time, shared by the
//     8 warps; M > MT (MT <= 16 rows, a compile-time tile) loops over row tiles, re-reading the
//     block's weight slice (16 rows x its K range, <= 32 KB bf16 at K = 1024) from L1/L2;
//   - split-K: gridDim.y = S splits, each a whole number of K tiles, when N / 16 blocks would
//     not fill the SMs (the wrapper picks S). Split s writes its partial sums to scratch[s, m, n]
//     and a second kernel adds the S partials in order s = 0..S-1, scales and converts: the
//     result is deterministic and the pair is graph-capturable (scratch comes from the caller).
//
// Test:  python -m pytest tests/ops/test_decode_gemm.py -q -m gpu
// Bench: python benchmarks/bench_decode_gemm.py --device cuda
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "decode_gemm_cuda.h"

namespace detailflow::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 2;  // weight rows per warp
constexpr int kTile = static_cast<int>(kDecodeCudaKTile);
static_assert(kWarps * kRows == kDecodeCudaRowsPerBlock, "rows per block must match the header");

__device__ __forceinline__ float wf(float v) { return v; }
__device__ __forceinline__ float wf(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float wf(__half v) { return __half2float(v); }
__device__ __forceinline__ float wf(int8_t v) { return static_cast<float>(v); }

__device__ __forceinline__ int word(const int4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a compile-time constant
}

// Weights 4q .. 4q+3 of a 16-byte chunk as fp32 (all conversions exact). The chunk stays in 4
// integer registers; only 4 values a row are live as floats (int8: 16 per chunk).
template <typename W>
__device__ __forceinline__ void unpack4(const int4& raw, int q, float (&out)[4]) {
  if constexpr (sizeof(W) == 4) {  // float: the chunk is 4 weights, q == 0
    out[0] = __int_as_float(raw.x); out[1] = __int_as_float(raw.y);
    out[2] = __int_as_float(raw.z); out[3] = __int_as_float(raw.w);
  } else if constexpr (sizeof(W) == 2) {  // bf16 / fp16: words 2q, 2q + 1 hold 2 weights each
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned u = static_cast<unsigned>(word(raw, 2 * q + h));
      if constexpr (std::is_same_v<W, __nv_bfloat16>) {  // a bf16 is the top half of its fp32
        out[2 * h] = __uint_as_float(u << 16);
        out[2 * h + 1] = __uint_as_float(u & 0xffff0000u);
      } else {
        out[2 * h] = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
        out[2 * h + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
      }
    }
  } else {  // int8: word q holds 4 weights; sign-extend each byte (b - 256 when bit 7 is set)
    const unsigned u = static_cast<unsigned>(word(raw, q));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int b = static_cast<int>((u >> (8 * i)) & 0xffu);
      b -= (b & 0x80) << 1;
      out[i] = static_cast<float>(b);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One launch covers all M rows (row tiles of MT), a block's 16 weight rows and split
// blockIdx.y's K range [k_begin, k_end). VEC: 16-byte weight loads (alignment checked on host).
template <typename X, typename W, int MT, bool VEC>
__global__ void __launch_bounds__(kThreads)
decode_gemm_kernel(const X* __restrict__ x, int64_t M, int64_t K, int64_t ldx, const W* __restrict__ w,
                   const float* __restrict__ scales, int64_t N, X* __restrict__ y, int64_t ldy,
                   float* __restrict__ partial, int64_t k_per_split) {
  constexpr int V = 16 / static_cast<int>(sizeof(W));  // weights per 16-byte load
  __shared__ __align__(16) float xs[MT][kTile];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kDecodeCudaRowsPerBlock + warp * kRows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;

  const W* wrow[kRows];
  bool valid[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    valid[r] = n0 + r < N;
    wrow[r] = w + (valid[r] ? n0 + r : 0) * K;  // a valid address either way; never read if !valid
  }

  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    float acc[MT][kRows];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[m][r] = 0.0f;

    for (int64_t kt = k_begin; kt < k_end; kt += kTile) {
      const int len = static_cast<int>(k_end - kt < kTile ? k_end - kt : kTile);
      __syncthreads();  // the previous tile's readers are done with xs
      for (int i = threadIdx.x; i < MT * kTile; i += kThreads) {
        const int m = i / kTile, k = i % kTile;
        xs[m][k] = (m0 + m < M && k < len) ? to_f(x[(m0 + m) * ldx + kt + k]) : 0.0f;
      }
      __syncthreads();

      if constexpr (VEC) {
        // len is a multiple of V here: K % V == 0 and kTile % V == 0 (host check).
        // Two chunks in flight a lane, except where one chunk is already 256+ FMAs (int8 at
        // 16 rows), which would otherwise spill registers.
        constexpr int kUnroll = V * MT >= 256 ? 1 : 2;
#pragma unroll kUnroll
        for (int c = lane; c * V < len; c += 32) {
          const int k = c * V;
          // Raw 16-byte loads first (2 rows, both in flight), converted 4 weights at a time so
          // an int8 chunk (16 weights a row) never needs 32 live fp32 registers.
          int4 raw[kRows];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            raw[r] = valid[r] ? __ldg(reinterpret_cast<const int4*>(wrow[r] + kt + k)) : make_int4(0, 0, 0, 0);
          }
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            float wv[kRows][4];
#pragma unroll
            for (int r = 0; r < kRows; ++r) unpack4<W>(raw[r], q, wv[r]);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              const float4 xv = *reinterpret_cast<const float4*>(&xs[m][k + 4 * q]);
#pragma unroll
              for (int r = 0; r < kRows; ++r) {
                acc[m][r] = fmaf(wv[r][0], xv.x, acc[m][r]);
                acc[m][r] = fmaf(wv[r][1], xv.y, acc[m][r]);
                acc[m][r] = fmaf(wv[r][2], xv.z, acc[m][r]);
                acc[m][r] = fmaf(wv[r][3], xv.w, acc[m][r]);
              }
            }
          }
        }
      } else {
#pragma unroll 4
        for (int k = lane; k < len; k += 32) {
          float wv[kRows];
#pragma unroll
          for (int r = 0; r < kRows; ++r) wv[r] = valid[r] ? wf(wrow[r][kt + k]) : 0.0f;
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float xv = xs[m][k];
#pragma unroll
            for (int r = 0; r < kRows; ++r) acc[m][r] = fmaf(wv[r], xv, acc[m][r]);
          }
        }
      }
    }

#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float v = warp_sum(acc[m][r]);  // all 32 lanes take part, whatever m/r validity
        const int64_t row = m0 + m, n = n0 + r;
        if (lane == 0 && row < M && n < N) {
          if (partial != nullptr) {
            partial[(static_cast<int64_t>(blockIdx.y) * M + row) * N + n] = v;
          } else {
            y[row * ldy + n] = from_f<X>(scales != nullptr ? v * scales[n] : v);
          }
        }
      }
    }
  }
}

// y[m, n] = (scale[n] *) sum_{s < S} partial[s, m, n], summed in order s = 0, 1, ...
template <typename X>
__global__ void decode_gemm_combine_kernel(const float* __restrict__ partial, int64_t S, int64_t M, int64_t N,
                                           const float* __restrict__ scales, X* __restrict__ y, int64_t ldy) {
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int64_t s = 0; s < S; ++s) v += partial[s * total + i];
    const int64_t m = i / N, n = i % N;
    y[m * ldy + n] = from_f<X>(scales != nullptr ? v * scales[n] : v);
  }
}

template <typename X, typename W, int MT, bool VEC>
void launch_mt(const X* x, int64_t M, int64_t K, int64_t ldx, const W* w, const float* scales, int64_t N, X* y,
               int64_t ldy, float* partial, int64_t splits, int64_t k_per_split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kDecodeCudaRowsPerBlock)), static_cast<unsigned>(splits));
  decode_gemm_kernel<X, W, MT, VEC>
      <<<grid, kThreads, 0, stream>>>(x, M, K, ldx, w, scales, N, y, ldy, partial, k_per_split);
  DF_CUDA_CHECK_LAUNCH("decode_gemm_cuda");
}

// Row tile: the smallest of 1, 2, 4, 8, 16 that holds M (M > 16: tiles of 16).
template <typename X, typename W, bool VEC>
void launch_vec(const X* x, int64_t M, int64_t K, int64_t ldx, const W* w, const float* scales, int64_t N, X* y,
                int64_t ldy, float* partial, int64_t splits, int64_t k_per_split, cudaStream_t stream) {
  if (M <= 1) {
    launch_mt<X, W, 1, VEC>(x, M, K, ldx, w, scales, N, y, ldy, partial, splits, k_per_split, stream);
  } else if (M <= 2) {
    launch_mt<X, W, 2, VEC>(x, M, K, ldx, w, scales, N, y, ldy, partial, splits, k_per_split, stream);
  } else if (M <= 4) {
    launch_mt<X, W, 4, VEC>(x, M, K, ldx, w, scales, N, y, ldy, partial, splits, k_per_split, stream);
  } else if (M <= 8) {
    launch_mt<X, W, 8, VEC>(x, M, K, ldx, w, scales, N, y, ldy, partial, splits, k_per_split, stream);
  } else {
    launch_mt<X, W, 16, VEC>(x, M, K, ldx, w, scales, N, y, ldy, partial, splits, k_per_split, stream);
  }
}

template <typename X, typename W>
void launch(const X* x, int64_t M, int64_t K, int64_t ldx, const W* w, const float* scales, int64_t N, X* y,
            int64_t ldy, float* scratch, int64_t splits, cudaStream_t stream) {
  const int64_t tiles = ceil_div(K, kDecodeCudaKTile);
  const int64_t k_per_split = ceil_div(tiles, splits) * kDecodeCudaKTile;
  float* partial = splits > 1 ? scratch : nullptr;
  const bool vec = reinterpret_cast<uintptr_t>(w) % 16 == 0 && (K * static_cast<int64_t>(sizeof(W))) % 16 == 0;
  if (vec) {
    launch_vec<X, W, true>(x, M, K, ldx, w, scales, N, y, ldy, partial, splits, k_per_split, stream);
  } else {
    launch_vec<X, W, false>(x, M, K, ldx, w, scales, N, y, ldy, partial, splits, k_per_split, stream);
  }
  if (splits > 1) {
    const int64_t blocks = ceil_div(M * N, 256);
    decode_gemm_combine_kernel<X><<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(
        scratch, splits, M, N, scales, y, ldy);
    DF_CUDA_CHECK_LAUNCH("decode_gemm_cuda combine");
  }
}

}  // namespace

void decode_gemm_cuda(const void* x, int64_t M, int64_t K, int64_t ldx, int x_dtype, const void* w,
                      int w_dtype, const float* scales, int64_t N, void* y, int64_t ldy, float* scratch,
                      int64_t splits, uintptr_t stream) {
  DF_CHECK(M > 0 && N > 0 && K > 0, "M, N, K must be > 0, got " << M << ", " << N << ", " << K);
  DF_CHECK(ceil_div(N, kDecodeCudaRowsPerBlock) < (int64_t(1) << 31), "N = " << N << " is too large");
  const bool int8_w = static_cast<DType>(w_dtype) == DType::Int8;
  DF_CHECK(int8_w || w_dtype == x_dtype,
           "decode_gemm_cuda: w_dtype must equal x_dtype or be int8, got " << w_dtype << " vs " << x_dtype);
  DF_CHECK(int8_w == (scales != nullptr), "decode_gemm_cuda: scales must be given exactly for int8 weights");
  splits = decode_gemm_cuda_splits(K, splits);
  DF_CHECK(splits == 1 || scratch != nullptr, "decode_gemm_cuda: " << splits << " splits need a scratch buffer");
  const cudaStream_t s = as_stream(stream);
  DF_CUDA_DISPATCH_FLOAT(x_dtype, "decode_gemm_cuda x", [&] {
    const scalar_t* xp = static_cast<const scalar_t*>(x);
    scalar_t* yp = static_cast<scalar_t*>(y);
    if (int8_w) {
      launch<scalar_t, int8_t>(xp, M, K, ldx, static_cast<const int8_t*>(w), scales, N, yp, ldy, scratch, splits, s);
    } else {
      launch<scalar_t, scalar_t>(xp, M, K, ldx, static_cast<const scalar_t*>(w), nullptr, N, yp, ldy, scratch,
                                 splits, s);
    }
  });
}

// ------------------------------------------------------------------ int4 weight-only

namespace {

constexpr int kInt4Rows = 8;  // x rows per block (gridDim.y covers M)

// Warp w of block b owns output row n = 8 b + w; lane l reads bytes l, l + 32, ... of its row
// (2 k each), dequantizes q * s[n, k / G] (one fp32 rounding, as the torch reference) and keeps
// one explicit-FMA sum per x row; the 32 lanes' sums meet in a fixed xor-shuffle tree.
template <typename X>
__global__ void decode_gemm_int4_kernel(const X* __restrict__ x, int64_t M, int64_t K, int64_t ldx,
                                        const uint8_t* __restrict__ w, const float* __restrict__ gs,
                                        int64_t group, int64_t N, X* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kInt4Rows;
  const int64_t kb = (K + 1) / 2, ng = (K + group - 1) / group;
  const float* srow = gs + (n / 16) * ng * 16 + n % 16;
  const uint8_t* wrow = w + n * kb;
  float acc[kInt4Rows];
#pragma unroll
  for (int r = 0; r < kInt4Rows; ++r) acc[r] = 0.0f;
  for (int64_t b = lane; b < kb; b += 32) {
    const unsigned byte = wrow[b];
    const int64_t k = 2 * b;
    const float w0 = static_cast<float>(static_cast<int>(byte & 15u) - 8) * srow[(k / group) * 16];
    const bool two = k + 1 < K;
    const float w1 = two ? static_cast<float>(static_cast<int>(byte >> 4) - 8) * srow[((k + 1) / group) * 16] : 0.0f;
#pragma unroll
    for (int r = 0; r < kInt4Rows; ++r) {
      if (m0 + r < M) {
        const X* xr = x + (m0 + r) * ldx + k;
        acc[r] = fmaf(wf(xr[0]), w0, acc[r]);
        if (two) acc[r] = fmaf(wf(xr[1]), w1, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kInt4Rows; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
    if (lane == 0 && m0 + r < M) y[(m0 + r) * ldy + n] = from_f<X>(acc[r]);
  }
}

}  // namespace

void decode_gemm_int4_cuda(const void* x, int64_t M, int64_t K, int64_t ldx, int x_dtype, const uint8_t* w,
                           const float* group_scales, int64_t group, int64_t N, void* y, int64_t ldy,
                           uintptr_t stream) {
  DF_CHECK(M > 0 && N > 0 && K > 0, "M, N, K must be > 0, got " << M << ", " << N << ", " << K);
  DF_CHECK(group > 0 && group % 2 == 0, "decode_gemm_int4_cuda: group must be even and > 0, got " << group);
  DF_CHECK(ceil_div(M, kInt4Rows) < 65536, "M = " << M << " is too large");
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarps)), static_cast<unsigned>(ceil_div(M, kInt4Rows)));
  const cudaStream_t s = as_stream(stream);
  DF_CUDA_DISPATCH_FLOAT(x_dtype, "decode_gemm_int4_cuda x", [&] {
    decode_gemm_int4_kernel<scalar_t><<<grid, kThreads, 0, s>>>(static_cast<const scalar_t*>(x), M, K, ldx, w,
                                                                group_scales, group, N,
                                                                static_cast<scalar_t*>(y), ldy);
    DF_CUDA_CHECK_LAUNCH("decode_gemm_int4_cuda");
  });
}

}  // namespace detailflow::cuda
