// cache_attention (CPU): one decode step of attention against a static KV cache.
//
// Formula, per (b, h), with L = start_pos + n_q:
//   k_cache[b,h,start_pos+i] = k_new[b,h,i];  v_cache[b,h,start_pos+i] = v_new[b,h,i]   (i < n_q)
//   out[b,h,i] = sum_j softmax_j(scale * q[b,h,i] . k_cache[b,h,j]) v_cache[b,h,j]       (j < L)
// No mask: a DetailFlow step is 1 position (the causal prefix) or exactly one group of g = 8
// positions, and group-causal attention lets every query of a step see the whole cache plus
// its own step. Scores, softmax (max subtracted) and the weighted sum are fp32; out is cast
// back to the input dtype (round-to-nearest-even for bf16).
//
// Layout contract: q, k_new, v_new, out are (B, H, n_q, d) with any element strides but a
// contiguous last dim (fused-qkv slices pass straight through); k_cache, v_cache are
// contiguous (B, H, L_max, d); all float32 or all bfloat16. The Python wrapper
// (detailflow_engine/ops/cache_attention.py) validates; bindings.cpp re-checks the invariants.
//
// Work split: one item = (b, h, tile of <= 8 query rows). Normally a tile holds all n_q rows,
// so K and V of a head are streamed exactly once and the <= 8 query rows stay in L1. When
// B*H is smaller than the thread count the rows are split across tiles (each re-streams the
// head's K/V, which is tiny then). Keys at positions >= start_pos are read from k_new/v_new
// directly, so the tile that writes the cache (tile 0) never races with the others.
// Per tile: keys in blocks of 64 (K block, then V block, both hot in L1) with an online
// softmax; per block: scores q_i . k_j, running max/sum rescale, then acc_i += p_ij v_j.
// bf16 K/V rows are widened to fp32 (exact) into a per-thread block buffer first.
// exp is a Cephes-style polynomial (rel. error ~2e-7) written so that gcc vectorises it.
//
// Variants, picked once at run time with __builtin_cpu_supports (the binary runs on any
// x86-64; other CPUs get the baseline):
//   - AVX-512 and d = 64 (GPT-L): intrinsics micro-kernels. Scores: 2 query rows x 8 keys in
//     16 accumulators, reduced by one transpose-add tree, so each key row is loaded once per
//     2 rows and there is no horizontal sum per dot product; softmax on masked 16-lane
//     vectors; P.V with 4 query rows (16 zmm) in registers. One Zen core, B=16, L=128:
//     2.6 ns per (query, key) pair at n_q = 8 (6.5-7 ns with the portable loops below).
//   - any other d, and d = 64 without AVX-512: portable loops (d a compile-time constant for
//     64) that gcc vectorises, compiled for AVX-512, AVX2+FMA and baseline x86-64.
//
// Test:  python -m pytest tests/ops/test_cache_attention.py -q
// Bench: python benchmarks/bench_cache_attention.py   (vs index_copy_ + SDPA and vs the _ref)
#include "cache_attention.h"
#include "fast_exp.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace detailflow::cpu {
namespace {

constexpr int64_t kMaxRows = 8;  // query rows per tile = DetailFlow's group size
constexpr int64_t kBlock = 64;   // keys per online-softmax block: K+V block = 32 KB fp32 at d=64

typedef uint32_t __attribute__((may_alias)) u32_alias;
typedef int32_t __attribute__((may_alias)) i32_alias;
typedef uint16_t __attribute__((may_alias)) u16_alias;

template <typename T>
struct Tile {
  const T* q;        // row 0 of this tile
  int64_t q_sn;
  const T* k_new;    // row 0 of this head's new keys (position start_pos)
  int64_t k_sn;
  const T* v_new;
  int64_t v_sn;
  const T* k_cache;  // this head's (L_max, d) cache; rows < start_pos are read from here
  const T* v_cache;
  const T* next_k_cache;  // the head this thread does next (prefetched into L2), or null
  const T* next_v_cache;
  T* out;            // row 0 of this tile
  int64_t o_sn;
  int64_t rows;      // query rows in this tile, 1..kMaxRows
  int64_t d;
  int64_t start_pos;
  int64_t L;
  float scale;
};

// Row pitch of the fp32 scratch rows: d rounded up to 16 floats (64 bytes).
inline int64_t pitch(int64_t d) { return (d + 15) / 16 * 16; }

// Scratch floats one thread needs: q, acc (kMaxRows rows each), widened K and V blocks,
// scores, running max and sum.
inline int64_t scratch_floats(int64_t d) {
  return (2 * kMaxRows + 2 * kBlock) * pitch(d) + kMaxRows * kBlock + 2 * kMaxRows;
}

// fp32 row = scale * src row (bf16 widened by a 16-bit shift, exact).
inline void load_row_scaled(const float* src, float scale, float* dst, int64_t d) {
  for (int64_t x = 0; x < d; ++x) dst[x] = src[x] * scale;
}
inline void load_row_scaled(const bf16* src, float scale, float* dst, int64_t d) {
  const u16_alias* s = reinterpret_cast<const u16_alias*>(src);
  u32_alias* o = reinterpret_cast<u32_alias*>(dst);
  for (int64_t x = 0; x < d; ++x) o[x] = static_cast<uint32_t>(s[x]) << 16;
  for (int64_t x = 0; x < d; ++x) dst[x] *= scale;
}

// dst row = src row * inv in the output dtype. bf16: round-to-nearest-even with integer ops
// (the same rule as dispatch.h from_float, NaN kept quiet), so the loop vectorises.
inline void store_row(const float* src, float inv, float* dst, int64_t d) {
  for (int64_t x = 0; x < d; ++x) dst[x] = src[x] * inv;
}
inline void store_row(const float* src, float inv, bf16* dst, int64_t d) {
  u16_alias* o = reinterpret_cast<u16_alias*>(dst);
  for (int64_t x = 0; x < d; ++x) {
    const float v = src[x] * inv;
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    o[x] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}

// A plain loop, not memcpy: rows are 128-256 bytes and the libc call dominated (5% of a step).
template <typename T>
inline void copy_row(const T* src, T* dst, int64_t d) {
  if (src == dst) return;  // k_new may already live in the cache
  if constexpr (sizeof(T) == 4) {
    const u32_alias* s = reinterpret_cast<const u32_alias*>(src);
    u32_alias* o = reinterpret_cast<u32_alias*>(dst);
    for (int64_t x = 0; x < d; ++x) o[x] = s[x];
  } else {
    static_assert(sizeof(T) == 2, "float32 or bfloat16 rows");
    const u16_alias* s = reinterpret_cast<const u16_alias*>(src);
    u16_alias* o = reinterpret_cast<u16_alias*>(dst);
    for (int64_t x = 0; x < d; ++x) o[x] = s[x];
  }
}

// Asks for rows of the next head's cached K and V in L2 while this head computes: each key
// block prefetches the same block of the next head. The hardware prefetchers retrain on every
// 4 KB page of a new head's rows; without this a DRAM-resident cache (the real case: 24
// layers of cache do not stay in L3 between steps) runs well below the DRAM bandwidth.
template <typename T>
inline void prefetch_rows(const T* k, const T* v, int64_t n) {
  const char* kb = reinterpret_cast<const char*>(k);
  const char* vb = reinterpret_cast<const char*>(v);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(kb + off, 0, 2);
    __builtin_prefetch(vb + off, 0, 2);
  }
}

// max(s[0..n)) and whether any s[j] is NaN. Done on the bits (a signed-int key that orders
// like the floats) because gcc does not vectorise a float max under -ftrapping-math.
inline float block_max(const float* s, int64_t n, bool* nan_seen) {
  const i32_alias* bits = reinterpret_cast<const i32_alias*>(s);
  int32_t key_max = std::numeric_limits<int32_t>::min();
  int32_t nan = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t b = bits[j];
    key_max = std::max(key_max, b ^ ((b >> 31) & 0x7fffffff));
    nan |= (b & 0x7fffffff) > 0x7f800000;
  }
  *nan_seen = nan != 0;
  const int32_t b = key_max ^ ((key_max >> 31) & 0x7fffffff);  // the key map is an involution
  float m;
  std::memcpy(&m, &b, sizeof(m));
  return m;
}

// Points rows[j] at row j of a key/value block. Rows are used in place (fp32, or bf16 for a
// micro-kernel that widens in registers: Row = T); for Row = float, bf16 rows are widened
// (bits << 16, exact) into buf.
template <typename T, typename Row, int D>
inline void block_rows(const T* cache, const T* fresh, int64_t fresh_sn, int64_t start_pos,
                       int64_t j0, int64_t nb, int64_t d_rt, float* buf, const Row** rows) {
  const int64_t d = D > 0 ? D : d_rt;
  const int64_t dp = D > 0 ? D : pitch(d_rt);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t pos = j0 + j;
    const T* src = pos < start_pos ? cache + pos * d : fresh + (pos - start_pos) * fresh_sn;
    if constexpr (std::is_same_v<T, Row>) {
      rows[j] = src;
    } else {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
      u32_alias* dst = reinterpret_cast<u32_alias*>(buf + j * dp);
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) dst[x] = static_cast<uint32_t>(s[x]) << 16;
      rows[j] = buf + j * dp;
    }
  }
}

// Portable inner loops (gcc vectorises them for whatever target they are compiled for).
// scores: sc[i][j] = qf[i] . k_j; accumulate: acc[i] += sc[i][j] * v_j.
struct PortableMicro {
  template <typename T>
  using Row = float;  // bf16 K/V rows are widened into the block buffers first
  template <int D>
  static inline void scores(const float* qf, int64_t dp, int64_t d, int64_t rows,
                            const float* const* krows, int64_t nb, float* sc) {
    for (int64_t j = 0; j < nb; ++j) {
      const float* kr = krows[j];
      for (int64_t i = 0; i < rows; ++i) {
        const float* qi = qf + i * dp;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t x = 0; x < (D > 0 ? D : d); ++x) s += qi[x] * kr[x];
        sc[i * kBlock + j] = s;
      }
    }
  }
  // Online softmax over one block: running max m_i and sum l_i per row; when m_i grows,
  // what earlier blocks put into acc_i and l_i is rescaled by exp(m_old - m_new).
  template <int D>
  static inline void softmax(float* sc, int64_t rows, int64_t nb, bool first_block, float* run_max,
                             float* run_sum, float* acc, int64_t dp, int64_t d) {
    for (int64_t i = 0; i < rows; ++i) {
      float* si = sc + i * kBlock;
      bool nan_seen = false;
      const float m = std::max(run_max[i], block_max(si, nb, &nan_seen));
      if (nan_seen) run_sum[i] = std::numeric_limits<float>::quiet_NaN();  // sticky: row -> NaN
      if (m != run_max[i] && !first_block) {
        const float alpha = exp_nonpos(run_max[i] - m);
        float* a = acc + i * dp;
#pragma omp simd
        for (int64_t x = 0; x < (D > 0 ? D : d); ++x) a[x] *= alpha;
        run_sum[i] *= alpha;
      }
      run_max[i] = m;
      for (int64_t j = 0; j < nb; ++j) si[j] = exp_nonpos(si[j] - m);
      float l = 0.0f;
#pragma omp simd reduction(+ : l)
      for (int64_t j = 0; j < nb; ++j) l += si[j];
      run_sum[i] += l;
    }
  }
  template <int D>
  static inline void accumulate(float* acc, int64_t dp, int64_t d, int64_t rows,
                                const float* const* vrows, int64_t nb, const float* sc) {
    for (int64_t j = 0; j < nb; ++j) {
      const float* vr = vrows[j];
      for (int64_t i = 0; i < rows; ++i) {
        const float p = sc[i * kBlock + j];
        float* a = acc + i * dp;
#pragma omp simd
        for (int64_t x = 0; x < (D > 0 ? D : d); ++x) a[x] += p * vr[x];
      }
    }
  }
};

#if defined(__x86_64__)
#define DF_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))

// AVX-512 inner loops for d = 64 (4 zmm per row). A dot product per zmm register would end
// in a horizontal sum each (~8 shuffles+adds for 4 FMAs); instead 16 keys are accumulated
// in 16 registers and reduced together by a transpose-add tree (45 ops for 16 dots), which
// leaves lane j = q . k_j, i.e. one contiguous 16-score store.
alignas(64) const float kZeroRow[64] = {};

// gcc 12's _mm512_undefined_ps trips -Wmaybe-uninitialized under -Wall (PR105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

DF_TARGET_AVX512 inline __m512 reduce16(__m512 a[16]) {
  __m512 x[8];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  __m512 y[4];
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane sums of 4 accumulators
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
    y[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 fp32 lanes from 16 fp32 or bf16 elements (bf16 widened in registers, exact).
DF_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
DF_TARGET_AVX512 inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename R>
DF_TARGET_AVX512 void scores_avx512_d64(const float* qf, int64_t rows, const R* const* krows,
                                        int64_t nb, float* sc) {
  const R* zero_row = reinterpret_cast<const R*>(kZeroRow);  // all-zero bits: 0 in either type
  int64_t i = 0;
  // Two rows x 8 keys per 16 accumulators: each key row is loaded once for both query rows.
  for (; i + 2 <= rows; i += 2) {
    const float* qa = qf + i * 64;
    const float* qb = qa + 64;
    const __m512 a0 = _mm512_load_ps(qa), a1 = _mm512_load_ps(qa + 16);
    const __m512 a2 = _mm512_load_ps(qa + 32), a3 = _mm512_load_ps(qa + 48);
    const __m512 b0 = _mm512_load_ps(qb), b1 = _mm512_load_ps(qb + 16);
    const __m512 b2 = _mm512_load_ps(qb + 32), b3 = _mm512_load_ps(qb + 48);
    for (int64_t j0 = 0; j0 < nb; j0 += 8) {
      __m512 acc[16];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const R* k = j0 + j < nb ? krows[j0 + j] : zero_row;  // pad the last group with 0
        const __m512 k0 = load16(k), k1 = load16(k + 16), k2 = load16(k + 32), k3 = load16(k + 48);
        acc[j] = _mm512_fmadd_ps(a3, k3, _mm512_fmadd_ps(a2, k2, _mm512_fmadd_ps(a1, k1, _mm512_mul_ps(a0, k0))));
        acc[8 + j] = _mm512_fmadd_ps(b3, k3, _mm512_fmadd_ps(b2, k2, _mm512_fmadd_ps(b1, k1, _mm512_mul_ps(b0, k0))));
      }
      const __m512 s = reduce16(acc);  // lanes 0-7: row i, lanes 8-15: row i + 1
      _mm256_store_ps(sc + i * kBlock + j0, _mm512_castps512_ps256(s));
      _mm256_store_ps(sc + (i + 1) * kBlock + j0, _mm512_extractf32x8_ps(s, 1));
    }
  }
  for (; i < rows; ++i) {  // last odd row (and n_q = 1): 16 keys per 16 accumulators
    const float* qi = qf + i * 64;
    const __m512 q0 = _mm512_load_ps(qi), q1 = _mm512_load_ps(qi + 16);
    const __m512 q2 = _mm512_load_ps(qi + 32), q3 = _mm512_load_ps(qi + 48);
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const R* k = j0 + j < nb ? krows[j0 + j] : zero_row;
        __m512 s = _mm512_mul_ps(q0, load16(k));
        s = _mm512_fmadd_ps(q1, load16(k + 16), s);
        s = _mm512_fmadd_ps(q2, load16(k + 32), s);
        acc[j] = _mm512_fmadd_ps(q3, load16(k + 48), s);
      }
      _mm512_store_ps(sc + i * kBlock + j0, reduce16(acc));  // kBlock % 16 == 0: stays in row i
    }
  }
}

// exp_nonpos with AVX-512 (same polynomial; FMAs; lanes below 2^-126 or NaN/-inf give 0).
DF_TARGET_AVX512 inline __m512 exp_nonpos_avx512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i ni = _mm512_cvtps_epi32(n);  // NaN / -inf -> INT_MIN
  const __mmask16 keep = _mm512_cmpge_epi32_mask(ni, _mm512_set1_epi32(-126));
  const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mul_ps(keep, y, two_n);
}

// The portable softmax (same maths) with masked 16-lane loads and one horizontal max/sum
// per row, instead of gcc's in-order scalar epilogues that dominated short caches.
DF_TARGET_AVX512 void softmax_avx512_d64(float* sc, int64_t rows, int64_t nb, bool first_block,
                                         float* run_max, float* run_sum, float* acc) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < rows; ++i) {
    float* si = sc + i * kBlock;
    __m512 vmax = neg_inf;
    __mmask16 nan_lanes = 0;
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 valid = nb - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nb - j)) - 1);
      const __m512 x = _mm512_mask_loadu_ps(neg_inf, valid, si + j);
      vmax = _mm512_max_ps(vmax, x);
      nan_lanes |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    }
    if (nan_lanes) run_sum[i] = std::numeric_limits<float>::quiet_NaN();  // sticky: row -> NaN
    const float m = std::max(run_max[i], _mm512_reduce_max_ps(vmax));
    if (m != run_max[i] && !first_block) {
      const float alpha_s = std::exp(run_max[i] - m);
      const __m512 alpha = _mm512_set1_ps(alpha_s);
      float* a = acc + i * 64;
      for (int c = 0; c < 64; c += 16) _mm512_store_ps(a + c, _mm512_mul_ps(alpha, _mm512_load_ps(a + c)));
      run_sum[i] *= alpha_s;
    }
    run_max[i] = m;
    const __m512 vm = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 valid = nb - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nb - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpos_avx512(_mm512_sub_ps(_mm512_load_ps(si + j), vm)));
      _mm512_store_ps(si + j, e);  // rows hold kBlock (a multiple of 16) floats
      vsum = _mm512_add_ps(vsum, e);
    }
    run_sum[i] += _mm512_reduce_add_ps(vsum);
  }
}

// acc[r] += sum_j sc[r][j] v_j for R rows held in 4R registers.
template <int R, typename Row>
DF_TARGET_AVX512 inline void accumulate_rows_avx512_d64(float* acc, const Row* const* vrows,
                                                        int64_t nb, const float* sc) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) a[r][c] = _mm512_load_ps(acc + r * 64 + c * 16);
  for (int64_t j = 0; j < nb; ++j) {
    const Row* v = vrows[j];
    const __m512 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(sc[r * kBlock + j]);
      a[r][0] = _mm512_fmadd_ps(p, v0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(p, v1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(p, v2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(p, v3, a[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_store_ps(acc + r * 64 + c * 16, a[r][c]);
}

template <typename Row>
DF_TARGET_AVX512 void accumulate_avx512_d64(float* acc, int64_t rows, const Row* const* vrows,
                                            int64_t nb, const float* sc) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) accumulate_rows_avx512_d64<4>(acc + i * 64, vrows, nb, sc + i * kBlock);
  switch (rows - i) {
    case 3: accumulate_rows_avx512_d64<3>(acc + i * 64, vrows, nb, sc + i * kBlock); break;
    case 2: accumulate_rows_avx512_d64<2>(acc + i * 64, vrows, nb, sc + i * kBlock); break;
    case 1: accumulate_rows_avx512_d64<1>(acc + i * 64, vrows, nb, sc + i * kBlock); break;
    default: break;
  }
}

#pragma GCC diagnostic pop

// bf16 rows are widened in registers: an fp32 copy of the K and V blocks (32 KB) next to the
// incoming lines overflows a 48 KB L1, and bf16 streamed from DRAM at half fp32's GB/s.
struct Avx512D64Micro {
  template <typename T>
  using Row = T;
  template <int D, typename R>
  static inline void scores(const float* qf, int64_t, int64_t, int64_t rows,
                            const R* const* krows, int64_t nb, float* sc) {
    static_assert(D == 64, "the AVX-512 micro-kernel is for d = 64");
    scores_avx512_d64(qf, rows, krows, nb, sc);
  }
  template <int D>
  static inline void softmax(float* sc, int64_t rows, int64_t nb, bool first_block, float* run_max,
                             float* run_sum, float* acc, int64_t, int64_t) {
    static_assert(D == 64, "the AVX-512 micro-kernel is for d = 64");
    softmax_avx512_d64(sc, rows, nb, first_block, run_max, run_sum, acc);
  }
  template <int D, typename R>
  static inline void accumulate(float* acc, int64_t, int64_t, int64_t rows,
                                const R* const* vrows, int64_t nb, const float* sc) {
    static_assert(D == 64, "the AVX-512 micro-kernel is for d = 64");
    accumulate_avx512_d64(acc, rows, vrows, nb, sc);
  }
};
#endif

// One tile: <= kMaxRows query rows of one (b, h) against all L keys of that head.
template <typename T, int D, class Micro>
__attribute__((always_inline)) inline void attend_tile(const Tile<T>& t, float* ws) {
  const int64_t d = D > 0 ? D : t.d;
  const int64_t dp = D > 0 ? D : pitch(t.d);
  const int64_t rows = t.rows;
  float* qf = ws;                        // [kMaxRows][dp], pre-scaled queries
  float* acc = qf + kMaxRows * dp;       // [kMaxRows][dp], unnormalised outputs
  float* kbuf = acc + kMaxRows * dp;     // [kBlock][dp], widened bf16 keys
  float* vbuf = kbuf + kBlock * dp;      // [kBlock][dp], widened bf16 values
  float* sc = vbuf + kBlock * dp;        // [kMaxRows][kBlock], scores then probabilities
  float* run_max = sc + kMaxRows * kBlock;
  float* run_sum = run_max + kMaxRows;
  using Row = typename Micro::template Row<T>;
  const Row* krows[kBlock];
  const Row* vrows[kBlock];

  for (int64_t i = 0; i < rows; ++i) {
    load_row_scaled(t.q + i * t.q_sn, t.scale, qf + i * dp, d);
    float* a = acc + i * dp;
#pragma omp simd
    for (int64_t x = 0; x < d; ++x) a[x] = 0.0f;
    run_max[i] = -std::numeric_limits<float>::infinity();
    run_sum[i] = 0.0f;
  }

  for (int64_t j0 = 0; j0 < t.L; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, t.L - j0);
    if (t.next_k_cache != nullptr && j0 < t.start_pos)  // the next head's rows in its cache
      prefetch_rows(t.next_k_cache + j0 * d, t.next_v_cache + j0 * d, std::min(nb, t.start_pos - j0) * d);
    block_rows<T, Row, D>(t.k_cache, t.k_new, t.k_sn, t.start_pos, j0, nb, t.d, kbuf, krows);
    Micro::template scores<D>(qf, dp, d, rows, krows, nb, sc);
    Micro::template softmax<D>(sc, rows, nb, j0 == 0, run_max, run_sum, acc, dp, d);
    block_rows<T, Row, D>(t.v_cache, t.v_new, t.v_sn, t.start_pos, j0, nb, t.d, vbuf, vrows);
    Micro::template accumulate<D>(acc, dp, d, rows, vrows, nb, sc);
  }

  for (int64_t i = 0; i < rows; ++i) {
    store_row(acc + i * dp, 1.0f / run_sum[i], t.out + i * t.o_sn, d);
  }
}

template <typename T>
using TileFn = void (*)(const Tile<T>&, float*);

template <typename T, int D>
void tile_base(const Tile<T>& t, float* ws) { attend_tile<T, D, PortableMicro>(t, ws); }

#if defined(__x86_64__)
template <typename T, int D>
__attribute__((target("avx2,fma"))) void tile_avx2(const Tile<T>& t, float* ws) {
  attend_tile<T, D, PortableMicro>(t, ws);
}

// d = 64 uses the intrinsics micro-kernel; other d the portable loops compiled for AVX-512.
template <typename T, int D>
DF_TARGET_AVX512 void tile_avx512(const Tile<T>& t, float* ws) {
  if constexpr (D == 64) {
    attend_tile<T, D, Avx512D64Micro>(t, ws);
  } else {
    attend_tile<T, D, PortableMicro>(t, ws);
  }
}

enum class Isa { Base, Avx2, Avx512 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Base;
}
#endif

template <typename T, int D>
TileFn<T> pick_for_isa() {
#if defined(__x86_64__)
  static const Isa isa = detect_isa();
  if (isa == Isa::Avx512) return &tile_avx512<T, D>;
  if (isa == Isa::Avx2) return &tile_avx2<T, D>;
#endif
  return &tile_base<T, D>;
}

template <typename T>
TileFn<T> pick_tile_fn(int64_t d) {
  return d == 64 ? pick_for_isa<T, 64>() : pick_for_isa<T, 0>();
}

}  // namespace

template <typename T>
void cache_attention(const T* q, BhnStrides q_s, const T* k_new, BhnStrides k_s,
                     const T* v_new, BhnStrides v_s, T* k_cache, T* v_cache, T* out,
                     BhnStrides out_s, int64_t B, int64_t H, int64_t n_q, int64_t d,
                     int64_t L_max, int64_t start_pos, float scale, int num_threads) {
  const TileFn<T> fn = pick_tile_fn<T>(d);
  const int64_t bh_count = B * H;
  const int64_t threads = std::max(1, num_threads);
  // Rows per tile: all of them (K/V streamed once per head) unless there are fewer heads
  // than threads; e.g. B*H = 1, n_q = 8, 2 threads -> 2 tiles of 4 rows.
  int64_t rows_per_tile = std::min(n_q, kMaxRows);
  if (bh_count < threads && n_q > 1) {
    const int64_t split = (threads + bh_count - 1) / bh_count;
    rows_per_tile = std::max<int64_t>(1, std::min(rows_per_tile, (n_q + split - 1) / split));
  }
  const int64_t tiles = (n_q + rows_per_tile - 1) / rows_per_tile;
  const int64_t items = bh_count * tiles;
  const int nt = static_cast<int>(std::min<int64_t>(threads, items));
  const int64_t L = start_pos + n_q;
  const size_t ws_bytes = static_cast<size_t>(scratch_floats(d)) * sizeof(float);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* ws = static_cast<float*>(std::aligned_alloc(64, (ws_bytes + 63) / 64 * 64));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t bh = it / tiles;
      const int64_t tile = it % tiles;
      const int64_t b = bh / H;
      const int64_t h = bh % H;
      T* kc = k_cache + bh * L_max * d;
      T* vc = v_cache + bh * L_max * d;
      const T* kn = k_new + b * k_s.b + h * k_s.h;
      const T* vn = v_new + b * v_s.b + h * v_s.h;
      if (tile == 0) {  // the cache write; other tiles of this head read new rows from k_new/v_new
        for (int64_t r = 0; r < n_q; ++r) {
          T* kd = kc + (start_pos + r) * d;
          T* vd = vc + (start_pos + r) * d;
          copy_row(kn + r * k_s.n, kd, d);
          copy_row(vn + r * v_s.n, vd, d);
        }
      }
      const int64_t r0 = tile * rows_per_tile;
      Tile<T> t;
      const bool next_is_new_head = tile == tiles - 1 && bh + 1 < bh_count;
      t.next_k_cache = next_is_new_head ? k_cache + (bh + 1) * L_max * d : nullptr;
      t.next_v_cache = next_is_new_head ? v_cache + (bh + 1) * L_max * d : nullptr;
      t.q = q + b * q_s.b + h * q_s.h + r0 * q_s.n;
      t.q_sn = q_s.n;
      t.k_new = kn;
      t.k_sn = k_s.n;
      t.v_new = vn;
      t.v_sn = v_s.n;
      t.k_cache = kc;
      t.v_cache = vc;
      t.out = out + b * out_s.b + h * out_s.h + r0 * out_s.n;
      t.o_sn = out_s.n;
      t.rows = std::min(rows_per_tile, n_q - r0);
      t.d = d;
      t.start_pos = start_pos;
      t.L = L;
      t.scale = scale;
      fn(t, ws);
    }
    std::free(ws);
  }
}

#define DF_INSTANTIATE_CACHE_ATTENTION(T)                                                   \
  template void cache_attention<T>(const T*, BhnStrides, const T*, BhnStrides, const T*,    \
                                   BhnStrides, T*, T*, T*, BhnStrides, int64_t, int64_t,    \
                                   int64_t, int64_t, int64_t, int64_t, float, int);
DF_INSTANTIATE_CACHE_ATTENTION(float)
DF_INSTANTIATE_CACHE_ATTENTION(::detailflow::bf16)
#undef DF_INSTANTIATE_CACHE_ATTENTION

}  // namespace detailflow::cpu
