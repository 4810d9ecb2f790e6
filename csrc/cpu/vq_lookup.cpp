// vq_lookup: the VQ decode front end (codes -> decoder input tokens) in one pass.
//
// Formula:  out[b, t, c] = sum_d weight[c, d] * e[d] / max(|e|, 1e-12) + bias[c] + pos_embed[t, c],
//           e = codebook[codes[b, t]]   (the raw codebook: normalizing is part of the op).
//   = F.linear(F.normalize(codebook[codes]), weight, bias) + pos_embed[:T]: the official
//   get_codebook_entry -> post_quant_conv -> "+ latent_pos_embed[:, :t]" of the decoder.
// Shapes: codes (B, T) int64 in [0, K); codebook (K, D); weight (C, D); bias (C,) or none;
//   pos_embed (T_max >= T, C) or none; out contiguous (B, T, C). Unit last strides, any row
//   strides. The codebook dtype (E) and the weight dtype (W: weight, bias, pos_embed, out) are
//   each float32 or bf16; accumulation in fp32, one rounding to W at the store.
// How: per call the weight is transposed to fp32 (D, C) (6 K values for 768 x 8) and the bias
//   converted to fp32, so the inner loop runs along C contiguously: each output is D FMAs with
//   the normalized row's D values broadcast, + bias + pos, one rounding, one store. OpenMP splits
//   the B*T rows into one contiguous chunk per thread. With D = 8 a thread does blocks of RB
//   rows at a time (same b, consecutive t) so each weight vector is loaded once per block: RB = 4
//   for fp32 output, 1 for bf16 (measured, see project_rows). The op is store-bound (B*T*C
//   outputs, D multiply-adds each); the torch composition writes the output twice (linear, then
//   + pos) and reads it once more.
// Variants, chosen at run time with __builtin_cpu_supports (same source, compiled per target):
//   avx512f+avx512bw / avx2+fma / portable (SSE2). D == 8 (the released codebook) is compiled
//   with D fixed; any other D accumulates the C-row in an fp32 scratch row, one pass per d.
// Codes are range-checked before anything is written (the caller raises on a bad one).
// Test:  python -m pytest tests/ops/test_vq_lookup.py -q
// Bench: python benchmarks/bench_vq_lookup.py
#include "vq_lookup.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dispatch.h"

namespace detailflow::cpu {
namespace {

#define DF_INLINE inline __attribute__((always_inline))

// fp32 -> output dtype, branch-free so the store loop vectorizes (dispatch.h).
template <typename T>
DF_INLINE void store(float v, T* o) { store_float(v, o); }

// y = x / max(|x|, 1e-12) in fp32, as F.normalize.
template <typename E>
DF_INLINE void normalize_row(const E* __restrict x, int64_t D, float* __restrict y) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float v = to_float(x[d]);
    ss += v * v;
  }
  const float n = std::max(std::sqrt(ss), 1e-12f);
  for (int64_t d = 0; d < D; ++d) y[d] = to_float(x[d]) / n;
}

// RB consecutive output rows (same b, positions t..t+RB-1) with D = 8 fixed: each weight vector
// loaded once serves RB rows. e_raw[r] = raw codebook row of row r; pos, out point at row 0.
template <int RB, bool HasPos, typename E, typename W>
DF_INLINE void project_block8(const E* const* e_raw, const float* __restrict wt, int64_t C,
                              const float* __restrict bias, const W* __restrict pos,
                              int64_t pos_stride, W* __restrict out) {
  float e[RB][8];
  for (int r = 0; r < RB; ++r) normalize_row(e_raw[r], 8, e[r]);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float a[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) a[r] = e[r][0] * wt[c];
#pragma GCC unroll 8
    for (int d = 1; d < 8; ++d) {
      const float w = wt[d * C + c];
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) a[r] += e[r][d] * w;
    }
    const float bc = bias[c];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      float v = a[r] + bc;
      if constexpr (HasPos) v += to_float(pos[r * pos_stride + c]);
      store(v, out + r * C + c);
    }
  }
}

// One output row for any D: accumulate in the fp32 scratch row `acc` (C floats), one pass per d.
template <bool HasPos, typename E, typename W>
DF_INLINE void project_row_any_d(const E* __restrict e_raw, int64_t D, const float* __restrict wt,
                                 int64_t C, const float* __restrict bias, const W* __restrict pos,
                                 W* __restrict out, float* __restrict en, float* __restrict acc) {
  normalize_row(e_raw, D, en);
  for (int64_t c = 0; c < C; ++c) acc[c] = en[0] * wt[c];
  for (int64_t d = 1; d < D; ++d) {
    const float ed = en[d];
    const float* __restrict w = wt + d * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += ed * w[c];
  }
  for (int64_t c = 0; c < C; ++c) {
    float v = acc[c] + bias[c];
    if constexpr (HasPos) v += to_float(pos[c]);
    store(v, out + c);
  }
}

// Flat rows [row_begin, row_end) of the (B*T, C) output.
template <bool HasPos, typename E, typename W>
DF_INLINE void project_rows(const int64_t* codes, int64_t T, int64_t codes_stride,
                            const E* codebook, int64_t D, int64_t cb_stride, const float* wt,
                            int64_t C, const float* bias, const W* pos, int64_t pos_stride, W* out,
                            int64_t row_begin, int64_t row_end, float* en, float* acc) {
  // Rows per block, measured on Zen 5 (B = 1..64, C = 768): fp32 out 4 rows (~1.5x over 1 row:
  // the 8 weight vectors are loaded once per 4 rows); bf16 out 1 row (with more rows gcc's
  // vectorized bf16 rounding spills and runs ~1.5x slower).
  constexpr int RB = std::is_same_v<W, float> ? 4 : 1;
  for (int64_t row = row_begin; row < row_end;) {
    const int64_t b = row / T, t = row % T;
    const W* p = HasPos ? pos + t * pos_stride : nullptr;
    const int64_t* k = codes + b * codes_stride + t;
    if (D != 8) {
      project_row_any_d<HasPos>(codebook + k[0] * cb_stride, D, wt, C, bias, p, out + row * C,
                                en, acc);
      row += 1;
    } else if (row + RB <= row_end && t + RB <= T) {
      const E* e[RB];
      for (int r = 0; r < RB; ++r) e[r] = codebook + k[r] * cb_stride;
      project_block8<RB, HasPos>(e, wt, C, bias, p, pos_stride, out + row * C);
      row += RB;
    } else {
      const E* e[1] = {codebook + k[0] * cb_stride};
      project_block8<1, HasPos>(e, wt, C, bias, p, pos_stride, out + row * C);
      row += 1;
    }
  }
}

// One OpenMP loop per ISA, inside the target-attributed function so that its outlined body is
// compiled for that ISA too. Rows go to threads in contiguous chunks (static schedule).
#define DF_VQ_LOOKUP_VARIANT(NAME, TARGET)                                                    \
  template <typename E, typename W>                                                          \
  TARGET void NAME(const int64_t* codes, int64_t B, int64_t T, int64_t cs, const E* codebook, \
                   int64_t D, int64_t cbs, const float* wt, int64_t C, const float* bias,    \
                   const W* pos, int64_t ps, W* out, int num_threads) {                      \
    const int64_t rows = B * T;                                                              \
    _Pragma("omp parallel num_threads(num_threads)") {                                       \
      std::vector<float> scratch(D == 8 ? 0 : D + C);                                        \
      float* en = scratch.data();                                                            \
      float* acc = D == 8 ? nullptr : en + D;                                                \
      const int nt = omp_get_num_threads(), tid = omp_get_thread_num();                      \
      const int64_t begin = rows * tid / nt, end = rows * (tid + 1) / nt;                    \
      if (pos != nullptr) {                                                                  \
        project_rows<true>(codes, T, cs, codebook, D, cbs, wt, C, bias, pos, ps, out, begin, \
                           end, en, acc);                                                    \
      } else {                                                                               \
        project_rows<false>(codes, T, cs, codebook, D, cbs, wt, C, bias, pos, ps, out,       \
                            begin, end, en, acc);                                            \
      }                                                                                      \
    }                                                                                        \
  }

DF_VQ_LOOKUP_VARIANT(lookup_avx512, __attribute__((target("avx512f,avx512bw,avx512vl,fma"))))
DF_VQ_LOOKUP_VARIANT(lookup_avx2, __attribute__((target("avx2,fma"))))
DF_VQ_LOOKUP_VARIANT(lookup_portable, )
#undef DF_VQ_LOOKUP_VARIANT

}  // namespace

template <typename E, typename W>
int64_t vq_lookup(const int64_t* codes, int64_t B, int64_t T, int64_t codes_stride,
                  const E* codebook, int64_t K, int64_t D, int64_t codebook_stride,
                  const W* weight, int64_t C, int64_t weight_stride, const W* bias,
                  const W* pos_embed, int64_t pos_stride, W* out, int num_threads) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t k = codes[b * codes_stride + t];
      if (k < 0 || k >= K) return b * T + t;
    }
  }
  // weight -> fp32 (D, C), bias -> fp32 (zeros when absent: x + 0 == x for every finite x)
  std::vector<float> wt(static_cast<size_t>(D * C)), bf(static_cast<size_t>(C), 0.f);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t d = 0; d < D; ++d) wt[d * C + c] = to_float(weight[c * weight_stride + d]);
    if (bias != nullptr) bf[c] = to_float(bias[c]);
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    lookup_avx512(codes, B, T, codes_stride, codebook, D, codebook_stride, wt.data(), C,
                  bf.data(), pos_embed, pos_stride, out, num_threads);
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    lookup_avx2(codes, B, T, codes_stride, codebook, D, codebook_stride, wt.data(), C,
                bf.data(), pos_embed, pos_stride, out, num_threads);
  } else {
    lookup_portable(codes, B, T, codes_stride, codebook, D, codebook_stride, wt.data(), C,
                    bf.data(), pos_embed, pos_stride, out, num_threads);
  }
  return -1;
}

#define DF_INSTANTIATE(E, W)                                                                  \
  template int64_t vq_lookup<E, W>(const int64_t*, int64_t, int64_t, int64_t, const E*,      \
                                   int64_t, int64_t, int64_t, const W*, int64_t, int64_t,    \
                                   const W*, const W*, int64_t, W*, int);
DF_FOR_CPU_FLOAT_PAIRS(DF_INSTANTIATE)
#undef DF_INSTANTIATE

}  // namespace detailflow::cpu
