// cache_attention (CUDA): one decode step of attention against a static KV cache.
//
// Formula, per (b, h), with L = start_pos + n_q (the contract of cpu/cache_attention.cpp):
//   k_cache[b,h,start_pos+i] = k_new[b,h,i];  v_cache[b,h,start_pos+i] = v_new[b,h,i]   (i < n_q)
//   out[b,h,i] = sum_j softmax_j(scale * q[b,h,i] . k[b,h,j]) v[b,h,j]                   (j < L)
// No mask (a DetailFlow step is one causal position or one whole group). Scores, softmax and
// the weighted sum are fp32; out is rounded to the input dtype (fp32, bf16 or fp16).
//
// Layout: q, k_new, v_new, out are (B, H, n_q, d) with any element strides but a unit last
// stride; k_cache, v_cache are contiguous (B, H, L_max, d). d <= 256.
//
// Work split (flash-decoding): grid = (B*H, ceil(n_q / ROWS), splits). A block takes one
// (b, h), a tile of ROWS query rows (1 for single-token steps, else 8 = the group size) and one
// contiguous key range; splits > 1 only when B*H is too small to fill the GPU (the Python
// wrapper picks it: batch-1 decode has 32 heads for 132 SMs). Then each block writes its
// unnormalized partial output with its running max and sum to an fp32 scratch buffer and
// combine_kernel merges the splits. With one split the attend kernel writes `out` itself.
// Cache writes: only the (tile 0, split 0) block of a head copies k_new/v_new into the cache,
// and every block reads positions >= start_pos from k_new/v_new, never from the cache rows
// being written in the same launch: one writer per cache element and no read/write race.
//
// Inside a block (128 threads): groups of G threads share a key row, each thread holding
// EPT = NV x VEC elements of it (one 16-byte vector on the fast path). Keys go in
// chunks of 128 with an online softmax that is shared by the whole block:
//   1. scores: group g takes keys g, g + NG, ... of the chunk; per key a dot with the ROWS query
//      rows (q kept in registers, pre-multiplied by scale*log2(e) so exp2f applies), reduced over
//      the G lanes by xor shuffles; the scores go to shared memory;
//   2. softmax: one warp per query row takes the chunk max, the new running max m, the rescale
//      factor alpha = 2^(m_old - m) and p = 2^(s - m) (in place), and the running sum l;
//   3. P.V: every thread rescales its accumulators by alpha and adds p * v for its group's keys.
// At the end the groups' accumulators (all relative to the same m) are summed: xor shuffles in
// a warp, then shared memory across the 4 warps in a fixed order (deterministic).
// Variants: d = 64 and d = 128 with 16-byte-aligned pointers/strides use one 16-byte vector per
// thread and key (G = d / (16 / sizeof(T))); anything else (odd d, misaligned views) takes the
// generic path: a warp per key row, scalar loads, elements masked to d.
//
// Test:  python -m pytest tests/ops/test_cache_attention.py -q -m gpu
// Bench: python benchmarks/bench_cache_attention.py --device cuda --quick
#include <cmath>
#include <cstring>
#include <type_traits>

#include "cache_attention_cuda.h"
#include "cuda_common.cuh"

namespace detailflow::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 128;  // keys per online-softmax chunk: a whole 128-position block in one
                             // pass (fewer barrier round trips); 4 scores per lane in the softmax
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const void* q;
  CacheAttnStrides q_s;
  const void* k_new;
  CacheAttnStrides k_s;
  const void* v_new;
  CacheAttnStrides v_s;
  void* k_cache;
  void* v_cache;
  void* out;
  CacheAttnStrides o_s;
  int64_t H, BH, n_q, d, L_max, start_pos, L;
  int64_t keys_per_split;
  float scale_log2;  // scale * log2(e): scores live in log2 units
  float* part_o;     // (splits, B*H, n_q, d) unnormalized partial outputs, or null (one split)
  float* part_ml;    // (splits, B*H, n_q, 2): running max (log2 units) and sum per partial
};

// VEC consecutive elements of T moved as one access: a 16-byte vector on the fast path
// (VEC = 16 / sizeof(T)), a single element on the generic path.
template <typename T, int VEC>
struct Packet {
  static constexpr bool kWide = VEC > 1;
  static_assert(!kWide || VEC * sizeof(T) == 16, "a wide packet is exactly 16 bytes");
  using Raw = std::conditional_t<kWide, uint4, T>;
  Raw raw;

  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const Raw*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Raw*>(p) = raw; }
  __device__ __forceinline__ void zero() {
    if constexpr (kWide) {
      raw = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0.0 in fp32, bf16 and fp16
    } else {
      raw = from_f<T>(0.0f);
    }
  }
  __device__ __forceinline__ void to_float(float (&f)[VEC]) const {
    if constexpr (kWide) {
      T t[VEC];
      memcpy(t, &raw, sizeof(raw));
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] = to_f(t[e]);
    } else {
      f[0] = to_f(raw);
    }
  }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// T: element type. ROWS: query rows per block. G: threads per key row (power of two <= 32).
// NV x VEC: elements per thread and row, in NV packets of VEC; thread t of a group holds
// elements (v * G + t) * VEC + e. EXACT: d == G * NV * VEC (no masking; the fast path).
template <typename T, int ROWS, int G, int NV, int VEC, bool EXACT>
// Min blocks per SM: 3 for 8 rows caps registers at 168 (q and acc are 2 x 64 fp32 on the fast
// path; 3 blocks = 12 warps to hide the K/V latency at large B), 4 for 1 row (<= 128). Without a
// minimum, ptxas gave some 1-row generic kernels 40 registers and spilled.
__global__ void __launch_bounds__(kThreads, ROWS == 1 ? 4 : 3) attend_kernel(const Params p) {
  constexpr int EPT = NV * VEC;     // elements per thread per row
  constexpr int DT = G * EPT;       // head dim a group covers (>= d)
  constexpr int GPW = 32 / G;       // groups per warp
  constexpr int NG = kThreads / G;  // groups per block
  constexpr int KU = NV >= 4 ? 1 : (NV == 2 ? 2 : 4);  // key rows loaded before use (MLP)
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "G must be a power of two <= 32");
  static_assert(EXACT || VEC == 1, "masked (generic) path uses scalar packets");
  static_assert(kChunk % 32 == 0, "softmax step: kChunk / 32 scores per lane");
  using Pk = Packet<T, VEC>;

  __shared__ float s_p[ROWS][kChunk];         // scores, then probabilities, of the chunk
  __shared__ float s_red[kWarps][ROWS][DT];   // per-warp partial outputs for the final sum
  __shared__ float s_m[ROWS], s_l[ROWS], s_alpha[ROWS];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int t = lane % G;   // lane within the group
  const int gi = lane / G;  // group within the warp
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * ROWS;
  const int rows = static_cast<int>(p.n_q - row0 < ROWS ? p.n_q - row0 : ROWS);
  const int64_t split = blockIdx.z;
  const int64_t d = EXACT ? DT : p.d;
  const int64_t sp = p.start_pos;

  const T* q = static_cast<const T*>(p.q) + b * p.q_s.b + h * p.q_s.h + row0 * p.q_s.n;
  const T* kn = static_cast<const T*>(p.k_new) + b * p.k_s.b + h * p.k_s.h;
  const T* vn = static_cast<const T*>(p.v_new) + b * p.v_s.b + h * p.v_s.h;
  T* kc = static_cast<T*>(p.k_cache) + bh * p.L_max * d;  // contiguous (B, H, L_max, d)
  T* vc = static_cast<T*>(p.v_cache) + bh * p.L_max * d;

  // The step's K/V into the cache: one writer per element (tile 0, split 0 of this head).
  if (blockIdx.y == 0 && blockIdx.z == 0) {
    const int64_t per_row = d / VEC;  // packets per row (EXACT: d % VEC == 0; else VEC == 1)
    for (int64_t idx = tid; idx < p.n_q * per_row; idx += kThreads) {
      const int64_t i = idx / per_row, x = (idx % per_row) * VEC;
      const T* ks = kn + i * p.k_s.n + x;
      const T* vs = vn + i * p.v_s.n + x;
      T* kd = kc + (sp + i) * d + x;
      T* vd = vc + (sp + i) * d + x;
      Pk pk;
      if (ks != kd) {  // k_new may already be a view of these cache rows
        pk.load(ks);
        pk.store(kd);
      }
      if (vs != vd) {
        pk.load(vs);
        pk.store(vd);
      }
    }
  }

  // Query rows of the tile, scaled into log2 units; rows past n_q and elements past d are 0.
  float qf[ROWS][EPT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int64_t x0 = static_cast<int64_t>(v * G + t) * VEC;
      Pk pk;
      if (r < rows && (EXACT || x0 < d)) {
        pk.load(q + r * p.q_s.n + x0);
      } else {
        pk.zero();
      }
      float f[VEC];
      pk.to_float(f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[r][v * VEC + e] = f[e] * p.scale_log2;
    }
  }

  if (tid < ROWS) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.0f;
  }
  float acc[ROWS][EPT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[r][e] = 0.0f;
  }

  // A key/value row slice of this thread: cache rows before start_pos, k_new/v_new after.
  auto load_row = [&](const T* cache, const T* fresh, int64_t fresh_sn, int64_t pos, Pk (&pk)[NV]) {
    const T* row = pos < sp ? cache + pos * d : fresh + (pos - sp) * fresh_sn;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int64_t x0 = static_cast<int64_t>(v * G + t) * VEC;
      if (EXACT || x0 < d) {
        pk[v].load(row + x0);
      } else {
        pk[v].zero();
      }
    }
  };

  const int64_t kb = split * p.keys_per_split;
  const int64_t ke = kb + p.keys_per_split < p.L ? kb + p.keys_per_split : p.L;
  for (int64_t c0 = kb; c0 < ke; c0 += kChunk) {
    const int nk = static_cast<int>(ke - c0 < kChunk ? ke - c0 : kChunk);

    // 1. Scores. j0 is the same for all lanes of a warp, so the shuffles below always run
    //    with the full warp; keys past the chunk end compute on zeros and are not stored.
    for (int j0 = warp * GPW; j0 < nk; j0 += NG * KU) {
      Pk kp[KU][NV];
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const int j = j0 + u * NG + gi;
        if (j < nk) {
          load_row(kc, kn, p.k_s.n, c0 + j, kp[u]);
        } else {
#pragma unroll
          for (int v = 0; v < NV; ++v) kp[u][v].zero();
        }
      }
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        float dot[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) dot[r] = 0.0f;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          float kf[VEC];
          kp[u][v].to_float(kf);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) dot[r] = fmaf(qf[r][v * VEC + e], kf[e], dot[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
          for (int off = G / 2; off > 0; off >>= 1) dot[r] += __shfl_xor_sync(kFullMask, dot[r], off);
        }
        const int j = j0 + u * NG + gi;
        if (t == 0 && j < nk) {
#pragma unroll
          for (int r = 0; r < ROWS; ++r) s_p[r][j] = dot[r];
        }
      }
    }
    __syncthreads();

    // 2. Online softmax, one warp per query row (rows past n_q hold harmless zero scores).
    //    fmaxf skips NaN scores, but their p = 2^(NaN - m) is NaN and poisons l and the row,
    //    as in torch. A max of -inf (all keys -inf so far) uses 0 instead, so p and alpha are
    //    0 rather than NaN from (-inf) - (-inf).
    for (int r = warp; r < ROWS; r += kWarps) {
      float s[kChunk / 32];
      float cm = -INFINITY;
#pragma unroll
      for (int k = 0; k < kChunk / 32; ++k) {
        const int j = lane + 32 * k;
        s[k] = j < nk ? s_p[r][j] : -INFINITY;
        cm = fmaxf(cm, s[k]);
      }
      cm = warp_max(cm);
      const float m_old = s_m[r];
      const float m_new = fmaxf(m_old, cm);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m_old - m_use);
      float psum = 0.0f;
#pragma unroll
      for (int k = 0; k < kChunk / 32; ++k) {
        const int j = lane + 32 * k;
        if (j < nk) {
          const float pr = exp2f(s[k] - m_use);
          s_p[r][j] = pr;
          psum += pr;
        }
      }
      psum = warp_sum(psum);
      __syncwarp();  // every lane has read s_m[r] before lane 0 overwrites it
      if (lane == 0) {
        s_m[r] = m_new;
        s_l[r] = s_l[r] * alpha + psum;
        s_alpha[r] = alpha;
      }
    }
    __syncthreads();

    // 3. Rescale, then acc += p * v over this group's keys.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float alpha = s_alpha[r];
#pragma unroll
      for (int e = 0; e < EPT; ++e) acc[r][e] *= alpha;
    }
    for (int j0 = warp * GPW; j0 < nk; j0 += NG * KU) {
      Pk vp[KU][NV];
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const int j = j0 + u * NG + gi;
        if (j < nk) {
          load_row(vc, vn, p.v_s.n, c0 + j, vp[u]);
        } else {
#pragma unroll
          for (int v = 0; v < NV; ++v) vp[u][v].zero();
        }
      }
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const int j = j0 + u * NG + gi;
        if (j < nk) {
#pragma unroll
          for (int v = 0; v < NV; ++v) {
            float vf[VEC];
            vp[u][v].to_float(vf);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              const float pr = s_p[r][j];
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[r][v * VEC + e] = fmaf(pr, vf[e], acc[r][v * VEC + e]);
            }
          }
        }
      }
    }
    __syncthreads();  // s_p and s_alpha are rewritten by the next chunk
  }

  // Sum the groups' accumulators: within the warp (groups differ in lane bits >= log2 G) ...
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
#pragma unroll
      for (int off = G; off < 32; off <<= 1) acc[r][e] += __shfl_xor_sync(kFullMask, acc[r][e], off);
    }
  }
  if (gi == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int v = 0; v < NV; ++v) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s_red[warp][r][(v * G + t) * VEC + e] = acc[r][v * VEC + e];
      }
    }
  }
  __syncthreads();
  // ... then across warps in a fixed order; normalize (one split) or store the partial.
  for (int idx = tid; idx < ROWS * DT; idx += kThreads) {
    const int r = idx / DT, x = idx % DT;
    if (r >= rows || x >= d) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += s_red[w][r][x];
    if (p.part_o == nullptr) {
      T* o = static_cast<T*>(p.out) + b * p.o_s.b + h * p.o_s.h + (row0 + r) * p.o_s.n;
      o[x] = from_f<T>(sum / s_l[r]);
    } else {
      const int64_t pi = (split * p.BH + bh) * p.n_q + row0 + r;
      p.part_o[pi * d + x] = sum;
      if (x == 0) {
        p.part_ml[pi * 2] = s_m[r];
        p.part_ml[pi * 2 + 1] = s_l[r];
      }
    }
  }
}

// Merges the splits of one (b, h, query row) per block:
//   out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s,  M = max_s m_s.
template <typename T>
__global__ void __launch_bounds__(64) combine_kernel(const float* __restrict__ part_o,
                                                     const float* __restrict__ part_ml, T* out,
                                                     CacheAttnStrides o_s, int64_t H, int64_t BH,
                                                     int64_t n_q, int64_t d, int64_t splits) {
  const int64_t item = blockIdx.x;  // (b*H + h) * n_q + i
  const int64_t bh = item / n_q, i = item % n_q;
  const int64_t b = bh / H, h = bh % H;
  const int64_t stride = BH * n_q;  // between splits, in (row) items
  float M = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) M = fmaxf(M, part_ml[(s * stride + item) * 2]);
  const float M_use = M == -INFINITY ? 0.0f : M;
  float den = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    const float* ml = part_ml + (s * stride + item) * 2;
    den += exp2f(ml[0] - M_use) * ml[1];
  }
  const float inv_den = 1.0f / den;
  T* o = out + b * o_s.b + h * o_s.h + i * o_s.n;
  for (int64_t x = threadIdx.x; x < d; x += blockDim.x) {
    float num = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const float w = exp2f(part_ml[(s * stride + item) * 2] - M_use);
      num = fmaf(w, part_o[(s * stride + item) * d + x], num);
    }
    o[x] = from_f<T>(num * inv_den);
  }
}

template <typename T, int G, int NV, int VEC, bool EXACT>
void launch_attend(const Params& p, dim3 grid, int rows_per_tile, cudaStream_t stream) {
  if (rows_per_tile == 1) {
    attend_kernel<T, 1, G, NV, VEC, EXACT><<<grid, kThreads, 0, stream>>>(p);
  } else {
    attend_kernel<T, 8, G, NV, VEC, EXACT><<<grid, kThreads, 0, stream>>>(p);
  }
  DF_CUDA_CHECK_LAUNCH("cache_attention attend_kernel");
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool strides_multiple_of(const CacheAttnStrides& s, int64_t vec) {
  return s.b % vec == 0 && s.h % vec == 0 && s.n % vec == 0;
}

}  // namespace

void cache_attention(const void* q, CacheAttnStrides q_s, const void* k_new, CacheAttnStrides k_s,
                     const void* v_new, CacheAttnStrides v_s, void* k_cache, void* v_cache,
                     void* out, CacheAttnStrides out_s, int64_t B, int64_t H, int64_t n_q,
                     int64_t d, int64_t L_max, int64_t start_pos, float scale, int dtype,
                     int64_t num_splits, float* scratch, uintptr_t stream_handle) {
  const int64_t L = start_pos + n_q;
  const int64_t splits = cache_attention_splits(L, num_splits);
  const int64_t BH = B * H;
  Params p{q, q_s, k_new, k_s, v_new, v_s, k_cache, v_cache, out, out_s,
           H, BH, n_q, d, L_max, start_pos, L,
           ceil_div(L, splits), scale * kLog2e,
           splits > 1 ? scratch : nullptr,
           splits > 1 ? scratch + splits * BH * n_q * d : nullptr};
  // 1 row per tile for single-token steps (no wasted registers), else 8 = the group size.
  const int rows_per_tile = n_q == 1 ? 1 : 8;
  const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>(ceil_div(n_q, rows_per_tile)),
                  static_cast<unsigned>(splits));
  cudaStream_t stream = as_stream(stream_handle);

  DF_CUDA_DISPATCH_FLOAT(dtype, "cache_attention", [&] {
    using T = scalar_t;
    constexpr int VEC = static_cast<int>(16 / sizeof(T));
    // The fast path reads/writes 16-byte vectors: every row start must be 16-byte aligned.
    const bool vec_ok = aligned16(q) && aligned16(k_new) && aligned16(v_new) &&
                        aligned16(k_cache) && aligned16(v_cache) && strides_multiple_of(q_s, VEC) &&
                        strides_multiple_of(k_s, VEC) && strides_multiple_of(v_s, VEC);
    if (vec_ok && d == 64) {
      launch_attend<T, 64 / VEC, 1, VEC, true>(p, grid, rows_per_tile, stream);
    } else if (vec_ok && d == 128) {
      launch_attend<T, 128 / VEC, 1, VEC, true>(p, grid, rows_per_tile, stream);
    } else if (d <= 64) {
      launch_attend<T, 32, 2, 1, false>(p, grid, rows_per_tile, stream);
    } else if (d <= 128) {
      launch_attend<T, 32, 4, 1, false>(p, grid, rows_per_tile, stream);
    } else {
      launch_attend<T, 32, 8, 1, false>(p, grid, rows_per_tile, stream);  // d <= 256
    }
    if (splits > 1) {
      combine_kernel<T><<<static_cast<unsigned>(BH * n_q), 64, 0, stream>>>(
          p.part_o, p.part_ml, static_cast<T*>(out), out_s, H, BH, n_q, d, splits);
      DF_CUDA_CHECK_LAUNCH("cache_attention combine_kernel");
    }
  });
}

}  // namespace detailflow::cuda
