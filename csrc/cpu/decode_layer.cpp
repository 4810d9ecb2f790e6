// decode_layer (CPU): one prior layer for one decode step in one call, no Python between ops.
//
// Why: on the small embedded model (6 layers x 256 wide) each op of a step is a few
// microseconds of work, and the per-op path spent as long again in Python between them
// (wrapper checks, allocations, dispatch). Here the whole layer is one extension call.
//
// Formula (decode_layer.h), the per-op path's composition in prior.py:
//   qkv = y @ wqkv^T;  q, k rotated (rope_qkv);  attn = cache_attention(q, k, v, caches, start)
//   h1 = h + attn @ wo^T;  y1 = rmsnorm(h1) * ffn_norm                         (add_rmsnorm)
//   h2 = h1 + (silu(y1 @ w1^T) * (y1 @ w3^T)) @ w2^T;  y2 = rmsnorm(h2) * next_norm
//
// The heavy parts are the existing kernels, called as C++ functions: decode_gemm through
// decode_gemm_packed (packed_weight.h: any packed format) and cache_attention, which reads q,
// k, v straight out of the qkv buffer (strided views) and writes its output as the (M, dim)
// rows that wo reads. So those parts are the same bits as the per-op path, and batch- and
// thread-invariant as those kernels are. The pointwise stages between them (rotary, residual
// add + RMSNorm, SiLU * w3) run on the calling thread: at decode sizes they are a few
// thousand elements, less than an OpenMP region's barrier. Six parallel regions a layer (five
// GEMMs, the attention).
//
// Roundings, as the per-op path (this file is compiled with -ffp-contract=off, so no FMA
// merges two of torch's roundings into one):
//   - rotary: fp32 x0 * cos - x1 * sin and x1 * cos + x0 * sin, one rounding to T (= rope_qkv_ref);
//   - residual add in fp32, rounded to T; RMSNorm statistics in fp32 with the sum of squares
//     in torch's own order (torch_sum below, SumKernel.cpp's cascade for a contiguous row),
//     mean = sum / dim, 1 / sqrt(mean + eps); the normalized row rounded to T, then times the
//     weight rounded to T (= add_rmsnorm_ref);
//   - silu(a) = a / (1 + exp(-a)) in fp32 rounded to T, times w3's output rounded to T.
//     Not bit-identical to torch: exp is fast_exp.h's polynomial (rel. error ~2e-7), torch
//     uses Sleef. This is the one place where the fused layer may differ from the per-op
//     path (by an ulp of the SiLU), within the ops' tolerances.
//
// Test:  python -m pytest tests/ops/test_decode_layer.py -q
// Bench: python benchmarks/bench_decode_layer.py   (fused vs the per-op composition)
#include "decode_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cache_attention.h"
#include "fast_exp.h"

namespace detailflow::cpu {
namespace {

inline float widen(float v) { return v; }
inline float widen(bf16 v) { return to_float(v); }

// fp32 -> T: torch's rounding, branch-free so the loops vectorise (dispatch.h).
template <typename T>
inline void narrow(float v, T* out) { store_float(v, out); }
template <typename T>
inline float round_trip(float v) {  // v rounded to T and back (exact for float)
  T t;
  narrow(v, &t);
  return widen(t);
}

int64_t ceil_log2(int64_t x) {  // c10 CeilLog2
  if (x <= 2) return 1;
  int64_t bits = 0;
  for (uint64_t v = static_cast<uint64_t>(x) - 1; v; v >>= 1) ++bits;
  return bits;
}

// sum of v[0 .. n) in torch's order for a contiguous fp32 row (aten/src/ATen/native/cpu/
// SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum): vectors of W lanes, 4
// of them summed side by side (ILP) through a 4-level cascade, the leftover vectors into the
// first, the 4 combined, then the leftover scalars from 0 and the W lanes onto them in order.
// W is the lane count torch's sum kernel uses (8 on torch 2.13, AVX-512 or not), probed by the wrapper.
float torch_sum(const float* v, int64_t n, int W) {
  constexpr int kIlp = 4, kLevels = 4, kMaxW = 16;
  const int64_t vecs = n / W, rows = vecs / kIlp;
  const int64_t power = std::max<int64_t>(4, ceil_log2(rows) / kLevels);
  const int64_t step = int64_t(1) << power, mask = step - 1;
  float acc[kLevels][kIlp][kMaxW] = {};
  auto add_row = [&](float (&dst)[kIlp][kMaxW], int64_t i) {
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < W; ++l) dst[k][l] += v[(i * kIlp + k) * W + l];
  };
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++i) add_row(acc[0], i);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_row(acc[0], i);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t r = rows * kIlp; r < vecs; ++r)
    for (int l = 0; l < W; ++l) acc[0][0][l] += v[r * W + l];
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.0f;
  for (int64_t k = vecs * W; k < n; ++k) total += v[k];
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

// ------------------------------------------------------------------ pointwise stages
// Written once as always-inline bodies, compiled per ISA below (gcc vectorises the loops).

// Rotary on the q and k parts of each qkv row, in place: row m is step position m % n.
// The even and odd outputs are computed in separate loops into `work` (d floats): written as
// one loop, gcc 12's SLP vectoriser turns the mul/sub/mul/add pattern into vfmaddsub even
// under -ffp-contract=off, which rounds once where torch rounds twice.
template <typename T>
inline __attribute__((always_inline)) void rope_body(T* qkv, int64_t M, int64_t n, int64_t dim,
                                                     int64_t d, const float* freqs, float* work) {
  const int64_t pairs = d / 2, heads = dim / d;
  float* even = work;
  float* odd = work + pairs;
  for (int64_t m = 0; m < M; ++m) {
    const float* f = freqs + (m % n) * pairs * 2;
    for (int64_t part = 0; part < 2; ++part) {  // q, then k
      for (int64_t hh = 0; hh < heads; ++hh) {
        T* x = qkv + m * 3 * dim + part * dim + hh * d;
        for (int64_t j = 0; j < pairs; ++j) even[j] = widen(x[2 * j]) * f[2 * j] - widen(x[2 * j + 1]) * f[2 * j + 1];
        for (int64_t j = 0; j < pairs; ++j) odd[j] = widen(x[2 * j + 1]) * f[2 * j] + widen(x[2 * j]) * f[2 * j + 1];
        for (int64_t j = 0; j < pairs; ++j) {
          narrow(even[j], &x[2 * j]);
          narrow(odd[j], &x[2 * j + 1]);
        }
      }
    }
  }
}

// h_out = h + delta (rounded to T), y = rmsnorm(h_out) * weight; `work` holds 2 * dim floats.
// delta null: y = rmsnorm(h) * weight and h_out is not written (a norm without a residual).
template <typename T>
inline __attribute__((always_inline)) void add_rmsnorm_body(const T* h, int64_t ldh, const T* delta,
                                                            const T* weight, int64_t M, int64_t dim,
                                                            float eps, int W, T* h_out, T* y,
                                                            float* work) {
  float* hf = work;
  float* sq = work + dim;
  for (int64_t m = 0; m < M; ++m) {
    const T* hr = h + m * ldh;
    if (delta != nullptr) {
      const T* dr = delta + m * dim;
      T* ho = h_out + m * dim;
      for (int64_t k = 0; k < dim; ++k) hf[k] = round_trip<T>(widen(hr[k]) + widen(dr[k]));
      for (int64_t k = 0; k < dim; ++k) narrow(hf[k], &ho[k]);
    } else {
      for (int64_t k = 0; k < dim; ++k) hf[k] = widen(hr[k]);
    }
    for (int64_t k = 0; k < dim; ++k) sq[k] = hf[k] * hf[k];
    const float mean = torch_sum(sq, dim, W) / static_cast<float>(dim);
    const float r = 1.0f / std::sqrt(mean + eps);
    T* yr = y + m * dim;
    for (int64_t k = 0; k < dim; ++k) narrow(round_trip<T>(hf[k] * r) * widen(weight[k]), &yr[k]);
  }
}

// a = silu(a) * b elementwise over M x F (rounded to T after the SiLU and after the product).
template <typename T>
inline __attribute__((always_inline)) void silu_mul_body(T* a, const T* b, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float x = widen(a[i]);
    // exp(-x) from exp_nonpos: e = exp(-|x|), and exp(-x) = 1 / e for x < 0, so
    // x / (1 + exp(-x)) = x * e / (e + 1) there (no overflow to inf for very negative x).
    const float e = exp_nonpos(-std::fabs(x));
    const float num = x < 0.0f ? x * e : x;
    narrow(round_trip<T>(num / (1.0f + e)) * widen(b[i]), &a[i]);
  }
}

template <typename T>
struct Pointwise {
  void (*rope)(T*, int64_t, int64_t, int64_t, int64_t, const float*, float*);
  void (*add_rmsnorm)(const T*, int64_t, const T*, const T*, int64_t, int64_t, float, int, T*, T*, float*);
  void (*silu_mul)(T*, const T*, int64_t);
};

#define DF_POINTWISE_ISA(suffix, attr)                                                                 \
  template <typename T>                                                                                \
  attr void rope_##suffix(T* q, int64_t M, int64_t n, int64_t dim, int64_t d, const float* f,          \
                          float* work) {                                                               \
    rope_body(q, M, n, dim, d, f, work);                                                               \
  }                                                                                                    \
  template <typename T>                                                                                \
  attr void add_rmsnorm_##suffix(const T* h, int64_t ldh, const T* dl, const T* w, int64_t M,            \
                                 int64_t dim, float eps, int W, T* ho, T* y, float* work) {            \
    add_rmsnorm_body(h, ldh, dl, w, M, dim, eps, W, ho, y, work);                                      \
  }                                                                                                    \
  template <typename T>                                                                                \
  attr void silu_mul_##suffix(T* a, const T* b, int64_t count) {                                        \
    silu_mul_body(a, b, count);                                                                        \
  }                                                                                                    \
  template <typename T>                                                                                \
  Pointwise<T> pointwise_##suffix() {                                                                  \
    return {&rope_##suffix<T>, &add_rmsnorm_##suffix<T>, &silu_mul_##suffix<T>};                      \
  }

DF_POINTWISE_ISA(base, )
#if defined(__x86_64__)
DF_POINTWISE_ISA(avx2, __attribute__((target("avx2"))))
DF_POINTWISE_ISA(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2"))))
#endif
#undef DF_POINTWISE_ISA

template <typename T>
Pointwise<T> pick_pointwise() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return pointwise_avx512<T>();
  if (__builtin_cpu_supports("avx2")) return pointwise_avx2<T>();
#endif
  return pointwise_base<T>();
}

}  // namespace

template <typename T>
void decode_layer(const DecodeLayerArgs<T>& a, int num_threads) {
  static const Pointwise<T> pw = pick_pointwise<T>();
  const int64_t M = a.B * a.n, dim = a.H * a.d, F = a.w1.N;
  // Scratch, allocated once per thread and grown when a call needs more: qkv (M, 3 dim), the
  // attention output (M, dim), the residual deltas (M, dim), y1 (M, dim), w1 and w3 outputs
  // (M, F each), and 2 dim floats for the norm and the rotary.
  thread_local std::vector<T> buf;
  thread_local std::vector<float> work;
  const size_t need = static_cast<size_t>(M * (6 * dim + 2 * F));
  if (buf.size() < need) buf.resize(need);
  if (work.size() < static_cast<size_t>(2 * dim)) work.resize(2 * dim);
  T* qkv = buf.data();
  T* attn = qkv + M * 3 * dim;
  T* delta = attn + M * dim;
  T* y1 = delta + M * dim;
  T* up = y1 + M * dim;   // silu(w1 y1) * (w3 y1), in place
  T* gate = up + M * F;   // w3 y1

  decode_gemm_packed(a.y, M, a.ldy, a.wqkv, qkv, 3 * dim, num_threads);
  pw.rope(qkv, M, a.n, dim, a.d, a.freqs, work.data());
  // q, k, v are (B, H, n, d) views of qkv's (B, n, 3, H, d) rows; attn is written as (B, n, H, d).
  const BhnStrides qkv_s{a.n * 3 * dim, a.d, 3 * dim}, attn_s{a.n * dim, a.d, dim};
  cache_attention<T>(qkv, qkv_s, qkv + dim, qkv_s, qkv + 2 * dim, qkv_s, a.k_cache, a.v_cache, attn, attn_s,
                     a.B, a.H, a.n, a.d, a.L_max, a.start, a.scale, num_threads);
  decode_gemm_packed(attn, M, dim, a.wo, delta, dim, num_threads);
  pw.add_rmsnorm(a.h, a.ldh, delta, a.ffn_norm, M, dim, a.eps, a.sum_lanes, a.h_out, y1, work.data());

  decode_gemm_packed(y1, M, dim, a.w1, up, F, num_threads);
  decode_gemm_packed(y1, M, dim, a.w3, gate, F, num_threads);
  pw.silu_mul(up, gate, M * F);
  decode_gemm_packed(up, M, F, a.w2, delta, dim, num_threads);
  pw.add_rmsnorm(a.h_out, dim, delta, a.next_norm, M, dim, a.eps, a.sum_lanes, a.h_out, a.y_out, work.data());
}

template <typename T>
void rmsnorm_rows(const T* h, int64_t ldh, const T* weight, int64_t M, int64_t dim, float eps, int sum_lanes,
                  T* y) {
  static const Pointwise<T> pw = pick_pointwise<T>();
  thread_local std::vector<float> work;
  if (work.size() < static_cast<size_t>(2 * dim)) work.resize(2 * dim);
  pw.add_rmsnorm(h, ldh, nullptr, weight, M, dim, eps, sum_lanes, nullptr, y, work.data());
}

template <typename T>
void decode_layers(const std::vector<StackLayer>& layers, const T* first_norm, const T* h, int64_t ldh, const T* y,
                   int64_t ldy, T* h_out, T* y_out, const float* freqs, int64_t B, int64_t n, int64_t H, int64_t d,
                   int64_t L_max, int64_t start, float eps, float scale, int sum_lanes, int num_threads) {
  const int64_t dim = H * d;
  if (y == nullptr) {
    rmsnorm_rows(h, ldh, first_norm, B * n, dim, eps, sum_lanes, y_out);
    y = y_out;
    ldy = dim;
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const StackLayer& l = layers[i];
    const bool first = i == 0;
    decode_layer<T>({first ? h : h_out, first ? ldh : dim, first ? y : y_out, first ? ldy : dim, h_out, y_out, l.wqkv,
                     l.wo, l.w1, l.w3, l.w2, static_cast<const T*>(l.ffn_norm), static_cast<const T*>(l.next_norm),
                     freqs, static_cast<T*>(l.k_cache), static_cast<T*>(l.v_cache), B, n, H, d, L_max, start, eps,
                     scale, sum_lanes},
                    num_threads);
  }
}

template void decode_layer<float>(const DecodeLayerArgs<float>&, int);
template void decode_layer<bf16>(const DecodeLayerArgs<bf16>&, int);
#define DF_DECODE_LAYERS(T)                                                                                 \
  template void decode_layers<T>(const std::vector<StackLayer>&, const T*, const T*, int64_t, const T*, int64_t, T*, \
                                 T*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float, \
                                 int, int);
DF_DECODE_LAYERS(float)
DF_DECODE_LAYERS(bf16)
#undef DF_DECODE_LAYERS
template void rmsnorm_rows<float>(const float*, int64_t, const float*, int64_t, int64_t, float, int, float*);
template void rmsnorm_rows<bf16>(const bf16*, int64_t, const bf16*, int64_t, int64_t, float, int, bf16*);

}  // namespace detailflow::cpu
