// decode_gemm_w8a8 (CPU): y = x @ W^T with int8 weights AND int8 activations (W8A8), for the few
// rows of a decode step, on AVX-512 VNNI (vpdpbusd).
//
// Formula (decode_gemm_w8a8.h; the torch reference decode_gemm_w8a8_ref computes the same):
//   s_x[m] = max_k |x[m, k]| / 127                    fp32, per row, inside the call
//   q[m, k] = rne(clamp(x[m, k] / s_x[m], -127, 127))  (zero row: s_x = 0, q = 0)
//   acc[m, n] = sum_k q[m, k] Q[n, k]                 int32, exact (K <= kW8A8MaxK)
//   y[m, n] = (float(acc) * s_x[m]) * s_w[n]          rounded once to x's dtype
// A row with a non-finite x gives NaN outputs (s_x = NaN, q = 0).
//
// Why: at M = 16 a decode step is compute-bound. vdpbf16ps retires 32 multiply-adds per
// instruction whatever the weight format, so no weight-only format beats bf16 there;
// vpdpbusd retires 64 (u8 x s8 products, 4 per int32 lane), and reads 1 byte a weight.
// Exact integer sums also make every output independent of the k order, the tiling, the
// thread split and the other rows of the call: batch-invariant by construction (a row's
// quantization depends only on that row).
//
// vpdpbusd multiplies UNSIGNED bytes by signed bytes, so the kernel feeds u = q + 128 (u8, in
// [1, 255]) and subtracts 128 colsum[n] (colsum[n] = sum_k Q[n, k], packed once at load):
// sum_k u Q = acc + 128 colsum. Largest partial sum 255 * 127 * K: no int32 overflow for K <= 65536.
//
// Layout (decode_gemm_w8a8.h): panels of 16 output rows x 4 consecutive k per 64-byte vector,
// P[p][k4][j][t] = Q[16 p + j][4 k4 + t], K padded to a multiple of 4 and N to whole panels with
// zeros. x is quantized once per call on the calling thread (before the parallel region), into
// a tile-major staging of 32-bit words (4 u8 of one row) so a micro-kernel's broadcasts of one
// k4 are adjacent. Inner loop per k4: NP 64-byte weight loads, MT broadcasts, MT x NP vpdpbusd
// into MT x NP int32 accumulators; then one epilogue per tile (int32 -> fp32, two multiplies).
// N panels are split across threads in dynamic items of 8 panels, as decode_gemm. Tiles of
// <= 6 rows are bandwidth-bound: one panel at a time, weights prefetched into L2 4 KB ahead
// (measured in one process, a DetailFlow-16 block's 5 matrices from DRAM, 2 threads, 2026-12-03:
// M = 1..6 took 0.86-0.88x the time of panel pairs with L1 prefetches; M = 8, 16 unchanged).
//
// Variants (chosen at run time; the binary runs on any x86-64):
//   - avx512-vnni  CPU with avx512f/bw/vl + avx512_vnni: the loop above.
//   - portable     any other CPU (or decode_gemm_w8a8_force_portable): plain integer loops over
//                  the same layout and the same quantization formula; the same bits.
//
// Test:  python -m pytest tests/ops/test_decode_gemm_w8a8.py -q
// Bench: python benchmarks/bench_decode_gemm.py --low-precision   (the w8a8 rows)
#include "decode_gemm_w8a8.h"

#include "avx512_store.h"
#include "quantize_rows_int8.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace detailflow::cpu {
namespace {

constexpr int kP = static_cast<int>(kDecodePanel);
constexpr int kVec = 4 * kP;              // bytes of one k4 step of one panel (one zmm)
constexpr int kMaxRows = 12;              // rows per tile: 2 x 12 accumulators + weights fit 32 zmm
constexpr int kStreamRows = 6;            // tiles up to this many rows stream: one panel, L2 prefetches
constexpr int64_t kItemPanels = 8;        // panels per dynamically scheduled work item
constexpr int64_t kTeamStagingRows = 8;   // fewer rows: staged by the calling thread (no barrier)
constexpr int64_t kPrefetchBytes = 4096;  // software prefetch distance within a stream

std::atomic<bool> g_force_portable{false};

// ------------------------------------------------------------------ staging of x

// Tile-major staging of quantized row m (ldq = Kp bytes a row): the R rows of tile t are one
// block of K4 x R words, xs[(t K4 + k4) R + r] = bytes 4 k4 .. 4 k4 + 3 of row t R + r.
void stage_tile_row(const uint8_t* q, int64_t m, int64_t K4, int64_t R, uint32_t* xs) {
  const uint8_t* src = q + m * K4 * 4;
  uint32_t* dst = xs + (m / R) * K4 * R + m % R;
  for (int64_t k4 = 0; k4 < K4; ++k4) std::memcpy(dst + k4 * R, src + 4 * k4, 4);
}

// ------------------------------------------------------------------ epilogue (both variants)

// acc (rows x ldacc int32 sums of u Q) -> y = (float(acc - 128 colsum) * s_x) * s_w, one rounding
// to Y. Two separate multiplies (no add, so nothing can be contracted into an FMA).
template <typename Y>
inline void finish_tile(const int32_t* acc, int64_t rows, int64_t ldacc, int64_t ncols, const int32_t* colsum,
                        const float* sw, const float* sx, Y* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < ncols; ++j)
      store_float(static_cast<float>(acc[r * ldacc + j] - 128 * colsum[j]) * sx[r] * sw[j], y + r * ldy + j);
}

// ------------------------------------------------------------------ portable loop

// One panel (16 output rows) x `rows` rows of one tile: out[r][j] = sum_k u[r, k] Q[j, k].
void portable_panel(const int8_t* w, const uint32_t* xs, int64_t R, int64_t K4, int64_t rows, int32_t* out,
                    int64_t ldout) {
  for (int64_t r = 0; r < rows; ++r) {
    int32_t acc[kP] = {};
    for (int64_t k4 = 0; k4 < K4; ++k4) {
      uint8_t u[4];
      std::memcpy(u, xs + k4 * R + r, 4);
      const int8_t* wk = w + k4 * kVec;
      for (int j = 0; j < kP; ++j)
        for (int t = 0; t < 4; ++t) acc[j] += static_cast<int32_t>(u[t]) * wk[4 * j + t];
    }
    std::memcpy(out + r * ldout, acc, sizeof(acc));
  }
}

// ------------------------------------------------------------------ AVX-512 VNNI
#if defined(__x86_64__)
#define DF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,prefer-vector-width=512")))

using int8_rows::tail_mask;

struct Job {
  const int8_t* w;     // first panel of the group
  int64_t pstride;     // bytes from one panel to the next (K4 * 64)
  const uint32_t* xs;  // the tile's staged block (K4 x R words)
  int64_t R;           // words per k4 step in the staging (the tile height)
  int64_t K4;
  int64_t prefetch;    // bytes from each weight load to the line prefetched with it
  bool l2;             // prefetch into L2, not L1: streaming tiles, and the next panel pair (see run)
};
using MicroFn = void (*)(const Job&, int32_t*);

// MT rows x NP panels, the whole K: out[m][p * 16 + j] (ldout = NP * 16) = sum_k u[m, k] Q[16 p + j, k].
template <int MT, int NP>
DF_VNNI void micro(const Job& j, int32_t* out) {
  __m512i acc[MT][NP];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < j.K4; ++k4) {
    __m512i wv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const int8_t* wp = j.w + p * j.pstride + k4 * kVec;
      if (j.l2) {
        _mm_prefetch(reinterpret_cast<const char*>(wp) + j.prefetch, _MM_HINT_T1);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(wp) + j.prefetch, _MM_HINT_T0);
      }
      wv[p] = _mm512_loadu_si512(wp);
    }
    const uint32_t* xk = j.xs + k4 * j.R;
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512i b = _mm512_set1_epi32(static_cast<int>(xk[m]));
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], b, wv[p]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) _mm512_storeu_si512(out + (m * NP + p) * kP, acc[m][p]);
}

template <int NP, size_t... I>
constexpr std::array<MicroFn, sizeof...(I)> micro_row(std::index_sequence<I...>) {
  return {{&micro<static_cast<int>(I) + 1, NP>...}};
}

MicroFn micro_for(int np, int mt) {
  static constexpr auto r1 = micro_row<1>(std::make_index_sequence<kMaxRows>());
  static constexpr auto r2 = micro_row<2>(std::make_index_sequence<kMaxRows>());
  return np == 2 ? r2[mt - 1] : r1[mt - 1];
}

// finish_tile, 16 columns at a time: the same integer subtraction, conversion (round to
// nearest), two multiplies and rounding to Y, so the same bits.
template <typename Y>
DF_VNNI void finish_tile_vnni(const int32_t* acc, int64_t rows, int64_t ldacc, int64_t ncols, const int32_t* colsum,
                              const float* sw, const float* sx, Y* y, int64_t ldy) {
  for (int64_t c = 0; c < ncols; c += kP) {
    const __mmask16 mk = tail_mask(ncols - c);
    const __m512i bias = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mk, colsum + c), 7);  // 128 colsum
    const __m512 w = _mm512_maskz_loadu_ps(mk, sw + c);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(acc + r * ldacc + c), bias);
      store16(y + r * ldy + c, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sx[r])), w), mk);
    }
  }
}
#endif  // __x86_64__

bool use_vnni() {
  static const bool vnni = int8_rows::cpu_has_vnni();
  return vnni && !g_force_portable.load(std::memory_order_relaxed);
}

template <typename X>
void run(const X* x, int64_t M, int64_t K, int64_t ldx, const int8_t* packed, const float* scales,
         const int32_t* colsum, int64_t N, X* y, int64_t ldy, int num_threads, bool vnni) {
  const int64_t K4 = (K + 3) / 4, Kp = 4 * K4;
  const int64_t pstride = K4 * kVec;
  const int64_t panels = (N + kP - 1) / kP;
  // M rows in `count` tiles of R rows (the last may be shorter): M = 16 -> 2 x 8, 128 -> 11 x 12.
  // (One panel at a time with up to 24 rows a tile measured as fast at M = 16 and 2.6x slower
  // at M = 128, one thread.)
  const int64_t count = (M + kMaxRows - 1) / kMaxRows;
  const int64_t R = (M + count - 1) / count;

  thread_local std::vector<uint8_t> q;     // (M, Kp) u8, row-major
  thread_local std::vector<uint32_t> xs;   // tile-major words
  thread_local std::vector<float> sx;      // (count R) row scales
  q.resize(static_cast<size_t>(M * Kp));
  xs.resize(static_cast<size_t>(count * R * K4));
  sx.resize(static_cast<size_t>(count * R));
  // Plain pointers: inside the parallel region a thread_local name is each thread's own vector.
  uint8_t* qw = q.data();
  uint32_t* xsw = xs.data();
  float* sxw = sx.data();
  auto stage = [&](int64_t m) {
    sxw[m] = int8_rows::quantize_row(x, m, ldx, K, Kp, qw, vnni);
    stage_tile_row(qw, m, K4, R, xsw);
  };

  const int64_t items = (panels + kItemPanels - 1) / kItemPanels;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
  // Rows quantized and staged by the team before the panels (each row on its own: the same bits
  // whoever takes it) once there are enough of them (as decode_gemm_w4a8.cpp).
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
    alignas(64) int32_t acc[kMaxRows * 2 * kP];
    for (int64_t p = p0; p < p1;) {
      const int np = vnni && R > kStreamRows && p + 1 < p1 ? 2 : 1;
      const int64_t ncols = std::min<int64_t>(np * kP, N - p * kP);
      for (int64_t ti = 0; ti < count; ++ti) {
        const int64_t m0 = ti * R, rows = std::min(R, M - m0);
        const uint32_t* tile = xsw + ti * R * K4;
#if defined(__x86_64__)
        if (vnni) {
          // Several tiles: only the first pass over a panel pair comes from DRAM; the last one
          // prefetches the next pair (as decode_gemm does), the others stay in their stream.
          // The next pair goes to L2: a pair is 2 x 16 KB at K = 1024 (90 KB at 2816), so into
          // L1 it evicted the pair being read (A/B in one process pair, DetailFlow-16 block, 2
          // threads, 2026-12-03: M = 16 0.91-0.94x the time, M = 32 0.97x, M = 128 0.98x).
          const bool next_pair = count > 1 && ti + 1 == count;
          const Job job{packed + p * pstride, pstride, tile, R, K4, next_pair ? np * pstride : kPrefetchBytes,
                        R <= kStreamRows || next_pair};
          micro_for(np, static_cast<int>(rows))(job, acc);
          finish_tile_vnni(acc, rows, np * kP, ncols, colsum + p * kP, scales + p * kP, sxw + m0,
                           y + m0 * ldy + p * kP, ldy);
          continue;
        }
#endif
        portable_panel(packed + p * pstride, tile, R, K4, rows, acc, kP);
        finish_tile(acc, rows, kP, ncols, colsum + p * kP, scales + p * kP, sxw + m0, y + m0 * ldy + p * kP, ldy);
      }
      p += np;
    }
  }
  }  // omp parallel
}

}  // namespace

void decode_gemm_w8a8_force_portable(bool on) { g_force_portable.store(on, std::memory_order_relaxed); }

template <typename X>
const char* decode_gemm_w8a8(const X* x, int64_t M, int64_t K, int64_t ldx, const int8_t* packed,
                             const float* scales, const int32_t* colsum, int64_t N, X* y, int64_t ldy,
                             int num_threads) {
  const bool vnni = use_vnni();
  run<X>(x, M, K, ldx, packed, scales, colsum, N, y, ldy, num_threads, vnni);
  return vnni ? "avx512-vnni" : "portable";
}

template const char* decode_gemm_w8a8<float>(const float*, int64_t, int64_t, int64_t, const int8_t*, const float*,
                                             const int32_t*, int64_t, float*, int64_t, int);
template const char* decode_gemm_w8a8<bf16>(const bf16*, int64_t, int64_t, int64_t, const int8_t*, const float*,
                                            const int32_t*, int64_t, bf16*, int64_t, int);

}  // namespace detailflow::cpu
