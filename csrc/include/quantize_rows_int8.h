// Per-row int8 quantization of a decode step's activations, shared by the W8A8 and W4A8 CPU
// kernels (cpu/decode_gemm_w8a8.cpp, cpu/decode_gemm_w4a8.cpp) so both quantize exactly as
// ops.decode_gemm_w8a8.quantize_rows does:
//   s_x = max_k |x[k]| / 127 (fp32; NaN when a value is not finite)
//   q[k] = round_half_even(clamp(x[k] / s_x, -127, 127))   (s_x = 0: divide by 1; bad row: q = 0)
// stored offset as u = q + 128 (u8), the operand vpdpbusd reads unsigned; the W4A8 kernel flips
// it back to s8 (u ^ 0x80). Both variants give the same bits (the vector one divides, clamps and
// rounds lane by lane in the same order). Compile the including file with -ffp-contract=off.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dispatch.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace detailflow::cpu::int8_rows {

constexpr int kLanes = 16;
constexpr float kNoScale = std::numeric_limits<float>::quiet_NaN();

// The scale of a row from its max |x| and whether every value was finite.
inline float row_scale(float amax, bool finite) { return finite ? amax / 127.0f : kNoScale; }

// 1.5 * 2^23: (t + kRound) - kRound is t rounded to the nearest integer, ties to even, for
// |t| < 2^22 (IEEE addition in the default rounding mode), as vcvtps2dq and torch.round do.
constexpr float kRound = 12582912.0f;

// Row of x -> u = q + 128 in q_row[0, K) (128 = q 0 in [K, Kp)); returns s_x.
template <typename X>
float quantize_row_portable(const X* row, int64_t K, int64_t Kp, uint8_t* q_row) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(to_float(row[k]));
    finite = finite && a <= FLT_MAX;  // false for inf and NaN
    amax = a > amax ? a : amax;
  }
  const float s = row_scale(amax, finite);
  const float safe = s > 0.0f ? s : 1.0f;  // NaN > 0 is false: a bad row quantizes to 0 below
  for (int64_t k = 0; k < K; ++k) {
    const float t = std::min(std::max(to_float(row[k]) / safe, -127.0f), 127.0f);
    q_row[k] = finite ? static_cast<uint8_t>(static_cast<int>((t + kRound) - kRound) + 128) : 128;
  }
  for (int64_t k = K; k < Kp; ++k) q_row[k] = 128;
  return s;
}

#if defined(__x86_64__)
#define DF_INT8_ROWS_VNNI \
  inline __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,prefer-vector-width=512")))
#define DF_INT8_ROWS_INLINE \
  inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

DF_INT8_ROWS_INLINE __mmask16 tail_mask(int64_t n) {
  return n >= kLanes ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}
DF_INT8_ROWS_INLINE __m512 load16(const float* p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
DF_INT8_ROWS_INLINE __m512 load16(const bf16* p, __mmask16 mk) {
  const __m256i h = _mm256_maskz_loadu_epi16(mk, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // exact
}
DF_INT8_ROWS_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }  // whole vectors
DF_INT8_ROWS_INLINE __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// quantize_row_portable with 16 lanes: the same divisions, clamps and ties-to-even rounding.
// max |x| is taken on the bit patterns (for x >= 0 their unsigned order is the float order,
// and inf / NaN lie above FLT_MAX's), in 4 independent chains over whole vectors; whole vectors
// load and store unmasked, only the tail is masked. (Masked loads / stores and one max chain
// made this ~1.6x slower on Zen 4: 4.4 vs 2.8 us for 16 rows of 1024 bf16, 2026-12-03.)
DF_INT8_ROWS_INLINE __m512i abs_bits(__m512 v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
}
// u = q + 128 of 16 values (t = clamp(v / safe)), as 16 bytes.
DF_INT8_ROWS_INLINE __m128i codes16(__m512 v, __m512 safe) {
  const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, safe), _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  return _mm512_cvtepi32_epi8(
      _mm512_add_epi32(_mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), _mm512_set1_epi32(128)));
}
template <typename X>
DF_INT8_ROWS_VNNI float quantize_row_vnni(const X* row, int64_t K, int64_t Kp, uint8_t* q_row) {
  __m512i vmax[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  const int64_t K64 = K / (4 * kLanes) * (4 * kLanes), K16 = K / kLanes * kLanes;
  int64_t k = 0;
  for (; k < K64; k += 4 * kLanes)
    for (int i = 0; i < 4; ++i) vmax[i] = _mm512_max_epu32(vmax[i], abs_bits(load16(row + k + i * kLanes)));
  for (; k < K; k += kLanes) vmax[0] = _mm512_max_epu32(vmax[0], abs_bits(load16(row + k, tail_mask(K - k))));
  const uint32_t amax_bits = _mm512_reduce_max_epu32(
      _mm512_max_epu32(_mm512_max_epu32(vmax[0], vmax[1]), _mm512_max_epu32(vmax[2], vmax[3])));
  const bool finite = amax_bits <= 0x7f7fffffu;  // FLT_MAX's bits
  float amax;
  std::memcpy(&amax, &amax_bits, sizeof(amax));
  const float s = row_scale(amax, finite);
  if (!finite) {
    std::memset(q_row, 128, static_cast<size_t>(Kp));  // q = 0
    return s;
  }
  const __m512 safe = _mm512_set1_ps(s > 0.0f ? s : 1.0f);
  for (k = 0; k < K16; k += kLanes)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q_row + k), codes16(load16(row + k), safe));
  for (; k < Kp; k += kLanes)  // k >= K loads 0: u = 128
    _mm_mask_storeu_epi8(q_row + k, tail_mask(Kp - k), codes16(load16(row + k, tail_mask(K - k)), safe));
  return s;
}
#undef DF_INT8_ROWS_VNNI
#undef DF_INT8_ROWS_INLINE
#endif  // __x86_64__

// Row m of x (row stride ldx) -> its u8 codes at q + m Kp and its scale: the vector loop where
// the CPU has VNNI (`vnni`), else the portable one; the same bits.
template <typename X>
float quantize_row(const X* x, int64_t m, int64_t ldx, int64_t K, int64_t Kp, uint8_t* q, bool vnni) {
#if defined(__x86_64__)
  if (vnni) return quantize_row_vnni(x + m * ldx, K, Kp, q + m * Kp);
#endif
  (void)vnni;
  return quantize_row_portable(x + m * ldx, K, Kp, q + m * Kp);
}

// Whether this CPU runs the VNNI loops (avx512f/bw/vl/dq + avx512_vnni).
inline bool cpu_has_vnni() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

}  // namespace detailflow::cpu::int8_rows
