// group_sample (CUDA): fused CFG + NaN mask + temperature + top-k/top-p + seeded Philox draw,
// one thread block per (image b, position j) row. The contract is csrc/cpu/group_sample.cpp's
// header; this kernel returns the same tokens bit for bit because it evaluates the same fp32
// steps with the never-contracted _rn intrinsics (group_sample.h DF_F* macros, __fdiv_rn) and
// then works only with uint64 integer masses, whose sums are exact in any order.
//
// Per row (no sort, no per-row array beyond shared memory):
//   pass 0   y_i = mix(c_i, u_i) [/ t], NaN -> -inf, cached in shared memory when V is small
//            (V <= ~9.5K floats; else every later pass recomputes y_i from the L2-resident
//            logits); block max of (order key, -index) = m and its first index (greedy: done).
//            m = +-inf: y_i -> (y_i == m ? 0 : -inf), m -> 0 (as the CPU kernel does).
//   top-k    the k-th largest y exactly: radix select on the 32-bit order keys (4 passes of 8
//            bits, counts in a shared 256-bin histogram); keep key >= that key (ties kept).
//   top-p    T = sum q (block reduction), pth = floor(p24 T / 2^24); the cut key Kc is found
//            by the same radix select weighted by mass (descending cumulative mass crosses
//            pth); then the tokens with key == Kc are resolved in index order (crossing scan).
//   draw     target = floor(u24 T_f / 2^24); token = smallest index whose inclusive prefix
//            sum of final masses exceeds target (crossing scan below).
// Crossing scan ("first index whose inclusive prefix exceeds a target"): warp w owns a
// contiguous index segment; warp sums -> warp 0 scans them and picks the warp holding the
// crossing; that warp alone walks its segment 32 lanes at a time with a warp scan + ballot.
// Histograms aggregate each warp's lanes with equal digits first (__match_any_sync), since
// real logits share few high key bytes and ties would otherwise serialize shared atomics.
//
// Build without --use_fast_math (it would not change the _rn ops, but keep the contract plain).
// Test: python -m pytest tests/ops/test_group_sample.py -q -m gpu

#include <cmath>
#include <cstdint>

#include "cuda_common.cuh"
#include "group_sample.h"
#include "group_sample_cuda.h"

namespace detailflow::cuda {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kSmemLimit = 48 * 1024;  // static + dynamic, no opt-in attribute needed

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xFF800000u); }

// Inverse of gs_order_key (-0 comes back as +0, which compares equal).
__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(kFull, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ uint64_t warp_incl_scan(uint64_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t t = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

template <int kWarps>
struct Shared {
  uint64_t hist[256];         // radix-select histogram (counts or masses)
  uint64_t stage[kWarps][32]; // per-warp staging of lane weights for aggregated atomics
  uint64_t red[32];           // block reductions / warp sums of the crossing scan
  uint64_t before;            // radix select: weight of the digits above the chosen one
  uint64_t total;             // crossing scan: total weight
  uint64_t target;            // crossing scan: target
  uint64_t cbase;             // crossing scan: weight before the crossing warp's segment
  uint32_t digit;             // radix select: chosen digit
  int cw;                     // crossing scan: warp holding the crossing, -1 if none
  int idx;                    // crossing scan: result index
};

// The row's mixed logits: the CPU's mix_row, op by op (no FMA, IEEE division).
template <typename T, bool kCached>
struct Row {
  const T* c;
  const T* u;
  const float* cache;  // kCached: y of pass 0 (raw, before the +-inf transform)
  float s, t;
  bool cfg, temp;
  bool finite;  // m is finite: y as is; else y -> (y == m_raw ? 0 : -inf)
  float m_raw;

  __device__ __forceinline__ float mixed(int i) const {
    const float ci = to_f(c[i]);
    float x = ci;
    if (cfg) {
      const float ui = to_f(u[i]);
      x = DF_FADD(ui, DF_FMUL(s, DF_FSUB(ci, ui)));
    }
    x = (x != x) ? neg_inf() : x;
    if (temp) x = __fdiv_rn(x, t);
    return x;
  }
  __device__ __forceinline__ float y(int i) const {
    float v;
    if constexpr (kCached) {
      v = cache[i];
    } else {
      v = mixed(i);
    }
    return finite ? v : (v == m_raw ? 0.0f : neg_inf());
  }
};

// The block-wide reduction of v by `warp_op` (warp_sum or warp_max; 0 is the identity of both).
template <int kThreads, typename WarpOp>
__device__ __forceinline__ uint64_t block_reduce(uint64_t v, Shared<kThreads / 32>& sh, WarpOp warp_op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_op(v);
  if (lane == 0) sh.red[warp] = v;
  __syncthreads();
  uint64_t r = lane < kThreads / 32 ? sh.red[lane] : 0u;
  r = warp_op(r);
  __syncthreads();  // sh.red is reused next
  return r;
}

template <int kThreads>
__device__ __forceinline__ uint64_t block_sum(uint64_t v, Shared<kThreads / 32>& sh) {
  return block_reduce<kThreads>(v, sh, [](uint64_t x) { return warp_sum(x); });
}

template <int kThreads>
__device__ __forceinline__ uint64_t block_max(uint64_t v, Shared<kThreads / 32>& sh) {
  return block_reduce<kThreads>(v, sh, [](uint64_t x) { return warp_max(x); });
}

// hist[digit] += w for the active lanes; lanes with equal digits are summed by their leader
// first. Must be called by all 32 lanes of the warp (warp-uniform control flow).
__device__ __forceinline__ void hist_add(uint64_t* hist, uint64_t* stage, bool active,
                                         uint32_t digit, uint64_t w) {
  const int lane = threadIdx.x & 31;
  const unsigned act = __ballot_sync(kFull, active);
  if (act == 0) return;  // warp-uniform
  stage[lane] = w;
  __syncwarp();
  if (active) {
    const unsigned peers = __match_any_sync(act, digit);
    if (lane == __ffs(peers) - 1) {
      uint64_t sum = 0;
      for (unsigned m = peers; m != 0; m &= m - 1) sum += stage[__ffs(m) - 1];
      atomicAdd(reinterpret_cast<unsigned long long*>(&hist[digit]),
                static_cast<unsigned long long>(sum));
    }
  }
  __syncwarp();  // stage is rewritten by the next call
}

// Warp 0: scanning digits 255 -> 0, the first whose inclusive cumulative weight reaches
// `need`; writes it and the weight of the digits above it. (If none does, which the callers'
// invariants exclude, digit 0 is taken: still in bounds.)
__device__ __forceinline__ void pick_digit(const uint64_t* hist, uint64_t need, uint32_t* digit,
                                           uint64_t* before) {
  const int lane = threadIdx.x & 31;
  uint64_t h[8];
  uint64_t s = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    h[e] = hist[255 - 8 * lane - e];
    s += h[e];
  }
  const uint64_t incl = warp_incl_scan(s, lane);
  const unsigned hit = __ballot_sync(kFull, incl >= need);
  const int L = hit ? __ffs(hit) - 1 : 31;
  if (lane == L) {
    uint64_t acc = incl - s, bef = 0;
    int pick = 7;
    bool done = false;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (!done && (e == 7 || acc + h[e] >= need)) {
        pick = e;
        bef = acc;
        done = true;
      }
      acc += h[e];
    }
    *digit = static_cast<uint32_t>(255 - 8 * L - pick);
    *before = bef;
  }
}

// Radix select over the order keys, weighted: elem(i, &key) returns the weight of index i
// (0 = not counted). Returns the key K with W(key > K) < need <= W(key >= K), and in *above
// the weight W(key > K). 4 passes of 8 bits, most significant first.
template <int kThreads, typename ElemFn>
__device__ uint32_t radix_select(int V, ElemFn elem, uint64_t need, Shared<kThreads / 32>& sh,
                                 uint64_t* above) {
  const int warp = threadIdx.x >> 5;
  uint32_t prefix = 0;
  uint64_t acc_above = 0;
#pragma unroll 1
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t hi_mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));
    for (int i = threadIdx.x; i < 256; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    for (int base = 0; base < V; base += kThreads) {  // block-uniform trip count
      const int i = base + static_cast<int>(threadIdx.x);
      uint32_t key = 0;
      uint64_t w = 0;
      if (i < V) w = elem(i, &key);
      const bool active = w != 0 && (key & hi_mask) == prefix;
      hist_add(sh.hist, sh.stage[warp], active, (key >> shift) & 255u, w);
    }
    __syncthreads();
    if (threadIdx.x < 32) pick_digit(sh.hist, need, &sh.digit, &sh.before);
    __syncthreads();
    const uint32_t digit = sh.digit;
    const uint64_t bef = sh.before;
    prefix |= digit << shift;
    need -= bef;
    acc_above += bef;
  }
  *above = acc_above;
  return prefix;
}

// The smallest index i whose inclusive prefix sum of weight(i) (vocabulary order) exceeds
// target_of(total), total = the sum of all weights. Returns i (`fallback` if there is none,
// which the callers' invariants exclude) and the total.
template <int kThreads, typename WeightFn, typename TargetFn>
__device__ int find_crossing(int V, WeightFn weight, TargetFn target_of, int fallback,
                             Shared<kThreads / 32>& sh, uint64_t* total) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg = ((V + kWarps - 1) / kWarps + 31) & ~31;
  const int lo = min(V, warp * seg), hi = min(V, lo + seg);
  uint64_t s = 0;
  for (int i = lo + lane; i < hi; i += 32) s += weight(i);
  s = warp_sum(s);
  if (lane == 0) sh.red[warp] = s;
  __syncthreads();
  if (warp == 0) {
    const uint64_t v = lane < kWarps ? sh.red[lane] : 0u;
    const uint64_t incl = warp_incl_scan(v, lane);
    const uint64_t tot = __shfl_sync(kFull, incl, 31);
    const uint64_t target = target_of(tot);
    const unsigned hit = __ballot_sync(kFull, incl > target);
    if (lane == 0) {
      sh.total = tot;
      sh.target = target;
      sh.cw = hit ? __ffs(hit) - 1 : -1;
      sh.idx = fallback;
    }
    if (hit && lane == __ffs(hit) - 1) sh.cbase = incl - v;
  }
  __syncthreads();
  if (warp == sh.cw) {  // one warp walks its segment; the crossing lies inside it
    uint64_t carry = sh.cbase;
    const uint64_t target = sh.target;
    for (int base = lo; base < hi; base += 32) {  // warp-uniform
      const int i = base + lane;
      const uint64_t v = i < hi ? weight(i) : 0u;
      const uint64_t incl = warp_incl_scan(v, lane) + carry;
      const unsigned hit = __ballot_sync(kFull, incl > target);
      if (hit) {
        if (lane == __ffs(hit) - 1) sh.idx = i;
        break;
      }
      carry = __shfl_sync(kFull, incl, 31);
    }
  }
  __syncthreads();
  *total = sh.total;
  return sh.idx;
}

template <typename T, int kThreads, bool kCached>
__global__ void __launch_bounds__(kThreads)
    group_sample_kernel(const T* __restrict__ logits, cpu::GroupSampleParams p,
                        const int64_t* __restrict__ seeds, const int64_t* __restrict__ positions,
                        int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  extern __shared__ float gs_cache[];  // V floats when kCached
  __shared__ Shared<kThreads / 32> sh;
  const int V = static_cast<int>(p.vocab);
  const int tid = threadIdx.x;
  const int64_t rows = p.batch * p.n_q;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t b = r / p.n_q, j = r % p.n_q;
    Row<T, kCached> row;
    row.c = logits + b * p.stride_row + j * p.stride_pos;
    row.u = p.cfg ? logits + (p.batch + b) * p.stride_row + j * p.stride_pos : row.c;
    row.cache = gs_cache;
    row.s = p.cfg_scale;
    row.t = p.temperature;
    row.cfg = p.cfg;
    row.temp = !p.greedy && p.temperature != 1.0f;
    row.finite = true;
    row.m_raw = 0.0f;

    // pass 0: y, its max and the first index of the max, as max of (key, ~index)
    uint64_t best = 0;
    for (int i = tid; i < V; i += kThreads) {
      const float x = row.mixed(i);
      if constexpr (kCached) gs_cache[i] = x;
      const uint64_t pk = (static_cast<uint64_t>(gs_order_key(x)) << 32) |
                          static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(i));
      best = pk > best ? pk : best;
    }
    best = block_max<kThreads>(best, sh);  // its barriers also publish gs_cache
    const int argmax = static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(best));
    const float m_raw = key_to_float(static_cast<uint32_t>(best >> 32));

    if (p.greedy) {
      if (tid == 0) {
        tokens[r] = argmax;
        if (logprobs) logprobs[r] = 0.0f;
      }
    } else {
      row.finite = m_raw > neg_inf() && m_raw < -neg_inf();
      row.m_raw = m_raw;
      const float m = row.finite ? m_raw : 0.0f;

      // top-k: the key of the k-th largest y (counts); 0 keeps everything
      uint32_t kk = 0;
      if (p.top_k > 0) {
        uint64_t unused;
        kk = radix_select<kThreads>(
            V,
            [&](int i, uint32_t* key) -> uint64_t {
              *key = gs_order_key(row.y(i));
              return 1u;
            },
            static_cast<uint64_t>(p.top_k), sh, &unused);
      }
      // mass after top-k, and the order key
      auto mass_k = [&](int i, uint32_t* key) -> uint64_t {
        const float y = row.y(i);
        *key = gs_order_key(y);
        return *key >= kk ? gs_mass(DF_FSUB(y, m)) : uint64_t{0};
      };

      // top-p: cut at (key kc, index pc): keep key > kc, or key == kc and index <= pc
      uint32_t kc = 0;
      int pc = V;
      if (p.top_p24 < kGsTopPOne) {
        uint64_t part = 0;
        for (int i = tid; i < V; i += kThreads) {
          uint32_t key;
          part += mass_k(i, &key);
        }
        const uint64_t T_k = block_sum<kThreads>(part, sh);
        const uint64_t pth = gs_mulshift24(static_cast<uint64_t>(p.top_p24), T_k);
        uint64_t above = 0;
        kc = radix_select<kThreads>(V, mass_k, pth + 1, sh, &above);
        // among key == kc in index order: the first whose inclusive mass exceeds pth - above
        uint64_t unused;
        pc = find_crossing<kThreads>(
            V,
            [&](int i) -> uint64_t {
              uint32_t key;
              const uint64_t q = mass_k(i, &key);
              return key == kc ? q : uint64_t{0};
            },
            [&](uint64_t) { return pth - above; }, V, sh, &unused);
      }

      // draw: inverse CDF in vocabulary order over the final masses
      const uint32_t u24 = sample_u24(seeds[b], positions[j]);
      uint64_t T_f = 0;
      const int tok = find_crossing<kThreads>(
          V,
          [&](int i) -> uint64_t {
            uint32_t key;
            const uint64_t q = mass_k(i, &key);
            return (key > kc || (key == kc && i <= pc)) ? q : uint64_t{0};
          },
          [&](uint64_t total) { return gs_mulshift24(u24, total); }, argmax, sh, &T_f);
      if (tid == 0) {
        tokens[r] = tok;
        if (logprobs) {
          const float d = DF_FSUB(row.y(tok), m);
          logprobs[r] = static_cast<float>(static_cast<double>(d) -
                                           log(static_cast<double>(T_f) * 0x1p-40));
        }
      }
    }
    __syncthreads();  // the next row rewrites gs_cache and sh
  }
}

template <typename T, int kThreads>
void launch(const T* logits, const cpu::GroupSampleParams& p, const int64_t* seeds,
            const int64_t* positions, int64_t* tokens, float* logprobs, cudaStream_t stream) {
  const int64_t rows = p.batch * p.n_q;
  const unsigned grid = static_cast<unsigned>(rows < (int64_t{1} << 20) ? rows : (int64_t{1} << 20));
  const size_t cache = static_cast<size_t>(p.vocab) * sizeof(float);
  // the greedy path reads y once: no cache
  if (!p.greedy && cache + sizeof(Shared<kThreads / 32>) <= static_cast<size_t>(kSmemLimit)) {
    group_sample_kernel<T, kThreads, true>
        <<<grid, kThreads, cache, stream>>>(logits, p, seeds, positions, tokens, logprobs);
  } else {
    group_sample_kernel<T, kThreads, false>
        <<<grid, kThreads, 0, stream>>>(logits, p, seeds, positions, tokens, logprobs);
  }
  DF_CUDA_CHECK_LAUNCH("group_sample_cuda");
}

}  // namespace

void group_sample(const void* logits, int dtype, const cpu::GroupSampleParams& p,
                  const int64_t* seeds, const int64_t* positions, int64_t* tokens,
                  float* logprobs, uintptr_t stream) {
  const cudaStream_t s = as_stream(stream);
  DF_CUDA_DISPATCH_FLOAT(dtype, "group_sample_cuda", [&] {
    const auto* x = static_cast<const scalar_t*>(logits);
    // few rows: more threads per row shorten each pass (latency-bound); many rows: 512
    if (p.batch * p.n_q <= 256) {
      launch<scalar_t, 1024>(x, p, seeds, positions, tokens, logprobs, s);
    } else {
      launch<scalar_t, 512>(x, p, seeds, positions, tokens, logprobs, s);
    }
  });
}

}  // namespace detailflow::cuda
