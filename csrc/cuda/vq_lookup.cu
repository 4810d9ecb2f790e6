// vq_lookup on CUDA: the VQ decode front end (codes -> decoder input tokens) in one pass.
//
// Formula:  out[b, t, c] = sum_d weight[c, d] * e[d] / max(|e|, 1e-12) + bias[c] + pos_embed[t, c],
//           e = codebook[codes[b, t]]   (the raw codebook: normalizing is part of the op),
//   the contract of csrc/cpu/vq_lookup.cpp (see there for the official-code mapping).
// Shapes: codes (B, T) int64; codebook (K, D); weight (C, D); bias (C,) or none; pos_embed
//   (T_max >= T, C) or none; out contiguous (B, T, C). Unit last strides, any row strides.
//   Codebook dtype E and weight dtype W (weight, bias, pos_embed, out) each fp32, bf16 or fp16;
//   fp32 accumulation, one rounding to W at the store.
// How: a block owns `rows_per_block` consecutive output rows (flat b*T + t) and a tile of
//   columns. (1) Its threads normalize the rows' codebook vectors into shared memory (one
//   thread per row; a code outside [0, K) is never read: its row becomes NaN, so a bad code
//   that slipped past the wrapper's check - it is skipped during graph capture - shows up
//   instead of reading out of bounds). (2) Each thread owns V consecutive columns: for D = 8
//   (the released codebook) it keeps its V x 8 weights in registers as fp32 and then, per row,
//   reads the 8 normalized values as two broadcast float4 loads from shared memory, does 8 FMAs
//   per column, adds bias and pos_embed[t] and stores V outputs at once. Any other D reads the
//   weights from global memory (L1/L2-resident) inside the d loop.
// Variants: V = 4 (8- or 16-byte vector stores/loads of out and pos_embed) when C % 4 == 0 and
//   out / pos_embed are aligned for it (checked here, on the host); else V = 1. DC = 8 or any D.
// Sizes: the op is store-bound (B*T*C outputs, 8 FMAs each). Blocks are sized to give about 4
//   resident blocks on each of an H200's 132 SMs at the large batches (B*T = 32768 rows -> 64
//   rows a block), and one row a block at batch 1 (128 blocks for T = 128).
// Test:  python -m pytest tests/ops/test_vq_lookup.py -q -m gpu
// Bench: python benchmarks/bench_vq_lookup.py --device cuda
#include "cuda_common.cuh"
#include "vq_lookup_cuda.h"

namespace detailflow::cuda {
namespace {

constexpr int kMaxThreads = 256;      // threads per block (column groups of one tile)
constexpr int kMaxRowsPerBlock = 64;  // D = 8: 2 KiB of shared memory
constexpr int64_t kTargetBlocks = 4 * 132;
constexpr int64_t kSmemFloats = 48 * 1024 / 4;  // the default dynamic shared-memory limit

static_assert(kVqLookupMaxD <= kSmemFloats, "one normalized row must fit in shared memory");

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

struct VqParams {
  const int64_t* codes;
  int64_t T, codes_stride, rows;
  const void* codebook;
  int64_t K, D, cb_stride;
  const void* weight;
  int64_t C, w_stride;
  const void* bias;  // may be null
  const void* pos;   // may be null
  int64_t pos_stride;
  void* out;
  int rows_per_block;
};

template <typename E, typename W, int DC, int V>
__global__ void __launch_bounds__(kMaxThreads) vq_lookup_kernel(const VqParams p) {
  extern __shared__ float4 smem4[];  // float4: 16-byte alignment for the D = 8 vector reads
  float* s_e = reinterpret_cast<float*>(smem4);
  const int64_t D = DC > 0 ? DC : p.D;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int nr = static_cast<int>(min(static_cast<int64_t>(p.rows_per_block), p.rows - row0));

  // (1) normalized codebook rows of this block's output rows -> shared memory
  const E* cb = static_cast<const E*>(p.codebook);
  for (int r = threadIdx.x; r < nr; r += blockDim.x) {
    const int64_t row = row0 + r;
    const int64_t k = p.codes[(row / p.T) * p.codes_stride + row % p.T];
    float* e = s_e + r * D;
    if (k < 0 || k >= p.K) {
      for (int64_t d = 0; d < D; ++d) e[d] = __int_as_float(0x7fc00000);  // quiet NaN
      continue;
    }
    const E* x = cb + k * p.cb_stride;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = to_f(x[d]);
      ss = fmaf(v, v, ss);
    }
    const float n = fmaxf(sqrtf(ss), 1e-12f);  // F.normalize: x / max(|x|, eps)
    for (int64_t d = 0; d < D; ++d) e[d] = to_f(x[d]) / n;
  }
  __syncthreads();  // the only barrier: threads past C may leave after it

  // (2) this thread's V columns for every row of the block
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (c0 >= p.C) return;  // the host makes C a multiple of V, so c0 < C covers all V columns
  const W* w = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  float bv[V];
#pragma unroll
  for (int v = 0; v < V; ++v) bv[v] = bias != nullptr ? to_f(bias[c0 + v]) : 0.f;
  float wr[V][DC > 0 ? DC : 1];
  if constexpr (DC > 0) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
      for (int d = 0; d < DC; ++d) wr[v][d] = to_f(w[(c0 + v) * p.w_stride + d]);
    }
  }
  const W* pos = p.pos != nullptr ? static_cast<const W*>(p.pos) + c0 : nullptr;
  W* out = static_cast<W*>(p.out) + row0 * p.C + c0;
  int64_t t = row0 % p.T;
  for (int r = 0; r < nr; ++r) {
    const float* e = s_e + r * D;
    float acc[V];
    if constexpr (DC == 8) {
      const float4 lo = reinterpret_cast<const float4*>(e)[0];
      const float4 hi = reinterpret_cast<const float4*>(e)[1];
      const float ev[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float a = ev[0] * wr[v][0];
#pragma unroll
        for (int d = 1; d < 8; ++d) a = fmaf(ev[d], wr[v][d], a);
        acc[v] = a;
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = e[0] * to_f(w[(c0 + v) * p.w_stride]);
      for (int64_t d = 1; d < D; ++d) {
        const float ed = e[d];
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = fmaf(ed, to_f(w[(c0 + v) * p.w_stride + d]), acc[v]);
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] += bv[v];
    if (pos != nullptr) {
      const Vec<W, V> pv = *reinterpret_cast<const Vec<W, V>*>(pos + t * p.pos_stride);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += to_f(pv.v[v]);
    }
    Vec<W, V> o;
#pragma unroll
    for (int v = 0; v < V; ++v) o.v[v] = from_f<W>(acc[v]);
    *reinterpret_cast<Vec<W, V>*>(out + r * p.C) = o;
    if (++t == p.T) t = 0;
  }
}

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

template <typename E, typename W, int DC, int V>
void launch_kernel(const VqParams& p, dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  vq_lookup_kernel<E, W, DC, V><<<grid, block, smem, stream>>>(p);
  DF_CUDA_CHECK_LAUNCH("vq_lookup");
}

template <typename E, typename W>
void launch(VqParams p, cudaStream_t stream) {
  constexpr int V4 = 4;
  const bool vec = p.C % V4 == 0 && aligned(p.out, V4 * sizeof(W)) &&
                   (p.pos == nullptr || (aligned(p.pos, V4 * sizeof(W)) && p.pos_stride % V4 == 0));
  const int V = vec ? V4 : 1;
  // Column tiles of at most kMaxThreads groups, balanced: C = 1152, V = 4 -> 288 groups ->
  // 2 tiles of 144 -> 160 threads (5 warps), rather than 256 + 32.
  const int64_t groups = ceil_div(p.C, V);
  const int64_t tiles = ceil_div(groups, kMaxThreads);
  const int64_t threads = ceil_div(ceil_div(groups, tiles), 32) * 32;
  DF_CHECK(tiles <= 65535, "vq_lookup: C = " << p.C << " is too large for the CUDA grid");
  const bool d8 = p.D == 8;
  int64_t rpb = std::min<int64_t>(kMaxRowsPerBlock, ceil_div(p.rows * tiles, kTargetBlocks));
  rpb = std::max<int64_t>(1, std::min<int64_t>(rpb, kSmemFloats / p.D));
  const int64_t row_blocks = ceil_div(p.rows, rpb);
  DF_CHECK(row_blocks <= INT32_MAX, "vq_lookup: B*T = " << p.rows << " is too large for the CUDA grid");
  p.rows_per_block = static_cast<int>(rpb);
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(tiles));
  const dim3 block(static_cast<unsigned>(threads));
  const size_t smem = static_cast<size_t>(rpb * p.D) * sizeof(float);
  if (d8 && vec) {
    launch_kernel<E, W, 8, 4>(p, grid, block, smem, stream);
  } else if (d8) {
    launch_kernel<E, W, 8, 1>(p, grid, block, smem, stream);
  } else if (vec) {
    launch_kernel<E, W, 0, 4>(p, grid, block, smem, stream);
  } else {
    launch_kernel<E, W, 0, 1>(p, grid, block, smem, stream);
  }
}

}  // namespace

void vq_lookup(const int64_t* codes, int64_t B, int64_t T, int64_t codes_stride,
               const void* codebook, int codebook_dtype, int64_t K, int64_t D,
               int64_t codebook_stride, const void* weight, int dtype, int64_t C,
               int64_t weight_stride, const void* bias, const void* pos_embed, int64_t pos_stride,
               void* out, uintptr_t stream) {
  DF_CHECK(B > 0 && T > 0 && K > 0 && C > 0, "vq_lookup: B, T, K, C must be > 0, got "
                                                  << B << ", " << T << ", " << K << ", " << C);
  DF_CHECK(D > 0 && D <= kVqLookupMaxD, "vq_lookup: D must be in [1, " << kVqLookupMaxD
                                                                      << "] on CUDA, got " << D);
  const VqParams p{codes, T,   codes_stride,  B * T,     codebook,   K,   D,   codebook_stride,
                   weight, C,   weight_stride, bias,      pos_embed,  pos_stride, out, 1};
  DF_CUDA_DISPATCH_FLOAT(codebook_dtype, "vq_lookup codebook", [&] {
    using E = scalar_t;
    DF_CUDA_DISPATCH_FLOAT(dtype, "vq_lookup weight", [&] { launch<E, scalar_t>(p, as_stream(stream)); });
  });
}

}  // namespace detailflow::cuda
