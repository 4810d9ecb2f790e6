// Peak rate of one core's multiply-add instructions, the compute floor of the CPU decode GEMMs:
// 12 independent accumulator chains (throughput) and one chain (latency) per instruction, in
// inline asm so the compiler can neither merge identical chains nor add register copies.
//
//   g++ -O2 -march=native benchmarks/isa_peak.cpp -o /tmp/isa_peak && /tmp/isa_peak
//
// Reading: vpdpbusd does 64 u8 x s8 multiply-adds an instruction, vdpbf16ps 32 bf16 pairs,
// vfmadd231ps 16 fp32; equal instruction rates mean integer products are at most 2x bf16's
// MAC rate (decode_gemm_w8a8 / _w4a8 against bf16 at M >= 16). Needs AVX-512 VNNI and BF16.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

#define DF_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx512bf16"), noinline))
#define OP(insn, c, b) __asm__ volatile(insn " %1, %2, %0" : "+v"(c) : "v"(w), "v"(b))
#define TWELVE(insn)                                                                                   \
  OP(insn, c0, b0); OP(insn, c1, b1); OP(insn, c2, b2); OP(insn, c3, b3); OP(insn, c4, b0); OP(insn, c5, b1); \
  OP(insn, c6, b2); OP(insn, c7, b3); OP(insn, c8, b0); OP(insn, c9, b1); OP(insn, c10, b2); OP(insn, c11, b3)

template <typename V>
DF_TARGET double chains12(int64_t n, int kind) {
  V w{}, b0{}, b1{}, b2{}, b3{};
  w = (V)_mm512_set1_epi32(0x3f803f80);
  b0 = (V)_mm512_set1_epi32(1); b1 = (V)_mm512_set1_epi32(2); b2 = (V)_mm512_set1_epi32(3); b3 = (V)_mm512_set1_epi32(4);
  V c0 = b0, c1 = b1, c2 = b2, c3 = b3, c4 = b0, c5 = b1, c6 = b2, c7 = b3, c8 = b0, c9 = b1, c10 = b2, c11 = b3;
  const auto t = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; ++i) {
    if (kind == 0) { TWELVE("vpdpbusd"); }
    else if (kind == 1) { TWELVE("vdpbf16ps"); }
    else { TWELVE("vfmadd231ps"); }
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  volatile V sink = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11;
  (void)sink;
  return 12.0 * n / dt;
}

template <typename V>
DF_TARGET double chain1(int64_t n, int kind) {
  V w = (V)_mm512_set1_epi32(0x3f803f80), b0 = (V)_mm512_set1_epi32(1), c0 = b0;
  const auto t = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; ++i) {
    if (kind == 0) { OP("vpdpbusd", c0, b0); OP("vpdpbusd", c0, b0); OP("vpdpbusd", c0, b0); OP("vpdpbusd", c0, b0); }
    else if (kind == 1) { OP("vdpbf16ps", c0, b0); OP("vdpbf16ps", c0, b0); OP("vdpbf16ps", c0, b0); OP("vdpbf16ps", c0, b0); }
    else { OP("vfmadd231ps", c0, b0); OP("vfmadd231ps", c0, b0); OP("vfmadd231ps", c0, b0); OP("vfmadd231ps", c0, b0); }
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  volatile V sink = c0;
  (void)sink;
  return 4.0 * n / dt;
}

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bf16")) {
    std::printf("this CPU lacks avx512_vnni or avx512_bf16\n");
    return 1;
  }
  const int64_t n = 100000000;
  const char* names[] = {"vpdpbusd zmm (64 MACs)", "vdpbf16ps zmm (32 MACs)", "vfmadd231ps zmm (16 MACs)"};
  std::printf("| instruction | G instr/s, 12 chains | GMAC/s | G instr/s, 1 chain |\n|---|---|---|---|\n");
  const int macs[] = {64, 32, 16};
  for (int kind = 0; kind < 3; ++kind) {
    const double tp = chains12<__m512i>(n, kind), lat = chain1<__m512i>(n / 4, kind);
    std::printf("| %s | %.2f | %.0f | %.2f |\n", names[kind], tp / 1e9, tp * macs[kind] / 1e9, lat / 1e9);
  }
  return 0;
}
