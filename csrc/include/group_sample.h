// group_sample: fused CFG + temperature + top-k/top-p + seeded inverse-CDF draw over the
// vocabulary, one draw per (image, token position). See csrc/cpu/group_sample.cpp for the
// contract; detailflow_engine/ops/group_sample.py:group_sample_ref is the oracle.
//
// The per-element arithmetic that decides which token is drawn lives here as DF_HD inline
// functions so the CPU kernel, the CUDA kernel (cuda/group_sample.cu) and the torch reference
// share ONE exact definition: single IEEE fp32 ops in a fixed order, never contracted into FMA,
// then integer (uint64) masses, whose sums and prefix sums are exact in any summation order.
// The CUDA kernel reproduces the CPU tokens bit for bit because it computes, per element,
//   x = DF_FADD(u, DF_FMUL(s, DF_FSUB(c, u)))   (CFG; else x = c), x = -inf if NaN,
//   y = __fdiv_rn(x, t) when t != 1,  m = max y (exact in any order),
//   q = gs_mass(DF_FSUB(y, m)) (kept tokens), and the integer rules of cpu/group_sample.cpp
// (never build it with --use_fast_math). Checked: nvcc -arch=sm_90a emits only mul.rn/add.rn/
// sub.rn for gs_exp_mass, no fma.
#pragma once
#include <cstdint>
#include <cstring>

#include "philox.h"

#ifdef __CUDA_ARCH__  // device pass: the _rn intrinsics are never contracted into FMA
#define DF_FADD(a, b) __fadd_rn((a), (b))
#define DF_FSUB(a, b) __fsub_rn((a), (b))
#define DF_FMUL(a, b) __fmul_rn((a), (b))
#else
#define DF_FADD(a, b) ((a) + (b))
#define DF_FSUB(a, b) ((a) - (b))
#define DF_FMUL(a, b) ((a) * (b))
#endif

namespace detailflow {

// The bits of a float as a uint32 and back: the intrinsics on the device, memcpy on the host.
#ifdef __CUDA_ARCH__
DF_HD uint32_t gs_f2u(float f) { return __float_as_uint(f); }
DF_HD float gs_u2f(uint32_t u) { return __uint_as_float(u); }
#else
template <typename To, typename From>
DF_HD To gs_bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "gs_bit_cast: sizes differ");
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}
DF_HD uint32_t gs_f2u(float f) { return gs_bit_cast<uint32_t>(f); }
DF_HD float gs_u2f(uint32_t u) { return gs_bit_cast<float>(u); }
#endif

// Masses are trunc(gs_exp_mass(d)) ~ 2^40 exp(d) for d = y - max(y) >= kGsCutoff, else 0:
// a token 28 nats below the row maximum has probability < 2^-40 relative to it, far below
// the 2^-24 resolution of the uniform variate. V < 2^23 keeps every sum below 2^63.
constexpr float kGsCutoff = -28.0f;
constexpr int kGsMassBits = 40;
constexpr int64_t kGsMaxVocab = (int64_t{1} << 23) - 1;
constexpr int64_t kGsTopPOne = int64_t{1} << 24;  // top_p quantized to top_p24 / 2^24

// 2^40 * exp(d) for d in [kGsCutoff, 0], evaluated op by op in fp32; the token's mass is this
// value truncated to uint64 (gs_mass). Cephes expf: n = rint(d log2 e) by the 1.5*2^23 trick
// (round-half-even), Cody-Waite r = d - n ln2 (n * C1 exact: C1 has 8 significant bits),
// degree-5 polynomial, then scale by 2^(n+40) (exact: a power of two, result normal).
// d = 0 gives exactly 2^40.
DF_HD float gs_exp_mass(float d) {
  const float t = DF_FMUL(d, 0x1.715476p+0f);                        // log2(e)
  const float n = DF_FSUB(DF_FADD(t, 12582912.0f), 12582912.0f);     // rint(t), |t| < 2^22
  float r = DF_FSUB(d, DF_FMUL(n, 0x1.63p-1f));                       // C1 = 0.693359375
  r = DF_FSUB(r, DF_FMUL(n, -0x1.bd0106p-13f));                       // C2 = -2.12194440e-4
  const float z = DF_FMUL(r, r);
  float p = 0x1.a0d2cep-13f;
  p = DF_FADD(DF_FMUL(p, r), 0x1.6e879cp-10f);
  p = DF_FADD(DF_FMUL(p, r), 0x1.11121p-7f);
  p = DF_FADD(DF_FMUL(p, r), 0x1.555382p-5f);
  p = DF_FADD(DF_FMUL(p, r), 0x1.555554p-3f);
  p = DF_FADD(DF_FMUL(p, r), 0x1.0p-1f);
  p = DF_FADD(DF_FMUL(p, z), r);
  p = DF_FADD(p, 1.0f);
  // 2^(n + 40) built from its exponent bits; n in [-40, 0] so the biased exponent is 127..167.
  const int32_t e = static_cast<int32_t>(n) + (127 + kGsMassBits);
  return DF_FMUL(p, gs_u2f(static_cast<uint32_t>(e) << 23));
}

// The integer mass of a token, trunc(gs_exp_mass(d)), 0 when d < kGsCutoff (also d = -inf).
DF_HD uint64_t gs_mass(float d) {
  return d >= kGsCutoff ? static_cast<uint64_t>(gs_exp_mass(d)) : 0u;
}

// floor(a24 * total / 2^24) without 128-bit arithmetic, for a24 <= 2^24 and total < 2^63:
// total = th * 2^24 + tl, so the result is a24 * th + floor(a24 * tl / 2^24), all in uint64.
DF_HD uint64_t gs_mulshift24(uint64_t a24, uint64_t total) {
  return a24 * (total >> 24) + ((a24 * (total & 0xFFFFFFu)) >> 24);
}

// Order key for the top-p sort: larger y -> larger key, -0 == +0, so sorting by
// (key descending, index ascending) is sorting by (y descending, index ascending).
DF_HD uint32_t gs_order_key(float y) {
  const uint32_t u = gs_f2u((y == 0.0f) ? 0.0f : y);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

namespace cpu {

struct GroupSampleParams {
  int64_t batch;       // B images; the logits hold R = B rows, or R = 2B with CFG
  int64_t n_q;         // positions sampled per image in this step
  int64_t vocab;       // V, 1 .. kGsMaxVocab
  int64_t stride_row;  // element stride of logits dim 0 (R)
  int64_t stride_pos;  // element stride of logits dim 1 (n_q); dim 2 is contiguous
  bool cfg;            // rows [0, B) conditional, [B, 2B) unconditional
  float cfg_scale;     // s in u + s * (c - u)
  float temperature;   // max(temperature, 1e-5) rounded to fp32 (1 = no division)
  int64_t top_k;       // 0 = off, else 2 .. V-1
  int64_t top_p24;     // round(top_p * 2^24); kGsTopPOne = off
  bool greedy;         // argmax of the mixed logits, no RNG (temperature 0 or top_k 1)
};

// tokens: int64 (B, n_q) contiguous; logprobs: float32 (B, n_q) contiguous or nullptr.
template <typename scalar_t>
void group_sample(const scalar_t* logits, const GroupSampleParams& p, const int64_t* seeds,
                  const int64_t* positions, int64_t* tokens, float* logprobs, int num_threads);

}  // namespace cpu
}  // namespace detailflow
