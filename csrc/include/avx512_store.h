// 16 fp32 lanes stored as float or as bf16 rounded to nearest even (torch's rounding; NaN stays a
// quiet NaN), bit for bit `store_float` of dispatch.h; masked lanes untouched. Shared by the
// AVX-512 loops of cpu/decode_gemm.cpp and cpu/decode_gemm_w8a8.cpp (x86-64 only).
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>

#include "dispatch.h"

namespace detailflow::cpu {

#define DF_AVX512_STORE inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl")))

DF_AVX512_STORE void store16(float* y, __m512 v, __mmask16 mk) { _mm512_mask_storeu_ps(y, mk, v); }

DF_AVX512_STORE void store16(bf16* y, __m512 v, __mmask16 mk) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(y, mk, _mm512_cvtepi32_epi16(r));
}

#undef DF_AVX512_STORE

}  // namespace detailflow::cpu
#endif  // __x86_64__
