// code_search: index of the nearest L2-normalized codeword for each L2-normalized latent,
// without materializing the N x K distance matrix.
//
// Formula:  out[n] = argmin_k ( |e_k|^2 - 2 z_n . e_k ),   z_n = x_n / max(|x_n|, 1e-12),
//           e_k = c_k / max(|c_k|, 1e-12)  (c_k as is when codebook_normalized).
//   This is the official VectorQuantizer's argmin of |z|^2 + |e|^2 - 2 z.e with the per-row
//   constant |z|^2 dropped; ties go to the lowest k, as with torch.argmin.
// Shapes: latents (N, D), codebook (K, D), unit last stride, any row stride; out (N,) int64.
//   Either input float32 or bf16 (independently); all math in fp32. K < 2^31 - 64 (int32 lanes).
// How: per call the codebook is normalized and packed into tiles of W codewords, laid out
//   [tile][d][lane], plus |e|^2 per lane; padding lanes get |e|^2 = +inf so they never win
//   (threads split the tiles; ~15 us for 8192 x 8). Then a thread takes a block of R latent rows
//   (normalized and scaled by -2 on the stack) and walks all tiles: the tile's D vectors stay in
//   registers and each row does D FMAs (acc = |e|^2 + sum_d (-2 z_d) e_d) and a strict-'<'
//   update of its per-lane running minimum and index, so every lane keeps its lowest index; a
//   final cross-lane reduction breaks exact value ties by lowest index. Memory is O(K D) (the
//   packed codebook: 288 KiB at 8192 x 8, L2-resident), never N x K.
// Variants, chosen at run time with __builtin_cpu_supports (same source, GCC vector types):
//   avx512f   W = 16, R = 8: 8 tile + 16 min/index + |e|^2 + index vectors fit 32 zmm registers;
//   avx2+fma  W = 8,  R = 4 (16 ymm registers; some spills to L1, cheap);
//   portable  W = 4,  R = 4 (SSE2, no FMA).
//   D == 8 (the released 8192 x 8 codebook) is compiled with D fixed so the tile lives in
//   registers; any other D runs the same loop with D read at run time.
// NaN inputs: a row whose every distance is NaN gets index 0 (as torch.argmin); a NaN codeword
//   never wins (torch.argmin would pick it). Not a case the quantizer produces.
// Test:  python -m pytest tests/ops/test_code_search.py -q
// Bench: python benchmarks/bench_code_search.py   (vs argmin(|z|^2 + |e|^2 - 2 z @ e.T))
#include "code_search.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "dispatch.h"

namespace detailflow::cpu {
namespace {

#define DF_INLINE inline __attribute__((always_inline))

// GCC vector types; their width only becomes real code inside the target-attributed callers.
template <int W>
struct Lanes;
template <>
struct Lanes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};
template <>
struct Lanes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Lanes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};

// y = scale * x / max(|x|, 1e-12) in fp32 (F.normalize, then an exact power-of-two scale).
template <typename T>
DF_INLINE void normalize_row(const T* x, int64_t D, float scale, float* y) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float v = to_float(x[d]);
    ss += v * v;
  }
  const float n = std::max(std::sqrt(ss), 1e-12f);
  for (int64_t d = 0; d < D; ++d) y[d] = (to_float(x[d]) / n) * scale;
}

// Tile t of the packed codebook: tile[d * W + l] = e_{t*W+l}[d] (0 past K) and esq[l] = |e|^2
// (+inf past K, so padding lanes never win). After the transposing copy every loop runs over
// the W lanes (omp simd: vsqrtps / vdivps instead of W scalar square roots and W*D divisions).
template <int W, int DC, typename E>
DF_INLINE void pack_tile(const E* cb, int64_t K, int64_t D, int64_t stride, bool normalized,
                         int64_t t, float* __restrict tile, float* __restrict esq) {
  const int64_t Dn = DC > 0 ? DC : D;
  const int64_t k0 = t * W;
  for (int l = 0; l < W; ++l) {
    if (k0 + l < K) {
      const E* row = cb + (k0 + l) * stride;
      for (int64_t d = 0; d < Dn; ++d) tile[d * W + l] = to_float(row[d]);
    } else {
      for (int64_t d = 0; d < Dn; ++d) tile[d * W + l] = 0.f;
    }
  }
  float ss[W], n[W];
#pragma omp simd
  for (int l = 0; l < W; ++l) ss[l] = 0.f;
  for (int64_t d = 0; d < Dn; ++d) {
#pragma omp simd
    for (int l = 0; l < W; ++l) ss[l] += tile[d * W + l] * tile[d * W + l];
  }
  if (!normalized) {  // e = c / max(|c|, 1e-12), then |e|^2 of the normalized row
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      n[l] = std::max(std::sqrt(ss[l]), 1e-12f);
      ss[l] = 0.f;
    }
    for (int64_t d = 0; d < Dn; ++d) {
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        tile[d * W + l] = tile[d * W + l] / n[l];
        ss[l] += tile[d * W + l] * tile[d * W + l];
      }
    }
  }
#pragma omp simd
  for (int l = 0; l < W; ++l) {
    esq[l] = k0 + l < K ? ss[l] : std::numeric_limits<float>::infinity();
  }
}

// Rows [0, rows) of one block of R latent rows against every tile; DC = D at compile time or 0.
template <int W, int R, int DC, typename Z>
DF_INLINE void search_block(const Z* lat, int64_t rows, int64_t D, int64_t lat_stride,
                            const float* packed, const float* esq, int64_t ntiles, int64_t* out) {
  typedef typename Lanes<W>::F V;
  typedef typename Lanes<W>::I VI;
  // -2 * normalized latents (padding rows zero; their results are dropped)
  float zs_fixed[R * (DC > 0 ? DC : 1)];
  std::vector<float> zs_dyn;
  float* zs = zs_fixed;
  if (DC == 0) {
    zs_dyn.resize(R * D);
    zs = zs_dyn.data();
  }
  const int64_t Dn = DC > 0 ? DC : D;
  for (int r = 0; r < R; ++r) {
    if (r < rows) {
      normalize_row(lat + r * lat_stride, Dn, -2.f, zs + r * Dn);
    } else {
      for (int64_t d = 0; d < Dn; ++d) zs[r * Dn + d] = 0.f;
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  VI kidx;
  for (int l = 0; l < W; ++l) kidx[l] = l;
  V vmin[R];
  VI vidx[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    vmin[r] = V{} + inf;
    vidx[r] = kidx;
  }
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* tp = packed + t * Dn * W;
    V es;
    std::memcpy(&es, esq + t * W, sizeof(V));
    if constexpr (DC > 0) {
      V e[DC];
#pragma GCC unroll 16
      for (int d = 0; d < DC; ++d) std::memcpy(&e[d], tp + d * W, sizeof(V));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        V acc = es;
#pragma GCC unroll 16
        for (int d = 0; d < DC; ++d) acc += zs[r * DC + d] * e[d];
        const VI lt = acc < vmin[r];
        vmin[r] = lt ? acc : vmin[r];
        vidx[r] = lt ? kidx : vidx[r];
      }
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        V acc = es;
        for (int64_t d = 0; d < D; ++d) {
          V e;
          std::memcpy(&e, tp + d * W, sizeof(V));
          acc += zs[r * D + d] * e;
        }
        const VI lt = acc < vmin[r];
        vmin[r] = lt ? acc : vmin[r];
        vidx[r] = lt ? kidx : vidx[r];
      }
    }
    kidx += W;
  }
  for (int r = 0; r < rows; ++r) {
    float best = vmin[r][0];
    int32_t bi = vidx[r][0];
    for (int l = 1; l < W; ++l) {
      const float v = vmin[r][l];
      const int32_t i = vidx[r][l];
      if (v < best || (v == best && i < bi)) {
        best = v;
        bi = i;
      }
    }
    out[r] = bi;
  }
}

// One parallel region per ISA: pack the codebook (tiles split over threads), barrier, then
// search (row blocks split over threads). The pragmas must sit in the target-attributed function
// so that the outlined bodies are compiled for that ISA too.
#define DF_CODE_SEARCH_VARIANT(NAME, TARGET, W, R)                                           \
  template <typename Z, typename E>                                                         \
  TARGET void NAME(const Z* lat, int64_t N, int64_t D, int64_t ls, const E* cb, int64_t K,  \
                   int64_t cbs, bool normalized, float* packed, float* esq, int64_t* out,   \
                   int num_threads) {                                                       \
    const int64_t ntiles = (K + (W) - 1) / (W);                                             \
    const int64_t nblocks = (N + (R) - 1) / (R);                                            \
    _Pragma("omp parallel num_threads(num_threads)") {                                      \
      _Pragma("omp for schedule(static)")                                                   \
      for (int64_t t = 0; t < ntiles; ++t) {                                                \
        if (D == 8) {                                                                       \
          pack_tile<W, 8>(cb, K, D, cbs, normalized, t, packed + t * D * (W), esq + t * (W)); \
        } else {                                                                            \
          pack_tile<W, 0>(cb, K, D, cbs, normalized, t, packed + t * D * (W), esq + t * (W)); \
        }                                                                                   \
      }                                                                                     \
      _Pragma("omp for schedule(static)")                                                   \
      for (int64_t b = 0; b < nblocks; ++b) {                                               \
        const int64_t r0 = b * (R);                                                         \
        const int64_t rows = std::min<int64_t>((R), N - r0);                                \
        if (D == 8) {                                                                       \
          search_block<W, R, 8>(lat + r0 * ls, rows, D, ls, packed, esq, ntiles, out + r0); \
        } else {                                                                            \
          search_block<W, R, 0>(lat + r0 * ls, rows, D, ls, packed, esq, ntiles, out + r0); \
        }                                                                                   \
      }                                                                                     \
    }                                                                                       \
  }

DF_CODE_SEARCH_VARIANT(search_avx512, __attribute__((target("avx512f"))), 16, 8)
DF_CODE_SEARCH_VARIANT(search_avx2, __attribute__((target("avx2,fma"))), 8, 4)
DF_CODE_SEARCH_VARIANT(search_portable, , 4, 4)
#undef DF_CODE_SEARCH_VARIANT

int lanes_for_this_cpu() {
  if (__builtin_cpu_supports("avx512f")) return 16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
  return 4;
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

}  // namespace

template <typename Z, typename E>
void code_search(const Z* latents, int64_t N, int64_t D, int64_t latents_stride,
                 const E* codebook, int64_t K, int64_t codebook_stride, bool codebook_normalized,
                 int64_t* out, int num_threads) {
  const int W = lanes_for_this_cpu();
  const int64_t ntiles = (K + W - 1) / W;
  // packed tiles then |e|^2, 64-byte aligned (aligned_alloc wants a multiple of the alignment)
  const size_t n_floats = static_cast<size_t>(ntiles * W * (D + 1));
  const size_t bytes = (n_floats * sizeof(float) + 63) / 64 * 64;
  std::unique_ptr<float, FreeDeleter> buf(static_cast<float*>(std::aligned_alloc(64, bytes)));
  if (!buf) throw std::bad_alloc();
  float* packed = buf.get();
  float* esq = packed + ntiles * W * D;
  switch (W) {
    case 16:
      search_avx512(latents, N, D, latents_stride, codebook, K, codebook_stride,
                    codebook_normalized, packed, esq, out, num_threads);
      break;
    case 8:
      search_avx2(latents, N, D, latents_stride, codebook, K, codebook_stride,
                  codebook_normalized, packed, esq, out, num_threads);
      break;
    default:
      search_portable(latents, N, D, latents_stride, codebook, K, codebook_stride,
                      codebook_normalized, packed, esq, out, num_threads);
  }
}

#define DF_INSTANTIATE(Z, E)                                                                    \
  template void code_search<Z, E>(const Z*, int64_t, int64_t, int64_t, const E*, int64_t,      \
                                  int64_t, bool, int64_t*, int);
DF_FOR_CPU_FLOAT_PAIRS(DF_INSTANTIATE)
#undef DF_INSTANTIATE

}  // namespace detailflow::cpu
