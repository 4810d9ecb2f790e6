// code_search on CUDA: index of the nearest L2-normalized codeword for each L2-normalized latent,
// without materializing the N x K distance matrix.
//
// Formula (the contract of csrc/cpu/code_search.cpp, same rounding steps):
//   out[n] = argmin_k ( |e_k|^2 + sum_d (-2 z_n[d]) e_k[d] ),  z_n = x_n / max(|x_n|, 1e-12),
//   e_k = c_k / max(|c_k|, 1e-12) (c_k as is when codebook_normalized), |e_k|^2 from e_k;
//   the FMAs run in d order from |e_k|^2, squares are accumulated with FMAs, sqrt and division
//   are IEEE (no fast math). This is the official |z|^2 + |e|^2 - 2 z.e with the per-row
//   constant |z|^2 dropped. Ties (equal fp32 values) go to the lowest k, as torch.argmin.
// Shapes: latents (N, D), codebook (K, D), unit last stride, any row stride; out (N,) int64.
//   Latents and codebook each fp32, bf16 or fp16; all math in fp32. K < 2^31; D <= 64.
// How: a block of 128 threads owns 128 * R latent rows (R = 4 rows a thread in registers when
//   N is large, else 1) and one contiguous range of codebook tiles (split-K, so that small N
//   still fills the GPU). Per tile of 256 codewords the block normalizes the codewords into
//   shared memory (|e|^2 = +inf for padding past K, so padding never wins) and each thread then
//   walks the tile: two broadcast float4 reads + |e|^2 per codeword, 8 FMAs per row and a
//   strict-'<' update of the row's running (min, index), so the lowest index of equal values
//   is kept. Codewords are renormalized by every block that reads them: K*D work per block,
//   ~1/R of a percent of its search work at 8192 x 8, and no scratch buffer.
//   With one split, the result is written directly. With several, `out` (int64) doubles as the
//   reduction buffer: an init kernel stores key(+inf, 0), each block atomicMin's
//   key(distance, index) = (order-preserving uint32 of the fp32 distance) << 32 | index, which
//   is the lexicographic (value, index) minimum, and a final kernel keeps the index bits. All
//   three run on the caller's stream, so the sequence is graph-capturable.
//   Any other D (<= 64) runs a generic kernel: R = 1, the -2 z rows in shared memory ([d][thread],
//   conflict-free), tiles of 32 codewords.
// NaN: a NaN distance never wins (strict '<'); a row with no distance below +inf gets index 0,
//   as on the CPU.
// Test:  python -m pytest tests/ops/test_code_search.py -q -m gpu
// Bench: python benchmarks/bench_code_search.py --device cuda
#include "code_search_cuda.h"
#include "cuda_common.cuh"

namespace detailflow::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTileFast = 256;   // D = 8: 8 KiB of codewords + 1 KiB of |e|^2
constexpr int kTileGeneric = 32;  // any D <= 64: <= 8.3 KiB tile + 32 KiB of latents
constexpr int64_t kTargetBlocks = 8 * 132;  // ~8 resident 128-thread blocks on each H200 SM
constexpr int64_t kBigN = kThreads * 4 * 16;  // R = 4 from here on: >= 16 row blocks

struct CsParams {
  const void* latents;
  int64_t N, D, lat_stride;
  const void* codebook;
  int64_t K, cb_stride;
  bool normalized;
  int64_t tiles_per_split;
  bool direct;  // one split: write indices, else atomicMin packed keys
  int64_t* out;
};

// fp32 -> uint32 with the same order (-0 is folded into +0 first, so equal values stay equal).
__device__ __forceinline__ unsigned long long pack_key(float dist, int32_t idx) {
  const uint32_t u = __float_as_uint(dist + 0.0f);
  const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(ord) << 32) | static_cast<uint32_t>(idx);
}

__global__ void init_keys_kernel(int64_t* out, int64_t N) {
  const unsigned long long init = pack_key(__int_as_float(0x7f800000), 0);  // (+inf, 0)
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    reinterpret_cast<unsigned long long*>(out)[i] = init;
  }
}

__global__ void keys_to_indices_kernel(int64_t* out, int64_t N) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const unsigned long long key = reinterpret_cast<const unsigned long long*>(out)[i];
    out[i] = static_cast<int64_t>(key & 0xffffffffull);
  }
}

// DC: D at compile time (8) or 0 (runtime D, R must be 1). R: latent rows per thread.
template <typename Z, typename E, int DC, int R>
__global__ void __launch_bounds__(kThreads) code_search_kernel(const CsParams p) {
  static_assert(DC > 0 || R == 1, "the generic-D kernel keeps one row per thread");
  constexpr int TK = DC > 0 ? kTileFast : kTileGeneric;
  extern __shared__ float4 smem4[];  // float4: 16-byte alignment for the D = 8 vector reads
  const int64_t D = DC > 0 ? DC : p.D;
  float* s_e = reinterpret_cast<float*>(smem4);  // [TK][D] normalized codewords
  float* s_esq = s_e + TK * D;                    // [TK] |e|^2, +inf past K
  float* s_z = s_esq + TK;                        // generic D only: [D][kThreads] -2 z
  const int tid = threadIdx.x;
  const float inf = __int_as_float(0x7f800000);

  // -2 * normalized latent rows (zeros for rows past N: computed, never stored)
  const Z* lat = static_cast<const Z*>(p.latents);
  const int64_t row_base = static_cast<int64_t>(blockIdx.x) * (kThreads * R) + tid;
  float zs[R][DC > 0 ? DC : 1];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row_base + r * kThreads;
    const Z* x = lat + (row < p.N ? row : 0) * p.lat_stride;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = to_f(x[d]);
      ss = fmaf(v, v, ss);
    }
    const float n = fmaxf(sqrtf(ss), 1e-12f);
    const float scale = row < p.N ? -2.f : 0.f;
    if constexpr (DC > 0) {
#pragma unroll
      for (int d = 0; d < DC; ++d) zs[r][d] = (to_f(x[d]) / n) * scale;
    } else {
      for (int64_t d = 0; d < D; ++d) s_z[d * kThreads + tid] = (to_f(x[d]) / n) * scale;
    }
  }

  float best[R];
  int32_t best_k[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    best[r] = inf;
    best_k[r] = 0;
  }
  const E* cb = static_cast<const E*>(p.codebook);
  const int64_t ntiles = (p.K + TK - 1) / TK;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * p.tiles_per_split;
  const int64_t t_end = min(t_begin + p.tiles_per_split, ntiles);
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int64_t k0 = tile * TK;
    __syncthreads();  // every thread is done reading the previous tile (and, first time, s_z)
    for (int i = tid; i < TK; i += kThreads) {
      const int64_t k = k0 + i;
      float* e = s_e + i * D;
      if (k < p.K) {
        const E* c = cb + k * p.cb_stride;
        float ss = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float v = to_f(c[d]);
          e[d] = v;
          ss = fmaf(v, v, ss);
        }
        if (!p.normalized) {  // e = c / max(|c|, 1e-12), then |e|^2 of the normalized row
          const float n = fmaxf(sqrtf(ss), 1e-12f);
          ss = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            const float v = e[d] / n;
            e[d] = v;
            ss = fmaf(v, v, ss);
          }
        }
        s_esq[i] = ss;
      } else {
        for (int64_t d = 0; d < D; ++d) e[d] = 0.f;
        s_esq[i] = inf;
      }
    }
    __syncthreads();
    const int32_t kb = static_cast<int32_t>(k0);
    if constexpr (DC == 8) {
      const float4* e4 = reinterpret_cast<const float4*>(s_e);
#pragma unroll 4
      for (int i = 0; i < TK; ++i) {
        const float4 lo = e4[2 * i], hi = e4[2 * i + 1];  // same address in every lane: broadcast
        const float es = s_esq[i];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float acc = fmaf(zs[r][0], lo.x, es);
          acc = fmaf(zs[r][1], lo.y, acc);
          acc = fmaf(zs[r][2], lo.z, acc);
          acc = fmaf(zs[r][3], lo.w, acc);
          acc = fmaf(zs[r][4], hi.x, acc);
          acc = fmaf(zs[r][5], hi.y, acc);
          acc = fmaf(zs[r][6], hi.z, acc);
          acc = fmaf(zs[r][7], hi.w, acc);
          if (acc < best[r]) {
            best[r] = acc;
            best_k[r] = kb + i;
          }
        }
      }
    } else {
      for (int i = 0; i < TK; ++i) {
        const float* e = s_e + i * D;
        float acc = s_esq[i];
        for (int64_t d = 0; d < D; ++d) acc = fmaf(s_z[d * kThreads + tid], e[d], acc);
        if (acc < best[0]) {
          best[0] = acc;
          best_k[0] = kb + i;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row_base + r * kThreads;
    if (row >= p.N) continue;
    if (p.direct) {
      p.out[row] = best_k[r];
    } else if (best[r] < inf) {
      atomicMin(reinterpret_cast<unsigned long long*>(p.out + row), pack_key(best[r], best_k[r]));
    }
  }
}

template <typename Z, typename E, int DC, int R>
void launch_search(CsParams p, int tile, cudaStream_t stream) {
  const int64_t row_blocks = ceil_div(p.N, kThreads * R);
  const int64_t ntiles = ceil_div(p.K, tile);
  int64_t splits = std::min(ntiles, std::max<int64_t>(1, ceil_div(kTargetBlocks, row_blocks)));
  p.tiles_per_split = ceil_div(ntiles, splits);
  splits = ceil_div(ntiles, p.tiles_per_split);  // no empty split
  p.direct = splits == 1;
  DF_CHECK(row_blocks <= INT32_MAX, "code_search: N = " << p.N << " is too large for the CUDA grid");
  const size_t smem = static_cast<size_t>(tile * p.D + tile + (DC > 0 ? 0 : p.D * kThreads)) * sizeof(float);
  const int fill_blocks = static_cast<int>(std::min<int64_t>(ceil_div(p.N, 256), 4096));
  if (!p.direct) {
    init_keys_kernel<<<fill_blocks, 256, 0, stream>>>(p.out, p.N);
    DF_CUDA_CHECK_LAUNCH("code_search (init)");
  }
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  code_search_kernel<Z, E, DC, R><<<grid, kThreads, smem, stream>>>(p);
  DF_CUDA_CHECK_LAUNCH("code_search");
  if (!p.direct) {
    keys_to_indices_kernel<<<fill_blocks, 256, 0, stream>>>(p.out, p.N);
    DF_CUDA_CHECK_LAUNCH("code_search (finalize)");
  }
}

}  // namespace

void code_search(const void* latents, int latents_dtype, int64_t N, int64_t D,
                 int64_t latents_stride, const void* codebook, int codebook_dtype, int64_t K,
                 int64_t codebook_stride, bool codebook_normalized, int64_t* out,
                 uintptr_t stream) {
  DF_CHECK(N > 0 && K > 0, "code_search: N and K must be > 0, got " << N << ", " << K);
  DF_CHECK(K <= INT32_MAX, "code_search: K must be < 2^31 (int32 indices), got " << K);
  DF_CHECK(D > 0 && D <= kCodeSearchMaxD,
           "code_search: D must be in [1, " << kCodeSearchMaxD << "] on CUDA, got " << D);
  const CsParams p{latents, N, D, latents_stride, codebook, K, codebook_stride,
                   codebook_normalized, 1, true, out};
  const cudaStream_t s = as_stream(stream);
  DF_CUDA_DISPATCH_FLOAT(latents_dtype, "code_search latents", [&] {
    using Z = scalar_t;
    DF_CUDA_DISPATCH_FLOAT(codebook_dtype, "code_search codebook", [&] {
      using E = scalar_t;
      if (D == 8 && N >= kBigN) {
        launch_search<Z, E, 8, 4>(p, kTileFast, s);
      } else if (D == 8) {
        launch_search<Z, E, 8, 1>(p, kTileFast, s);
      } else {
        launch_search<Z, E, 0, 1>(p, kTileGeneric, s);
      }
    });
  });
}

}  // namespace detailflow::cuda
