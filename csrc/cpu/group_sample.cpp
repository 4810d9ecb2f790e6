// group_sample (CPU): fused parallel-group sampling for the DetailFlow prior.
//
// What: for every image b < B and step position j < n_q (token position pos[j]):
//   x_i  = u_i + s * (c_i - u_i)          c = logits[b, j], u = logits[B + b, j] (CFG: R = 2B)
//        = c_i                            (no CFG: R = B)
//   x_i  = -inf where x_i is NaN
//   greedy (temperature == 0 or top_k == 1): token = first argmax_i x_i, logprob = 0, no RNG.
//   y_i  = x_i / t                        t = fp32(max(temperature, 1e-5)), skipped when t == 1
//   m    = max_i y_i;  d_i = 0 if y_i == m else y_i - m   (matters only for m = +-inf)
//   top-k (2 <= k < V): keep y_i >= the k-th largest y (ties at the threshold kept)
//   q_i  = trunc(2^40 exp(d_i)) (gs_exp_mass: exact fp32 op order) if kept and d_i >= -28, else 0
//   top-p (p24 = round(top_p 2^24) < 2^24): order the kept tokens by (y desc, index asc);
//          keep a token iff the mass strictly before it is <= floor(p24 * T / 2^24), T = sum q
//          (= HF/official: drop cumulative prob > top_p, shifted so the first always stays)
//   draw:  u24 = Philox4x32-10(key = (seed lo32, seed hi32), counter = (pos[j], 0, 0, 0))[0] >> 8
//          token = smallest i with sum_{k <= i} q_k > floor(u24 * T_f / 2^24) (vocabulary order)
//   logprob = fp32(double(d_token) - log(double(T_f) 2^-40))
// All sums are uint64 sums of integers, so totals and prefix sums are exact in any order: a
// CUDA kernel using block reductions and scans reproduces these tokens bit for bit, as long as
// it evaluates the fp32 steps with the same ops (csrc/include/group_sample.h, DF_F* macros).
// This file must be compiled without FMA contraction of those steps: the pragma below turns it
// off for the whole translation unit (AVX-512F alone would let gcc fuse a*b+c).
//
// Layout: logits (R, n_q, V) float32 or bfloat16, element strides (stride_row, stride_pos, 1);
// seeds int64 (B,), positions int64 (n_q,), tokens int64 (B, n_q), logprobs float32 (B, n_q).
//
// Variants, per row (OpenMP over the B*n_q rows; each thread keeps ~320 KB of thread_local
// scratch for V = 8192; the row code is compiled twice, generic x86-64 and AVX-512, picked once
// at run time, with identical results):
//   greedy        one pass: mix + NaN mask + max, then the first index equal to the max.
//   dense         top-k off or k > V/16: masses for all V tokens (vectorized exp), then the
//                 draw walks 64-token block sums, then one block.
//   top-k         the k-th largest value: tokens are bucketed by d at 1/8 nat (a bucket never
//                 holds a larger y than an earlier one), counted, and nth_element runs only in
//                 the bucket holding the k-th value. k <= V/16: the candidates >= it are
//                 gathered in index order and only they get masses.
//   top-p         same buckets, weighted by mass: the bucket where the mass crosses the top-p
//                 threshold is sorted exactly by (y desc, index asc) to find the cut; no full sort.
//
// Test:  python -m pytest tests/ops/test_group_sample.py -q
// Bench: python benchmarks/bench_group_sample.py

// No FMA contraction anywhere in this file (the exact fp32 op order is the RNG contract), and
// no trapping-math so gcc may if-convert selects (exception flags are not observed).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>

#include "dispatch.h"
#include "group_sample.h"

#define DF_INLINE inline __attribute__((always_inline))

namespace detailflow::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 64;  // draw: walk block sums of 64 masses, then one block
constexpr uint32_t kCutoffBits = 0xC1E00000u;  // bits of -28.0f (kGsCutoff)
static_assert(kGsCutoff == -28.0f, "kCutoffBits must be the bit pattern of kGsCutoff");

template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

// Per-thread buffers, kept across calls (thread_local: the OpenMP pool threads persist), so a
// decode step does not pay ~350 KB of fresh pages per thread for V = 8192.
struct Scratch {
  int64_t cap = 0;
  std::unique_ptr<float[]> y;      // scaled mixed logits of the row
  std::unique_ptr<float[]> cy;     // sparse candidates' logits (index order); bucket_select copy
  std::unique_ptr<float[]> w;      // candidate masses as floats (2^40 exp(d), untruncated)
  std::unique_ptr<int32_t[]> ci;   // sparse candidates' vocabulary indices
  std::unique_ptr<uint64_t[]> q;   // candidate masses
  std::unique_ptr<uint64_t[]> blk; // sums of q over blocks of kBlock candidates
  std::unique_ptr<int32_t[]> si;   // d-bucket of each candidate (bucket_select, top_p_cut)
  std::unique_ptr<uint64_t[]> sq;  // top-p: the crossing bucket as (~key << 32 | position)

  void reserve(int64_t V) {
    if (V <= cap) return;
    y = buffer<float>(V);
    cy = buffer<float>(V);
    w = buffer<float>(V);
    ci = buffer<int32_t>(V);
    q = buffer<uint64_t>(V);
    blk = buffer<uint64_t>(V / kBlock + 1);
    si = buffer<int32_t>(V);
    sq = buffer<uint64_t>(V);
    cap = V;
  }
};

Scratch& thread_scratch(int64_t V) {
  thread_local Scratch s;
  s.reserve(V);
  return s;
}

// y = mix(c, u) [/ t], NaN -> -inf; returns max y.
template <bool kCfg, bool kTemp, typename T>
DF_INLINE float mix_row(const T* __restrict c, const T* __restrict u, int64_t V, float s, float t,
                        float* __restrict y) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < V; ++i) {
    const float ci = to_float(c[i]);
    float x = ci;
    if constexpr (kCfg) {
      const float ui = to_float(u[i]);
      x = DF_FADD(ui, DF_FMUL(s, DF_FSUB(ci, ui)));
    }
    x = (x != x) ? kNegInf : x;
    if constexpr (kTemp) x = x / t;
    y[i] = x;
    m = m > x ? m : x;
  }
  return m;
}

template <typename T>
DF_INLINE float mix(const T* c, const T* u, const GroupSampleParams& p, bool temp, float* y) {
  const int64_t V = p.vocab;
  if (p.cfg) {
    return temp ? mix_row<true, true>(c, u, V, p.cfg_scale, p.temperature, y)
                : mix_row<true, false>(c, u, V, p.cfg_scale, p.temperature, y);
  }
  return temp ? mix_row<false, true>(c, u, V, p.cfg_scale, p.temperature, y)
              : mix_row<false, false>(c, u, V, p.cfg_scale, p.temperature, y);
}

// w_j = 2^40 exp(y_j - m) where y_j - m >= -28 and y_j >= thr, else 0 (m finite, so
// d = y - m <= 0 and is exactly 0 at the max). The clamp and the mask work on the bits
// (for d <= 0 a larger |d| has larger bits), so no fp select feeds arithmetic.
DF_INLINE void masses(const float* __restrict y, int64_t L, float m, float thr,
                      float* __restrict w) {
#pragma omp simd
  for (int64_t j = 0; j < L; ++j) {
    const float yj = y[j];
    const uint32_t du = gs_f2u(DF_FSUB(yj, m));
    const float e = gs_exp_mass(gs_u2f(du < kCutoffBits ? du : kCutoffBits));
    const uint32_t keep = ((du <= kCutoffBits) & (yj >= thr)) ? 0xFFFFFFFFu : 0u;
    w[j] = gs_u2f(gs_f2u(e) & keep);
  }
}

// q_j = mass(j) for j < L, the block sums of q and their exact total.
template <typename Mass>
DF_INLINE uint64_t set_masses(int64_t L, uint64_t* __restrict q, uint64_t* __restrict blk, Mass mass) {
  uint64_t total = 0;
  for (int64_t b0 = 0; b0 < L; b0 += kBlock) {
    const int64_t end = std::min(b0 + kBlock, L);
    uint64_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = b0; j < end; ++j) {
      const uint64_t v = mass(j);
      q[j] = v;
      sum += v;
    }
    blk[b0 / kBlock] = sum;
    total += sum;
  }
  return total;
}

// q_j = trunc(w_j) (= floor: 0 <= w <= 2^40), block sums, exact total.
DF_INLINE uint64_t to_integer(const float* __restrict w, int64_t L, uint64_t* __restrict q,
                              uint64_t* __restrict blk) {
  return set_masses(L, q, blk, [w](int64_t j) { return static_cast<uint64_t>(static_cast<int64_t>(w[j])); });
}

// Buckets of d = y - m at 1/8 nat: bucket = trunc(-8 max(d, -28)) in [0, kBuckets). A larger
// y never has a larger bucket, so buckets split the (y desc) order into consecutive runs and
// only the one run holding the k-th value or the top-p cut needs sorting.
constexpr int kBuckets = 225;
constexpr int kHist = 4;  // interleaved histograms break store-to-load chains on a hot bucket

DF_INLINE void d_buckets(const float* __restrict y, int64_t L, float m, int32_t* __restrict bk) {
#pragma omp simd
  for (int64_t j = 0; j < L; ++j) {
    const uint32_t du = gs_f2u(DF_FSUB(y[j], m));
    const float dc = gs_u2f(du < kCutoffBits ? du : kCutoffBits);  // d <= 0: clamp on the bits
    bk[j] = static_cast<int32_t>(DF_FMUL(dc, -8.0f));
  }
}

// k-th largest y (with multiplicity), 2 <= k < V: count tokens per bucket, then nth_element
// inside the bucket that holds the k-th value.
DF_INLINE float bucket_select(const float* y, int64_t V, float m, int64_t k, Scratch& s) {
  int32_t* bk = s.si.get();
  d_buckets(y, V, m, bk);
  int32_t h[kHist][kBuckets] = {};
  for (int64_t j = 0; j < V; ++j) ++h[j & (kHist - 1)][bk[j]];
  int64_t before = 0;
  int b = 0;
  for (;; ++b) {
    const int64_t c = h[0][b] + h[1][b] + h[2][b] + h[3][b];
    if (before + c >= k) break;
    before += c;
  }
  float* tmp = s.cy.get();
  int64_t n = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (bk[j] == b) tmp[n++] = y[j];
  }
  const int64_t need = k - before;  // 1-based rank inside the bucket
  std::nth_element(tmp, tmp + (need - 1), tmp + n, std::greater<float>());
  return tmp[need - 1];
}

// Top-p: among candidates ordered by (y desc, position asc), find the first whose inclusive
// mass exceeds pth. Returns false when none does (keep all); else its key and position.
// Mass histogram over the d-buckets, then an exact sort of the crossing bucket only.
DF_INLINE bool top_p_cut(const float* y, const uint64_t* q, int64_t L, float m, uint64_t pth,
                         Scratch& s, uint32_t* key_cut, int64_t* pos_cut) {
  int32_t* bk = s.si.get();
  d_buckets(y, L, m, bk);
  uint64_t h[kHist][kBuckets] = {};
  for (int64_t j = 0; j < L; ++j) h[j & (kHist - 1)][bk[j]] += q[j];
  uint64_t above = 0;  // mass of the candidates ordered strictly before the current bucket
  int b = 0;
  for (; b < kBuckets; ++b) {
    const uint64_t c = h[0][b] + h[1][b] + h[2][b] + h[3][b];
    if (above + c > pth) break;
    above += c;
  }
  if (b == kBuckets) return false;  // total <= pth: nothing is cut
  // (key desc, position asc) as one ascending uint64: (~key << 32) | position
  uint64_t* packed = s.sq.get();
  int64_t n = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (bk[j] == b && q[j] != 0) {
      packed[n++] = (static_cast<uint64_t>(~gs_order_key(y[j])) << 32) | static_cast<uint64_t>(j);
    }
  }
  std::sort(packed, packed + n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t j = static_cast<int64_t>(packed[t] & 0xFFFFFFFFu);
    above += q[j];
    if (above > pth) {
      *key_cut = ~static_cast<uint32_t>(packed[t] >> 32);
      *pos_cut = j;
      return true;
    }
  }
  return false;  // unreachable: the bucket's mass crossed pth
}

// Zero the masses ordered after the cut (key, position); rebuild block sums; new total.
DF_INLINE uint64_t apply_cut(const float* __restrict y, int64_t L, uint32_t key_cut,
                             int64_t pos_cut, uint64_t* __restrict q, uint64_t* __restrict blk) {
  return set_masses(L, q, blk, [=](int64_t j) -> uint64_t {
    const uint32_t key = gs_order_key(y[j]);
    const bool keep = (key > key_cut) | ((key == key_cut) & (j <= pos_cut));
    return keep ? q[j] : 0u;
  });
}

// Smallest j with q_0 + .. + q_j > target (target < total).
DF_INLINE int64_t draw(const uint64_t* q, const uint64_t* blk, uint64_t target) {
  uint64_t acc = 0;
  int64_t b = 0;
  while (acc + blk[b] <= target) acc += blk[b++];
  int64_t j = b * kBlock;
  for (;; ++j) {
    acc += q[j];
    if (acc > target) return j;
  }
}

template <typename T>
DF_INLINE int64_t sample_row(const T* c, const T* u, const GroupSampleParams& p, uint32_t u24,
                             Scratch& s, float* logprob) {
  const int64_t V = p.vocab;
  float* y = s.y.get();
  if (p.greedy) {
    const float m = mix(c, u, p, /*temp=*/false, y);
    int64_t i = 0;
    while (i < V - 1 && !(y[i] == m)) ++i;
    *logprob = 0.0f;
    return i;
  }
  float m = mix(c, u, p, p.temperature != 1.0f, y);
  if (!(m > kNegInf && m < -kNegInf)) {
    // max is +-inf: d = 0 where y == m, else -inf; make that the finite case m = 0 (same
    // masses; the order among zero-mass tokens does not matter)
    for (int64_t i = 0; i < V; ++i) y[i] = (y[i] == m) ? 0.0f : kNegInf;
    m = 0.0f;
  }

  // candidates: all V tokens, or those >= the top-k threshold gathered in index order
  const float* cy = y;
  const int32_t* ci = nullptr;
  int64_t L = V;
  float thr = kNegInf;
  if (p.top_k > 0) {
    thr = bucket_select(y, V, m, p.top_k, s);
    if (p.top_k <= V / 16) {
      L = 0;
      for (int64_t i = 0; i < V; ++i) {
        if (y[i] >= thr) {
          s.cy[L] = y[i];
          s.ci[L++] = static_cast<int32_t>(i);
        }
      }
      cy = s.cy.get();
      ci = s.ci.get();
      thr = kNegInf;  // applied
    }
  }
  masses(cy, L, m, thr, s.w.get());
  uint64_t* q = s.q.get();
  uint64_t total = to_integer(s.w.get(), L, q, s.blk.get());

  if (p.top_p24 < kGsTopPOne) {
    const uint64_t pth = gs_mulshift24(static_cast<uint64_t>(p.top_p24), total);
    uint32_t key_cut;
    int64_t pos_cut;
    if (top_p_cut(cy, q, L, m, pth, s, &key_cut, &pos_cut)) {
      total = apply_cut(cy, L, key_cut, pos_cut, q, s.blk.get());
    }
  }

  // inverse CDF in vocabulary order with exact integer prefix sums
  const int64_t j = draw(q, s.blk.get(), gs_mulshift24(u24, total));
  const float d = DF_FSUB(cy[j], m);
  *logprob = static_cast<float>(static_cast<double>(d) -
                                std::log(static_cast<double>(total) * 0x1p-40));
  return ci ? ci[j] : j;
}

// The same row code compiled twice; results are identical (no contraction, same op order).
template <typename T>
int64_t sample_row_generic(const T* c, const T* u, const GroupSampleParams& p, uint32_t u24,
                           Scratch& s, float* logprob) {
  return sample_row(c, u, p, u24, s, logprob);
}

template <typename T>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) int64_t sample_row_avx512(
    const T* c, const T* u, const GroupSampleParams& p, uint32_t u24, Scratch& s,
    float* logprob) {
  return sample_row(c, u, p, u24, s, logprob);
}

bool cpu_has_avx512() {
  static const bool has =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}

}  // namespace

template <typename scalar_t>
void group_sample(const scalar_t* logits, const GroupSampleParams& p, const int64_t* seeds,
                  const int64_t* positions, int64_t* tokens, float* logprobs, int num_threads) {
  const int64_t rows = p.batch * p.n_q;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, rows)));
  const auto row_fn =
      cpu_has_avx512() ? &sample_row_avx512<scalar_t> : &sample_row_generic<scalar_t>;
#pragma omp parallel num_threads(nt)
  {
    Scratch& s = thread_scratch(p.vocab);
#pragma omp for schedule(dynamic, 1)  // row costs vary (top-k/top-p buckets)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.n_q, j = r % p.n_q;
      const scalar_t* c = logits + b * p.stride_row + j * p.stride_pos;
      const scalar_t* u = p.cfg ? logits + (p.batch + b) * p.stride_row + j * p.stride_pos : c;
      const uint32_t u24 = p.greedy ? 0u : sample_u24(seeds[b], positions[j]);
      float lp;
      tokens[r] = row_fn(c, u, p, u24, s, &lp);
      if (logprobs) logprobs[r] = lp;
    }
  }
}

template void group_sample<float>(const float*, const GroupSampleParams&, const int64_t*,
                                  const int64_t*, int64_t*, float*, int);
template void group_sample<bf16>(const bf16*, const GroupSampleParams&, const int64_t*,
                                 const int64_t*, int64_t*, float*, int);

}  // namespace detailflow::cpu
