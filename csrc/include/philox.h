// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), identical to Random123's
// philox4x32_R(10, ctr, key) and to cuRAND's Philox4_32_10 core, so host and device code
// produce the same bits. Header-only and DF_HD so a CUDA kernel can include it unchanged.
//
// Round:  (lo0, hi0) = 0xD2511F53 * c0,  (lo1, hi1) = 0xCD9E8D57 * c2   (32x32 -> 64 bit)
//         c = (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)
// Key schedule: k0 += 0x9E3779B9, k1 += 0xBB67AE85 between rounds (10 rounds, 9 bumps).
// Known answers (Random123 kat_vectors), checked in tests/ops/test_group_sample.py:
//   ctr 0,0,0,0 key 0,0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
//   ctr ffffffff x4 key ffffffff x2 -> 408f276d 41c83b0e a20bc7c6 6d5451fd
//   ctr 243f6a88 85a308d3 13198a2e 03707344 key a4093822 299f31d0
//       -> d16cfe09 94fdcceb 5001e420 24126ea1
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

namespace detailflow {

struct Philox4x32 {
  uint32_t v[4];
};

DF_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t lo0 = static_cast<uint32_t>(p0), hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(p1), hi1 = static_cast<uint32_t>(p1 >> 32);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The sampling draw of DetailFlow Engine: key = the image seed's two's-complement 64 bits
// (low word, high word), counter = (token position, 0, 0, 0); the first output word's top 24
// bits are the uniform variate u = u24 * 2^-24 in [0, 1). Returns u24 (0 .. 2^24 - 1).
DF_HD uint32_t sample_u24(int64_t seed, int64_t position) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(position), 0u, 0u, 0u,
                                     static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return r.v[0] >> 8;
}

}  // namespace detailflow
