// decode_gemm (CPU): the prior's decode-step GEMMs, streaming pre-packed weights at memory speed.
//
// Formula: y[m, n] = sum_k x[m, k] * W[n, k]   (y = x @ W^T, a bias-free nn.Linear), for few
// activation rows M (2 = batch 1 with CFG, 16 = one group of 8 with CFG; any M works, the
// crossover with F.linear is measured in detailflow_engine/linear.py), fp32 accumulation,
// y in x's dtype (bf16 rounded to nearest even, as torch).
//
// Why: at M = 2..16 the work is 2M flops per weight, so the time is the time to read W once.
// torch's matmul reaches only 9-28 GB/s there on this CPU; a plain read runs at 45-75 GB/s.
// Ceiling at M = 16: 16 fp32 FMA lanes per weight, and a Zen 5 core retires ~8 G zmm FMAs/s
// (measured), i.e. ~33 GB/s of fp32 (or bf16 via vdpbf16ps) weights per core: M = 16 is
// compute-bound near the read bandwidth, M = 2 is purely bandwidth-bound.
//
// Layout contract (decode_gemm.h; packed once at load by detailflow_engine/ops/decode_gemm.py):
// W is cut into panels of 16 output rows; panel p stores, for each k (fp32) or pair of k
// (bf16), the 16 rows' weights side by side, so one 64-byte load gives one k of 16 outputs
// (fp32) or two k of 16 outputs (bf16). Panels are adjacent, so a thread that owns a range of
// panels (dynamic OpenMP items of 8 panels, see kItemPanels) reads contiguous slices, front to back.
// x: (M, K) rows with stride ldx, y: (M, N) rows with stride ldy, unit last stride.
//
// Inner loop (per thread, per group of NP panels, per tile of MT rows of x): MT x NP zmm
// accumulators each hold 16 outputs of one row; per k: NP weight loads, MT broadcasts of
// x[m, k], MT x NP FMAs; no horizontal sums. x is staged once per call (split across the
// threads), tile by tile transposed to (k, r), so the MT broadcasts of one k are adjacent and
// a tile's block is read front to back. Sums run in blocks of 64 k (accuracy: see kBlock).
// M > MT: the panel group is read again per row tile, from cache; the last pass prefetches the
// next group from DRAM (see prefetch_ahead). Large M runs in chunks of ~96 rows (plan_tiles).
// Batch invariance: each output is one k-ordered chain whatever M, tiling or threads.
// Variants, chosen at run time (__builtin_cpu_supports; the binary runs on any x86-64):
//   - avx512-fp32       fp32 W: vfmadd231ps. x bf16 is widened to fp32 when staged (exact).
//   - avx512-bf16-dot   bf16 W and bf16 x, CPU with avx512_bf16: vdpbf16ps on (W pair, x pair).
//                       Products of two bf16 are exact in fp32 and accumulate in fp32, so the
//                       result equals the widening loop up to accumulation order, except that
//                       vdpbf16ps flushes fp32-denormal (< 1.2e-38) inputs/products to zero.
//                       x is already bf16, so nothing is rounded. Half the instructions of:
//   - avx512-bf16-widen bf16 W and fp32 x (or no avx512_bf16): W widened to fp32 with a shift
//                       and a mask (exact), fp32 FMAs. fp32 x is NOT rounded to bf16 for
//                       vdpbf16ps: that would add a relative error of up to 2^-9 per element of
//                       x, which the fp32 caller did not ask for.
//   - avx512-int8       int8 W (weight-only, per-row fp32 scales; layout as fp32, 1 byte per
//                       weight): vpmovsxbd + vcvtdq2ps (exact) then fp32 FMAs, the scale applied
//                       once per output at the end. 4x fewer bytes than fp32, so M = 2 runs
//                       ~4x faster; at M = 16 the FMAs (not the bytes) are the limit, as fp32.
//   - portable          any other CPU: plain loops over the same layout (gcc vectorises them).
// Tiling, from measurements on one Zen 5 core at M = 1..64 (NP in {1, 2}, MT <= 16): NP = 2
// panels (2 weight streams, each x broadcast feeds 2 FMAs) and MT <= 12 rows a tile (24
// accumulators); e.g. M = 2: 1 tile; M = 16: 2 tiles of 8; M = 64: 6 tiles of <= 11. A lone
// last panel of a thread's range runs with NP = 1. Bandwidth-bound sizes, measured in one
// process on a DetailFlow-16 block's 5 matrices from DRAM, 2 threads (Zen 4, 2026-12-03): M <= 2
// runs NP = 1 (one stream a thread: 0.88-0.95x the time, fp32 / bf16 / int8), M = 3..6
// prefetches into L2 (0.78-0.97x; see prefetch_ahead).
//
// Test:  python -m pytest tests/ops/test_decode_gemm.py -q
// Bench: python benchmarks/bench_decode_gemm.py   (GB/s of weights vs F.linear and a plain read)
#include "decode_gemm.h"

#include "avx512_store.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace detailflow::cpu {
namespace {

constexpr int kP = static_cast<int>(kDecodePanel);
constexpr int64_t kPrefetchBytes = 4096;  // see prefetch_ahead
constexpr int64_t kOneStreamRows = 2;     // M up to this: one panel a call (Tiles::np = 1)
constexpr int64_t kL2PrefetchRows = 6;    // M above kOneStreamRows up to this: L2 prefetches
// Blocked summation: each block of kBlock k sums into zeroed registers, then into a total
// kept in L1 (MT x NP x 64 bytes, touched once a block). One long fp32 chain per output over
// K = 2816 would err ~5x more than torch's sgemm; in blocks of 64 it is ~1x (measured).
// int4 W sums in blocks of its group size instead (one scale per block, see add_block).
constexpr int64_t kBlock = 64;

// One micro-kernel call: NP adjacent panels x MT rows of x, the whole K.
struct Job {
  const void* w;     // first panel of the group
  int64_t pstride;   // elements from one panel to the next
  const void* xs;    // staged x (float (k, m) or uint32 pairs (k2, m)), at this tile's first row
  int64_t ldxs;      // = the tile height R: staged elements per k (or per pair of k)
  int64_t ksteps;    // k steps of the loop: K (one k a step) or ceil(K / 2) (pairs)
  int64_t block;     // k steps per summation block (kBlock k, or the int4 group)
  int64_t kfull;     // int8 pairs: steps with both k < K (K / 2); the step past them has one k
  void* y;           // y at (first row of the tile, first column of the group)
  int64_t ldy;
  int64_t ncols;     // valid output columns from the group's first column (<= NP * 16)
  int64_t prefetch;  // bytes from each weight load to the line prefetched with it
  const float* scale;   // int8 W: per-output-row scales at the group's first column; else null
  const float* gscale;  // int4 W: group scales (Np, K / G, 16) at the group's first panel; else null
  int64_t gstride;      // int4: floats of group scales per panel (K / G * 16)
  bool l2;              // prefetch into L2, not L1 (see prefetch_ahead)
};
using MicroFn = void (*)(const Job&);

enum class Variant { Fp32, Bf16Dot, Bf16Widen, Int8, Int8Dot, Int4Dot, Int4Widen, Portable };

template <typename T>
constexpr bool kIsBf16 = std::is_same_v<T, bf16>;
template <typename T>
constexpr bool kIsInt8 = std::is_same_v<T, int8_t>;
template <typename T>
constexpr bool kIsInt4 = std::is_same_v<T, int4x2>;

// Weight (k, j) of one panel, as float, in each packed layout (decode_gemm.h).
inline float wat(const float* w, int64_t k, int j) { return w[k * kP + j]; }
inline float wat(const int8_t* w, int64_t k, int j) { return static_cast<float>(w[k * kP + j]); }
inline float wat(const bf16* w, int64_t k, int j) { return to_float(w[(k / 2) * 2 * kP + 2 * j + k % 2]); }
inline float wat(const int4x2* w, int64_t k, int j) {
  const uint8_t b = w[(k / 2) * kP + j].bits;
  return static_cast<float>(((k % 2) ? b >> 4 : b & 15) - 8);
}

std::atomic<bool> g_force_portable{false};

// ------------------------------------------------------------------ staging of x

// Staged x is tile-major: the R rows of tile t (rows [t R, t R + R)) are one contiguous block
// of S k-steps x R values, so a micro-kernel reads its rows' values for one k side by side and
// walks its block front to back (the hardware prefetcher follows it).
// xs[(t S + k) R + r] = float(x[t R + r, k]) for k in [k0, k1); zero for k >= K (the bf16 pad).
template <typename X>
void stage_float(const X* x, int64_t M, int64_t K, int64_t ldx, int64_t R, int64_t S, float* xs,
                 int64_t k0, int64_t k1) {
  for (int64_t m = 0; m < M; ++m) {
    const X* row = x + m * ldx;
    float* dst = xs + (m / R) * S * R + m % R;
    for (int64_t k = k0; k < k1; ++k) dst[k * R] = k < K ? to_float(row[k]) : 0.0f;
  }
}

// The same for bf16 pairs: xp[(t S + k2) R + r] = bits(x[m, 2 k2]) | bits(x[m, 2 k2 + 1]) << 16.
void stage_pairs(const bf16* x, int64_t M, int64_t K, int64_t ldx, int64_t R, int64_t S, uint32_t* xp,
                 int64_t k0, int64_t k1) {
  for (int64_t m = 0; m < M; ++m) {
    const bf16* row = x + m * ldx;
    uint32_t* dst = xp + (m / R) * S * R + m % R;
    for (int64_t k2 = k0; k2 < k1; ++k2) {
      const uint32_t lo = row[2 * k2].bits;
      const uint32_t hi = 2 * k2 + 1 < K ? row[2 * k2 + 1].bits : 0u;
      dst[k2 * R] = lo | (hi << 16);
    }
  }
}

// ------------------------------------------------------------------ portable loops

// Blocks of `block` k as the AVX-512 loops; int4 (gscale) scales each block's sum by its group
// scale, int8 (scale) the finished sum by the row scale.
template <typename Wt, typename Y>
void portable_panel(const Wt* w, const float* xs, int64_t M, int64_t R, int64_t S, int64_t K, int64_t block,
                    Y* y, int64_t ldy, int64_t ncols, const float* scale, const float* gscale) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xs + (m / R) * S * R + m % R;  // row m of the tile-major staging
    float total[kP] = {};
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      float acc[kP] = {};
      for (int64_t k = k0; k < std::min(K, k0 + block); ++k) {
        const float xv = xm[k * R];
#pragma omp simd
        for (int j = 0; j < kP; ++j) acc[j] += wat(w, k, j) * xv;
      }
      const float* gs = gscale ? gscale + (k0 / block) * kP : nullptr;
      for (int j = 0; j < kP; ++j) total[j] = gs ? std::fma(acc[j], gs[j], total[j]) : total[j] + acc[j];
    }
    for (int64_t j = 0; j < ncols; ++j) from_float(scale ? total[j] * scale[j] : total[j], y + m * ldy + j);
  }
}

// ------------------------------------------------------------------ AVX-512 micro-kernels
#if defined(__x86_64__)
#define DF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512")))
#define DF_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,prefer-vector-width=512")))
#define DF_INLINE inline __attribute__((always_inline))

// gcc 12's _mm512_undefined_* (inside _mm512_cvtepi32_epi16) trips -Wmaybe-uninitialized (PR105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// One software prefetch per 64-byte weight line, `Job::prefetch` bytes ahead. One row tile
// (M <= 12): 4 KB ahead in the same contiguous stream (+15-20% over the hardware prefetcher
// alone, one Zen 5 core). Several row tiles: only the first pass over a panel group comes
// from DRAM, so the last pass prefetches the same line of the *next* group instead, and DRAM
// keeps streaming while the later passes compute from cache (+13% at M = 16); that next group
// goes to L2, not L1 (see run_gemm). Tiles of 3..6 rows prefetch into L2 too (`Job::l2`).
template <typename T>
DF_AVX512 DF_INLINE void prefetch_ahead(const T* p, const Job& j) {
  if (j.l2) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + j.prefetch, _MM_HINT_T1);
  } else {
    _mm_prefetch(reinterpret_cast<const char*>(p) + j.prefetch, _MM_HINT_T0);
  }
}

// store16 (float / bf16 rounded like torch): avx512_store.h

DF_AVX512 DF_INLINE __mmask16 lane_mask(int64_t c) {
  return c >= kP ? __mmask16(0xffff) : c <= 0 ? __mmask16(0) : __mmask16((1u << c) - 1u);
}

template <typename Y, int MT, int NP>
DF_AVX512 DF_INLINE void store_tile(const __m512 (&acc)[MT][NP], const Job& j) {
  Y* y = static_cast<Y*>(j.y);
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    if (j.ncols - p * kP <= 0) break;
    const __mmask16 mk = lane_mask(j.ncols - p * kP);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) store16(y + m * j.ldy + p * kP, acc[m][p], mk);
  }
}

template <int MT, int NP>
DF_AVX512 DF_INLINE void zero_tile(__m512 (&acc)[MT][NP]) {
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_setzero_ps();
}

// A finished block into the running total (kept in L1). int4: total += s_g * block sum with one
// explicit FMA (never left to the compiler's contraction, which may differ per tile shape and
// would make a row's bits depend on M), the group's 16 scales per panel loaded once a block.
template <int MT, int NP>
DF_AVX512 DF_INLINE void add_block(const __m512 (&acc)[MT][NP], float (&total)[MT][NP][kP], bool first,
                                   const Job& j, int64_t g) {
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    const __m512 s = j.gscale ? _mm512_loadu_ps(j.gscale + p * j.gstride + g * kP) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512 t = first ? _mm512_setzero_ps() : _mm512_load_ps(total[m][p]);
      _mm512_store_ps(total[m][p], j.gscale ? _mm512_fmadd_ps(acc[m][p], s, t) : _mm512_add_ps(acc[m][p], t));
    }
  }
}

// int8 W: the per-row scale multiplies the finished sum (y = s_n * sum_k q[n, k] x[m, k]), one
// multiply per output; columns past ncols load a zero scale (masked) and are not stored.
template <typename Y, int MT, int NP>
DF_AVX512 DF_INLINE void store_total(const float (&total)[MT][NP][kP], const Job& j) {
  __m512 acc[MT][NP];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_load_ps(total[m][p]);
  if (j.scale != nullptr) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const __m512 sv = _mm512_maskz_loadu_ps(lane_mask(j.ncols - p * kP), j.scale + p * kP);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) acc[m][p] = _mm512_mul_ps(acc[m][p], sv);
    }
  }
  store_tile<Y, MT, NP>(acc, j);
}

// ---- weight decoders: one k step of one panel into registers.
// Single-k decoders give 16 fp32 weights (one k of 16 outputs); pair decoders give 16 32-bit
// lanes of bf16 pairs (low half W[n, 2 k2], high half W[n, 2 k2 + 1]), all conversions exact.

struct Fp32Weights {  // (Np, K, 16) fp32: a 64-byte load
  DF_AVX512 static DF_INLINE __m512 load(const Job& j, int p, int64_t k) {
    const float* wp = static_cast<const float*>(j.w) + p * j.pstride + k * kP;
    prefetch_ahead(wp, j);
    return _mm512_loadu_ps(wp);
  }
};

struct Int8Weights {  // (Np, K, 16) int8: 16 bytes sign-extended and converted (exact)
  DF_AVX512 static DF_INLINE __m512 load(const Job& j, int p, int64_t k) {
    const int8_t* wp = static_cast<const int8_t*>(j.w) + p * j.pstride + k * kP;
    if ((k & 3) == 0) prefetch_ahead(wp, j);  // a 64-byte line holds 4 k
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp))));
  }
};

struct Bf16Pairs {  // (Np, K2, 16, 2) bf16: already pairs, a 64-byte load
  DF_AVX512 static DF_INLINE __m512i load(const Job& j, int p, int64_t k2) {
    const uint16_t* wp = static_cast<const uint16_t*>(j.w) + p * j.pstride + k2 * 2 * kP;
    prefetch_ahead(wp, j);
    return _mm512_loadu_si512(wp);
  }
};

// int8 (Np, K, 16): k = 2 k2 and 2 k2 + 1 are two 16-byte rows; each widened to fp32 (exact,
// |q| <= 127 has 7 significant bits so the fp32 is a bf16 with zero low half), then the even
// one's top half shifted down beside the odd one's. The odd row of an odd K's last step is
// past the panel: a masked (non-faulting) zero load.
struct Int8Pairs {
  DF_AVX512 static DF_INLINE __m512i load(const Job& j, int p, int64_t k2) {
    const int8_t* wp = static_cast<const int8_t*>(j.w) + p * j.pstride + k2 * 2 * kP;
    if ((k2 & 1) == 0) prefetch_ahead(wp, j);  // a 64-byte line holds 2 pairs
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp));
    const __m128i hi = _mm_maskz_loadu_epi8(k2 < j.kfull ? __mmask16(0xffff) : __mmask16(0), wp + kP);
    const __m512i even = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)));
    const __m512i odd = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)));
    return _mm512_or_si512(_mm512_srli_epi32(even, 16), odd);
  }
};

// int4 (Np, K / 2, 16): 16 bytes, byte j = n_even | n_odd << 4 (nibble n = q + 8). Zero-extend
// to 32-bit lanes, move the high nibble to bit 16 ((b | b << 12) & 0x000f000f, one vpternlogd),
// then vpermw looks each 16-bit nibble up in a table of bf16(n - 8) (exact).
struct Int4Pairs {
  DF_AVX512 static DF_INLINE __m512i load(const Job& j, int p, int64_t k2) {
    const uint8_t* wp = reinterpret_cast<const uint8_t*>(static_cast<const int4x2*>(j.w) + p * j.pstride) + k2 * kP;
    if ((k2 & 3) == 0) prefetch_ahead(wp, j);  // a 64-byte line holds 4 pairs
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
    // (A | B) & C: A = 0xf0, B = 0xcc, C = 0xaa -> 0xa8
    const __m512i nib = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000f000f), 0xa8);
    // bf16 bits of n - 8 for n = 0..15 (-8 .. 7); indices 16..31 are never formed.
    alignas(64) static constexpr uint16_t kBits[32] = {0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80,
                                                       0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0};
    const __m512i table = _mm512_load_si512(kBits);
    return _mm512_permutexvar_epi16(nib, table);
  }
};

// ---- one k step of the tile: NP weight loads, MT broadcasts, MT x NP multiply-adds.

template <typename Dec>
struct SingleStep {  // fp32 x, one k: vfmadd231ps
  template <int MT, int NP>
  DF_AVX512 static DF_INLINE void step(const Job& j, int64_t k, __m512 (&acc)[MT][NP]) {
    __m512 wv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) wv[p] = Dec::load(j, p, k);
    const float* xk = static_cast<const float*>(j.xs) + k * j.ldxs;
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512 b = _mm512_set1_ps(xk[m]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_fmadd_ps(wv[p], b, acc[m][p]);
    }
  }
};

template <typename Dec>
struct WidenStep {  // fp32 x, a pair of k: the bf16 pair widened (shift / mask, exact), 2 FMAs
  template <int MT, int NP>
  DF_AVX512 static DF_INLINE void step(const Job& j, int64_t k2, __m512 (&acc)[MT][NP]) {
    const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    __m512 even[NP], odd[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const __m512i raw = Dec::load(j, p, k2);
      even[p] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      odd[p] = _mm512_castsi512_ps(_mm512_and_si512(raw, hi_mask));
    }
    const float* x0 = static_cast<const float*>(j.xs) + 2 * k2 * j.ldxs;
    const float* x1 = x0 + j.ldxs;
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512 b0 = _mm512_set1_ps(x0[m]);
      const __m512 b1 = _mm512_set1_ps(x1[m]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_fmadd_ps(odd[p], b1, _mm512_fmadd_ps(even[p], b0, acc[m][p]));
    }
  }
};

// bf16 x, a pair of k: vdpbf16ps, acc[i] += W[n_i, 2k2] x[m, 2k2] + W[n_i, 2k2+1] x[m, 2k2+1].
template <typename Dec>
struct DotStep {
  template <int MT, int NP>
  DF_AVX512_BF16 static DF_INLINE void step(const Job& j, int64_t k2, __m512 (&acc)[MT][NP]) {
    __m512bh wv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) wv[p] = (__m512bh)Dec::load(j, p, k2);
    const uint32_t* xk = static_cast<const uint32_t*>(j.xs) + k2 * j.ldxs;
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(xk[m]));
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_dpbf16_ps(acc[m][p], wv[p], b);
    }
  }
};

// The micro-kernel: blocks of j.block steps into zeroed registers, each added to the total;
// every output is one k-ordered chain whatever the tile. Defined once per target set (the
// vdpbf16ps steps need avx512bf16, the others must run without it).
#define DF_DEFINE_MICRO(NAME, TARGET)                                              \
  template <typename Step>                                                         \
  struct NAME {                                                                    \
    template <typename Y, int MT, int NP>                                          \
    TARGET static void run(const Job& j) {                                         \
      alignas(64) float total[MT][NP][kP];                                         \
      for (int64_t k0 = 0; k0 < j.ksteps; k0 += j.block) {                         \
        const int64_t k1 = std::min(j.ksteps, k0 + j.block);                       \
        __m512 acc[MT][NP];                                                        \
        zero_tile(acc);                                                            \
        for (int64_t k = k0; k < k1; ++k) Step::template step<MT, NP>(j, k, acc);  \
        add_block(acc, total, k0 == 0, j, k0 / j.block);                           \
      }                                                                            \
      store_total<Y, MT, NP>(total, j);                                            \
    }                                                                              \
  };
DF_DEFINE_MICRO(Micro, DF_AVX512)
DF_DEFINE_MICRO(MicroBf16, DF_AVX512_BF16)
#undef DF_DEFINE_MICRO

// Rows of x per tile: 2 x 12 accumulators + the weight and broadcast registers fit in 32 zmm.
constexpr int kMaxRows = 12;

template <typename M, typename Y, int NP, size_t... I>
constexpr std::array<MicroFn, sizeof...(I)> micro_row(std::index_sequence<I...>) {
  return {{&M::template run<Y, static_cast<int>(I) + 1, NP>...}};
}

template <typename M, typename Y>
MicroFn micro_for(int np, int mt) {
  static constexpr auto r1 = micro_row<M, Y, 1>(std::make_index_sequence<kMaxRows>());
  static constexpr auto r2 = micro_row<M, Y, 2>(std::make_index_sequence<kMaxRows>());
  return np == 2 ? r2[mt - 1] : r1[mt - 1];
}

template <typename Y>
MicroFn micro_for(Variant v, int np, int mt) {
  switch (v) {
    case Variant::Fp32: return micro_for<Micro<SingleStep<Fp32Weights>>, Y>(np, mt);
    case Variant::Int8: return micro_for<Micro<SingleStep<Int8Weights>>, Y>(np, mt);
    case Variant::Bf16Widen: return micro_for<Micro<WidenStep<Bf16Pairs>>, Y>(np, mt);
    case Variant::Int4Widen: return micro_for<Micro<WidenStep<Int4Pairs>>, Y>(np, mt);
    case Variant::Bf16Dot: return micro_for<MicroBf16<DotStep<Bf16Pairs>>, Y>(np, mt);
    case Variant::Int8Dot: return micro_for<MicroBf16<DotStep<Int8Pairs>>, Y>(np, mt);
    default: return micro_for<MicroBf16<DotStep<Int4Pairs>>, Y>(np, mt);  // Int4Dot
  }
}
// Several row tiles over int8 / int4 W: decode the panel group once into bf16 pairs (L2) and
// run the bf16 dot loop on them for every tile, instead of decoding once per tile. The pairs
// and the dot products are the same as the fused loop's, so the bits are too (row invariance).
template <typename Dec>
DF_AVX512 void decode_group(const Job& j, int np, uint16_t* out) {
  for (int p = 0; p < np; ++p)
    for (int64_t k2 = 0; k2 < j.ksteps; ++k2)
      _mm512_storeu_si512(out + (p * j.ksteps + k2) * 2 * kP, Dec::load(j, p, k2));
}
#pragma GCC diagnostic pop
#endif  // __x86_64__

bool cpu_has_avx512() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The dot variants need bf16 x (nothing is rounded: x is already bf16, products of two bf16
// are exact in fp32) and avx512_bf16; fp32 x keeps exact fp32 multiplies.
template <typename X, typename Wt>
Variant pick_variant() {
  static const bool avx512 = cpu_has_avx512();
  static const bool dot = cpu_has_avx512_bf16() && kIsBf16<X>;
  if (!avx512 || g_force_portable.load(std::memory_order_relaxed)) return Variant::Portable;
  if constexpr (kIsInt8<Wt>) return dot ? Variant::Int8Dot : Variant::Int8;
  if constexpr (kIsInt4<Wt>) return dot ? Variant::Int4Dot : Variant::Int4Widen;
  if constexpr (!kIsBf16<Wt>) return Variant::Fp32;
  return dot ? Variant::Bf16Dot : Variant::Bf16Widen;
}

// The tile plan for M rows: NP panels per micro-call, and M split into equal-ish row tiles.
struct Tiles {
  int np;
  int64_t count, rows;  // `count` tiles of `rows` rows (the last may be shorter)
  int64_t chunk;        // tiles per chunk: a thread runs all its panels over one chunk, then the next
};

// Two panels per call (each x broadcast feeds 2 FMAs; 2 streams for the prefetcher), except
// at M <= kOneStreamRows, where one stream a thread streams faster (see the header); at most
// 12 rows a tile. M = 16 -> 2 tiles of 8, M = 64 -> 6 tiles of 11 (the last 9).
// Large M is cut into chunks of ~kChunkRows rows so that a chunk's staged x stays in L2 while
// every panel group of the thread's range passes over it (one chunk re-streams the weights:
// >= 192 FMAs per weight, compute-bound). bf16, N = 3072, K = 1024, M = 3200, 2 threads: 202
// GFLOP/s unchunked, see benchmarks/README.md for the chunked figure.
// None of this changes a sum: every output is the same k-ordered chain (blocks of kBlock)
// whatever M, the tiling, the chunking or the thread split, so a row's result never depends on
// the other rows of the call (batch invariance; tests/ops/test_decode_gemm.py checks it).
constexpr int64_t kChunkRows = 96;
// Panels per dynamically scheduled work item: 8 x 16 = 128 output columns, 256-512 KB of fp32
// weights at K = 1024; GPT-L's 1024-wide matrices make 8 items, the 8192-wide head 64.
constexpr int64_t kItemPanels = 8;
Tiles plan_tiles(int64_t M) {
  const int64_t count = (M + kMaxRows - 1) / kMaxRows;
  const int64_t rows = (M + count - 1) / count;
  return {M <= kOneStreamRows ? 1 : 2, count, rows, std::max<int64_t>(1, kChunkRows / rows)};
}

// The shared driver; `group` > 0 only for int4 (then `scales` are its group scales).
template <typename X, typename Wt>
void run_gemm(const X* x, int64_t M, int64_t K, int64_t ldx, const Wt* packed, const float* scales,
              int64_t group, int64_t N, X* y, int64_t ldy, int num_threads) {
  const Variant variant = pick_variant<X, Wt>();
  const bool dot = variant == Variant::Bf16Dot || variant == Variant::Int8Dot || variant == Variant::Int4Dot;
  const bool paired = kIsBf16<Wt> || kIsInt4<Wt>;      // packed in k pairs (K padded to even)
  const int64_t Kp = paired ? (K + 1) / 2 * 2 : K;     // packed k extent
  const int64_t pstride = kIsInt4<Wt> ? Kp / 2 * kP : Kp * kP;  // elements per panel
  const int64_t panels = (N + kP - 1) / kP;
  const int64_t stage_steps = dot ? (K + 1) / 2 : Kp;  // staged k steps (pairs or single k)
  const bool pair_steps = dot || paired;               // micro-kernel steps over pairs of k
  const int64_t ksteps = pair_steps ? (K + 1) / 2 : K;
  const int64_t block_k = kIsInt4<Wt> ? group : kBlock;  // k per summation block
  const int64_t block = pair_steps ? block_k / 2 : block_k;
  const float* row_scale = kIsInt4<Wt> ? nullptr : scales;
  const float* group_scale = kIsInt4<Wt> ? scales : nullptr;
  const int64_t gstride = kIsInt4<Wt> ? (K + group - 1) / group * kP : 0;  // the last group may be short
  const Tiles tiles = plan_tiles(M);
  const bool l2_stream = M > kOneStreamRows && M <= kL2PrefetchRows;  // prefetch into L2 (prefetch_ahead)
  const int64_t R = tiles.rows;

  // Staged x, tile-major (see stage_float): float (k, r) or uint32 pairs (k2, r) blocks of R
  // rows; 4 bytes per element either way (a short last tile's missing rows are never read).
  thread_local std::vector<float> stage_buf;
  const size_t stage_size = static_cast<size_t>(tiles.count * R * stage_steps);
  if (stage_buf.size() < stage_size) stage_buf.resize(stage_size);
  float* xs = stage_buf.data();

  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, panels)));
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    {
      const int64_t k0 = stage_steps * t / T, k1 = stage_steps * (t + 1) / T;
      if constexpr (kIsBf16<X>) {
        if (dot) {
          stage_pairs(x, M, K, ldx, R, stage_steps, reinterpret_cast<uint32_t*>(xs), k0, k1);
        } else {
          stage_float(x, M, K, ldx, R, stage_steps, xs, k0, k1);
        }
      } else {
        stage_float(x, M, K, ldx, R, stage_steps, xs, k0, k1);
      }
    }
#pragma omp barrier
    // Dynamic split: work items of kItemPanels adjacent panels (one contiguous slice of the
    // buffer each) x one row chunk, handed out in order (row chunk-major, so a chunk's staged x
    // stays in cache while its items run). A thread slowed by a busy neighbour on its core takes
    // fewer items instead of holding up the others with a fixed half (bench_neighbour.py).
    const int64_t items_n = (panels + kItemPanels - 1) / kItemPanels;
    const int64_t chunks = variant == Variant::Portable ? 1 : (tiles.count + tiles.chunk - 1) / tiles.chunk;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < items_n * chunks; ++item) {
      const int64_t p0 = (item % items_n) * kItemPanels, p1 = std::min(panels, p0 + kItemPanels);
      if (variant == Variant::Portable) {
        for (int64_t p = p0; p < p1; ++p)
          portable_panel(packed + p * pstride, xs, M, R, stage_steps, K, block_k, y + p * kP, ldy,
                         std::min<int64_t>(kP, N - p * kP), row_scale ? row_scale + p * kP : nullptr,
                         group_scale ? group_scale + p * gstride : nullptr);
        continue;
      }
#if defined(__x86_64__)
      const int64_t c0 = (item / items_n) * tiles.chunk, c1 = std::min(tiles.count, c0 + tiles.chunk);
      const bool predecode = c1 - c0 > 1 && (variant == Variant::Int8Dot || variant == Variant::Int4Dot);
      thread_local std::vector<uint16_t> decoded;
      for (int64_t p = p0; p < p1; p += tiles.np) {
        const int np = static_cast<int>(std::min<int64_t>(tiles.np, p1 - p));
        Job job{packed + p * pstride, pstride, nullptr, R, ksteps, block, K / 2, nullptr, ldy, N - p * kP,
                kPrefetchBytes, row_scale ? row_scale + p * kP : nullptr,
                group_scale ? group_scale + p * gstride : nullptr, gstride, false};
        Variant v = variant;
        if (predecode) {
          decoded.resize(static_cast<size_t>(np * ksteps * 2 * kP));
          if (variant == Variant::Int8Dot) {
            decode_group<Int8Pairs>(job, np, decoded.data());
          } else {
            decode_group<Int4Pairs>(job, np, decoded.data());
          }
          job.w = decoded.data();
          job.pstride = ksteps * 2 * kP;
          v = Variant::Bf16Dot;
        }
        for (int64_t ti = c0; ti < c1; ++ti) {
          const int64_t m0 = ti * R;
          const int mt = static_cast<int>(std::min<int64_t>(R, M - m0));
          const bool next_group = !predecode && c1 - c0 > 1 && ti + 1 == c1;  // last of several passes
          job.xs = xs + ti * R * stage_steps;
          job.y = y + m0 * ldy + p * kP;
          job.prefetch = next_group ? np * pstride * static_cast<int64_t>(sizeof(Wt)) : kPrefetchBytes;
          // The next group goes to L2: two bf16 panels are 64 KB at K = 1024 (fp32: 128 KB), so into
          // L1 it evicted the group being read (A/B in one process pair, a DetailFlow-16 block
          // from DRAM, 2 threads, 2026-12-03: bf16 M = 16 0.94-0.95x the time, M = 64 0.96x,
          // fp32 M = 16 0.94x; M = 24, 32 unchanged).
          job.l2 = l2_stream || next_group;
          micro_for<X>(v, np, mt)(job);
        }
      }
#endif
    }
  }
}

}  // namespace

void decode_gemm_force_portable(bool on) { g_force_portable.store(on, std::memory_order_relaxed); }

template <typename X, typename Wt>
const char* decode_gemm_variant() {
  switch (pick_variant<X, Wt>()) {
    case Variant::Fp32: return "avx512-fp32";
    case Variant::Bf16Dot: return "avx512-bf16-dot";
    case Variant::Bf16Widen: return "avx512-bf16-widen";
    case Variant::Int8: return "avx512-int8";
    case Variant::Int8Dot: return "avx512-int8-bf16-dot";
    case Variant::Int4Dot: return "avx512-int4-bf16-dot";
    case Variant::Int4Widen: return "avx512-int4-widen";
    default: return "portable";
  }
}

template <typename X, typename Wt>
void decode_gemm(const X* x, int64_t M, int64_t K, int64_t ldx, const Wt* packed,
                 const float* scales, int64_t N, X* y, int64_t ldy, int num_threads) {
  run_gemm<X, Wt>(x, M, K, ldx, packed, scales, 0, N, y, ldy, num_threads);
}

template <typename X>
void decode_gemm_int4(const X* x, int64_t M, int64_t K, int64_t ldx, const int4x2* packed,
                      const float* group_scales, int64_t group, int64_t N, X* y, int64_t ldy,
                      int num_threads) {
  run_gemm<X, int4x2>(x, M, K, ldx, packed, group_scales, group, N, y, ldy, num_threads);
}

#define DF_DECODE_GEMM_INST(X, Wt)                                                          \
  template void decode_gemm<X, Wt>(const X*, int64_t, int64_t, int64_t, const Wt*, const float*, \
                                   int64_t, X*, int64_t, int);                                  \
  template const char* decode_gemm_variant<X, Wt>();
DF_DECODE_GEMM_INST(float, float)
DF_DECODE_GEMM_INST(float, bf16)
DF_DECODE_GEMM_INST(float, int8_t)
DF_DECODE_GEMM_INST(bf16, float)
DF_DECODE_GEMM_INST(bf16, bf16)
DF_DECODE_GEMM_INST(bf16, int8_t)
#undef DF_DECODE_GEMM_INST
template void decode_gemm_int4<float>(const float*, int64_t, int64_t, int64_t, const int4x2*, const float*,
                                      int64_t, int64_t, float*, int64_t, int);
template void decode_gemm_int4<bf16>(const bf16*, int64_t, int64_t, int64_t, const int4x2*, const float*,
                                     int64_t, int64_t, bf16*, int64_t, int);
template const char* decode_gemm_variant<float, int4x2>();
template const char* decode_gemm_variant<bf16, int4x2>();

}  // namespace detailflow::cpu
