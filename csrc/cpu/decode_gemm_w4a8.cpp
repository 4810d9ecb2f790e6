// decode_gemm_w4a8 (CPU): y = x @ W^T with int4 weights (group-wise scales) AND int8 activations
// (W4A8), for the few rows of a decode step, on AVX-512 VNNI (vpdpbusd).
//
// Formula (decode_gemm_w4a8.h; the torch reference decode_gemm_w4a8_ref computes the same):
//   s_x[m], q[m, k]          per-row int8 activations, exactly as decode_gemm_w8a8
//   acc[m, n, g]             = sum_{k in group g} q[m, k] Q[n, k]       int32, exact
//   f = 0; f = f + float(acc[m, n, g]) * s_w[n, g] for g = 0, 1, ...     fp32, in g order
//   y[m, n] = f * s_x[m]                                                rounded once to x's dtype
//
// Why: int4 weight-only ends in vdpbf16ps (32 multiply-adds an instruction) like every
// weight-only format, so at M = 16, where a decode step is compute-bound, it cannot beat bf16.
// This kernel reads half a byte a weight (half of w8a8's) and multiplies with vpdpbusd (64 an
// instruction) as w8a8 does. Every sum is exact or in a fixed order, so no tiling, thread split
// or batch changes a bit: a row's result depends on that row only (batch-invariant by construction).
//
// vpdpbusd multiplies UNSIGNED bytes by signed bytes: the weights are the unsigned operand, as
// their stored nibbles n = Q + 8 in [1, 15] (an AND and a shift from the packed byte), the
// activations the signed one (q in [-127, 127]); sum n q = sum Q q + 8 sum q, so each group's
// accumulator starts at -8 sum_{k in g} q[m, k] (computed with the quantization).
//
// Layout (decode_gemm_w4a8.h): panels of 16 output rows; one 64-byte vector holds 8 consecutive
// k, the low nibbles k 0-3 and the high nibbles k 4-7 of 16 rows. x is quantized once per call
// (by the calling thread, or by the team at >= 8 rows) into tile-major words (4 s8 of one row)
// and per-group corrections.
// Inner loop per k8: one weight load, 3 unpacking ops, 2 MT broadcasts, 2 MT vpdpbusd; per
// group: MT conversions, multiplies and adds into fp32 accumulators held in registers. One panel
// at a time, in tiles of <= 12 rows, a panel's later tiles reading it from L1/L2. N panels are
// split across threads in dynamic items of 8 panels, as decode_gemm.
// Prefetch: tiles of <= 6 rows are bandwidth-bound: their weights are prefetched into L2 4 KB
// ahead and their group scales 8 groups ahead (one stream of each per thread). Measured in one
// process pair (old build vs new, alternately), a DetailFlow-16 block's 5 matrices from DRAM, 2
// threads (2026-12-03): M = 1, 2, 4, 6 took 0.78-0.80x the time of the earlier quads / pairs of
// panels with L1 prefetches of the weights only (M = 2: 21.8 GB/s vs 17.5, a plain read 25.4).
// At >= 7 rows (compute-bound) L2 hints were 2-4% slower and stay L1.
//
// Variants (chosen at run time; the binary runs on any x86-64):
//   - avx512-vnni  CPU with avx512f/bw/vl/dq + avx512_vnni: the loop above.
//   - portable     any other CPU (or decode_gemm_w4a8_force_portable): plain loops, the same
//                  integer sums and the same fp32 operations in the same order; the same bits.
// This file is compiled with -ffp-contract=off (CMakeLists.txt): no multiply-add is fused.
//
// Test:  python -m pytest tests/ops/test_decode_gemm_w4a8.py -q
// Bench: python benchmarks/bench_decode_gemm.py --low-precision   (the w4a8 rows)
#include "decode_gemm_w4a8.h"

#include "avx512_store.h"
#include "quantize_rows_int8.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace detailflow::cpu {
namespace {

constexpr int kP = static_cast<int>(kDecodePanel);
constexpr int kVec = 4 * kP;              // bytes of one k8 step of one panel (one zmm)
constexpr int kMaxRows = 12;              // rows a tile: 12 + 12 accumulators (+ 4 more zmm: fits 32)
constexpr int kStreamRows = 6;            // tiles up to this many rows stream (see Prefetch above)
constexpr int64_t kScaleAheadGroups = 8;  // streaming tiles: group scales prefetched this far ahead
constexpr int64_t kItemPanels = 8;        // panels per dynamically scheduled work item
constexpr int64_t kTeamStagingRows = 8;   // fewer rows: staged by the calling thread (no barrier)
constexpr int64_t kPrefetchBytes = 4096;  // software prefetch distance within a stream

std::atomic<bool> g_force_portable{false};

// ------------------------------------------------------------------ staging of x

struct Staged {
  const uint32_t* xs;   // tile-major words: xs[(t K4 + k4) R + r] = s8 q of row t R + r, k 4 k4 .. 4 k4 + 3
  const int32_t* corr;  // corr[(t ng + g) R + r] = -8 sum_{k in g} q of row t R + r
  const float* sx;      // row scales
};

// Row m of the u8 codes u = q + 128 (rows of Kp bytes) -> its part of the tile staging of Staged.
void stage_row(const uint8_t* u, int64_t m, int64_t K8, int64_t R, int64_t group, int64_t ng, uint32_t* xs,
               int32_t* corr) {
  const int64_t K4 = 2 * K8, Kp = 8 * K8;
  const uint8_t* src = u + m * Kp;
  const int64_t t = m / R, r = m % R;
  uint32_t* dst = xs + t * K4 * R + r;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    uint32_t w;
    std::memcpy(&w, src + 4 * k4, 4);
    dst[k4 * R] = w ^ 0x80808080u;  // u - 128 per byte: the s8 codes
  }
  for (int64_t g = 0; g < ng; ++g) {
    int32_t s = 0;
    for (int64_t k = g * group, e = std::min(Kp, (g + 1) * group); k < e; ++k) s += static_cast<int32_t>(src[k]) - 128;
    corr[(t * ng + g) * R + r] = -8 * s;
  }
}

// ------------------------------------------------------------------ portable loop

// One panel x `rows` rows of one tile: f[r][j] of the formula (before the row scale).
void portable_panel(const uint8_t* w, const float* gs, const uint32_t* xs, const int32_t* corr, int64_t R,
                    int64_t K8, int64_t G8, int64_t ng, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float f[kP] = {};
    for (int64_t g = 0; g < ng; ++g) {
      int32_t acc[kP];
      for (int j = 0; j < kP; ++j) acc[j] = corr[g * R + r];
      for (int64_t k8 = g * G8, e = std::min(K8, (g + 1) * G8); k8 < e; ++k8) {
        const uint8_t* wk = w + k8 * kVec;
        int8_t q[8];
        std::memcpy(q, xs + 2 * k8 * R + r, 4);
        std::memcpy(q + 4, xs + (2 * k8 + 1) * R + r, 4);
        for (int j = 0; j < kP; ++j)
          for (int t = 0; t < 4; ++t) {
            const uint8_t b = wk[4 * j + t];
            acc[j] += static_cast<int32_t>(b & 15) * q[t] + static_cast<int32_t>(b >> 4) * q[4 + t];
          }
      }
      for (int j = 0; j < kP; ++j) f[j] = f[j] + static_cast<float>(acc[j]) * gs[g * kP + j];
    }
    std::memcpy(out + r * kP, f, sizeof(f));
  }
}

// ------------------------------------------------------------------ AVX-512 VNNI
#if defined(__x86_64__)
#define DF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,prefer-vector-width=512")))

using int8_rows::tail_mask;

struct Job {
  const uint8_t* w;      // the panel
  const float* gs;       // its group scales (ng x 16)
  const uint32_t* xs;    // the tile's staged words (K4 x R)
  const int32_t* corr;   // the tile's corrections (ng x R)
  int64_t R, K8, G8, ng;
  int64_t prefetch;      // bytes from each weight load to the line prefetched with it
};
using MicroFn = void (*)(const Job&, float*);

// MT rows x one panel, the whole K: out[m 16 + j] = f of the formula.
template <int MT>
DF_VNNI void micro(const Job& j, float* out) {
  constexpr bool stream = MT <= kStreamRows;
  __m512 f[MT];
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) f[m] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(0x0f);
  for (int64_t g = 0; g < j.ng; ++g) {
    if (stream) _mm_prefetch(reinterpret_cast<const char*>(j.gs + (g + kScaleAheadGroups) * kP), _MM_HINT_T1);
    __m512i acc[MT];
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_set1_epi32(j.corr[g * j.R + m]);
    const int64_t e = std::min(j.K8, (g + 1) * j.G8);
    for (int64_t k8 = g * j.G8; k8 < e; ++k8) {
      const uint8_t* wp = j.w + k8 * kVec;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + j.prefetch, stream ? _MM_HINT_T1 : _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(wp);
      const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      const uint32_t* x0 = j.xs + 2 * k8 * j.R;
      const uint32_t* x1 = x0 + j.R;
#pragma GCC unroll 12
      for (int m = 0; m < MT; ++m) {
        acc[m] = _mm512_dpbusd_epi32(acc[m], lo, _mm512_set1_epi32(static_cast<int>(x0[m])));
        acc[m] = _mm512_dpbusd_epi32(acc[m], hi, _mm512_set1_epi32(static_cast<int>(x1[m])));
      }
    }
    const __m512 s = _mm512_loadu_ps(j.gs + g * kP);
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) f[m] = _mm512_add_ps(f[m], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m]), s));
  }
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * kP, f[m]);
}

template <size_t... I>
constexpr std::array<MicroFn, sizeof...(I)> micro_table(std::index_sequence<I...>) {
  return {{&micro<static_cast<int>(I) + 1>...}};
}

MicroFn micro_for(int mt) {
  static constexpr auto table = micro_table(std::make_index_sequence<kMaxRows>());
  return table[mt - 1];
}

// y = f * s_x, 16 columns at a time (the portable finish's multiply and rounding).
template <typename Y>
DF_VNNI void finish_tile_vnni(const float* f, int64_t rows, int64_t ldf, int64_t ncols, const float* sx, Y* y,
                              int64_t ldy) {
  for (int64_t c = 0; c < ncols; c += kP) {
    const __mmask16 mk = tail_mask(ncols - c);
    for (int64_t r = 0; r < rows; ++r)
      store16(y + r * ldy + c, _mm512_mul_ps(_mm512_loadu_ps(f + r * ldf + c), _mm512_set1_ps(sx[r])), mk);
  }
}
#endif  // __x86_64__

template <typename Y>
void finish_tile(const float* f, int64_t rows, int64_t ldf, int64_t ncols, const float* sx, Y* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < ncols; ++j) store_float(f[r * ldf + j] * sx[r], y + r * ldy + j);
}

bool use_vnni() {
  static const bool vnni = int8_rows::cpu_has_vnni();
  return vnni && !g_force_portable.load(std::memory_order_relaxed);
}

template <typename X>
void run(const X* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed, const float* gscales, int64_t group,
         int64_t N, X* y, int64_t ldy, int num_threads, bool vnni) {
  const int64_t K8 = (K + 7) / 8, Kp = 8 * K8, K4 = 2 * K8, G8 = group / 8;
  const int64_t ng = (K + group - 1) / group;
  const int64_t pstride = K8 * kVec, gstride = ng * kP;
  const int64_t panels = (N + kP - 1) / kP;
  // Tiles of <= 12 rows (M = 16 -> 2 x 8, M = 128 -> 11 x 12).
  const int64_t count = (M + kMaxRows - 1) / kMaxRows;
  const int64_t R = (M + count - 1) / count;

  thread_local std::vector<uint8_t> u;      // (M, Kp) u8 codes, row-major
  thread_local std::vector<uint32_t> xs;    // Staged.xs
  thread_local std::vector<int32_t> corr;   // Staged.corr
  thread_local std::vector<float> sx;       // (count R) row scales
  u.resize(static_cast<size_t>(M * Kp));
  xs.resize(static_cast<size_t>(count * R * K4));
  corr.assign(static_cast<size_t>(count * R * ng), 0);
  sx.resize(static_cast<size_t>(count * R));
  // Plain pointers: inside the parallel region a thread_local name is each thread's own vector.
  uint8_t* uw = u.data();
  uint32_t* xsw = xs.data();
  int32_t* corrw = corr.data();
  float* sxw = sx.data();
  const Staged st{xsw, corrw, sxw};
  auto stage = [&](int64_t m) {
    sxw[m] = int8_rows::quantize_row(x, m, ldx, K, Kp, uw, vnni);
    stage_row(uw, m, K8, R, group, ng, xsw, corrw);
  };

  const int64_t items = (panels + kItemPanels - 1) / kItemPanels;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
  // Rows quantized and staged by the team before the panels (each row on its own: the same bits
  // whoever takes it) once there are enough of them: the serial ~7-20 us a call at M = 16 was
  // 10-15% of the layers' GEMMs; an interleaved A/B in one process put group steps 1-3% faster.
  const bool serial = M < kTeamStagingRows || nt == 1;
  if (serial)
    for (int64_t m = 0; m < M; ++m) stage(m);
#pragma omp parallel num_threads(nt)
  {
  if (!serial) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) stage(m);
  }
#pragma omp for schedule(dynamic, 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t p0 = item * kItemPanels, p1 = std::min(panels, p0 + kItemPanels);
    alignas(64) float f[kMaxRows * kP];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t ncols = std::min<int64_t>(kP, N - p * kP);
      for (int64_t ti = 0; ti < count; ++ti) {
        const int64_t m0 = ti * R, rows = std::min(R, M - m0);
        const uint32_t* tile = st.xs + ti * R * K4;
        const int32_t* tcorr = st.corr + ti * R * ng;
#if defined(__x86_64__)
        if (vnni) {
          // Several tiles: only the first pass over a panel comes from DRAM; the last one
          // prefetches the next panel, the others stay in their stream.
          const bool next = count > 1 && ti + 1 == count;
          const Job job{packed + p * pstride, gscales + p * gstride, tile, tcorr,
                        R, K8, G8, ng, next ? pstride : kPrefetchBytes};
          micro_for(static_cast<int>(rows))(job, f);
          finish_tile_vnni(f, rows, kP, ncols, st.sx + m0, y + m0 * ldy + p * kP, ldy);
          continue;
        }
#endif
        portable_panel(packed + p * pstride, gscales + p * gstride, tile, tcorr, R, K8, G8, ng, rows, f);
        finish_tile(f, rows, kP, ncols, st.sx + m0, y + m0 * ldy + p * kP, ldy);
      }
    }
  }
  }  // omp parallel
}

}  // namespace

void decode_gemm_w4a8_force_portable(bool on) { g_force_portable.store(on, std::memory_order_relaxed); }

template <typename X>
const char* decode_gemm_w4a8(const X* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                             const float* group_scales, int64_t group, int64_t N, X* y, int64_t ldy,
                             int num_threads) {
  const bool vnni = use_vnni();
  run<X>(x, M, K, ldx, packed, group_scales, group, N, y, ldy, num_threads, vnni);
  return vnni ? "avx512-vnni" : "portable";
}

template const char* decode_gemm_w4a8<float>(const float*, int64_t, int64_t, int64_t, const uint8_t*, const float*,
                                             int64_t, int64_t, float*, int64_t, int);
template const char* decode_gemm_w4a8<bf16>(const bf16*, int64_t, int64_t, int64_t, const uint8_t*, const float*,
                                            int64_t, int64_t, bf16*, int64_t, int);

}  // namespace detailflow::cpu
