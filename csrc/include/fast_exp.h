// A vectorisable fp32 exp shared by the CPU kernels (cache_attention's softmax, decode_layer's SiLU).
#pragma once
#include <cstdint>
#include <cstring>

namespace detailflow::cpu {

// exp(x) for x <= 0: Cephes expf polynomial after Cody-Waite range reduction (rel. error
// ~2e-7). Results below 2^-126 are flushed to 0 with an integer mask instead of a float
// clamp/select: under gcc's default -ftrapping-math a float select blocks vectorisation
// without AVX-512 masks, and this loop is the whole softmax.
inline float exp_nonpos(float x) {
  // n = round(x / ln2) by the 1.5 * 2^23 trick (plain adds, so it vectorises on any ISA)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);  // x = -inf or < -2^31 ln2: INT_MIN -> flushed
  const int32_t keep = -static_cast<int32_t>(ni >= -126);
  const int32_t two_n_bits = (ni + 127) * (1 << 23);
  float two_n;
  std::memcpy(&two_n, &two_n_bits, sizeof(two_n));
  const float value = y * two_n;
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= keep;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

}  // namespace detailflow::cpu
