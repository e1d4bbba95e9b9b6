// Can a lookup-table kernel beat the multiply-add arithmetic of our AVX2 ternary kernels on this CPU?
//
// Our AVX2 kernels multiply two-bit weight codes by int8 activations with vpmaddubsw (32 multiply-adds per
// instruction) and add the int16 pairs with vpaddw; the prefill tile runs at ~195 G multiply-adds/s per core.
// Lookup-table kernels (T-MAC, bitnet.cpp's TL2) instead look up precomputed sums of g activations: for
// ternary weights g = 3 (27 combinations, 14 with the sign folded out), and to stay exact the table entries
// (|sum| <= 381) are int16, split into a low-byte and a high-byte table. One step of 32 lookups (96
// multiply-adds) is then 2 vpshufb, 2 sign flips, 2 unpacks to int16 and 2 vpaddw -- before loading and
// extracting the indices, which a real kernel also needs. This program times both inner steps from registers
// (independent chains, no memory), so each is the best its kernel could do on this core.
//
//   gcc -O2 -mavx2 benchmarks/avx2_lut_vs_madd.c -o /tmp/lut_vs_madd && /tmp/lut_vs_madd
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 200000000L
//! Instructions per second of `insn` (a three-operand ymm instruction) issued 4 per iteration, independent.
#define ISSUE_RATE(insn)                                                                                     \
  do {                                                                                                       \
    const double start = now();                                                                              \
    __asm__ volatile("mov %0, %%rcx\n1:\n" insn " %%ymm15, %%ymm14, %%ymm0\n" insn " %%ymm15, %%ymm13, %%ymm1\n" \
                     insn " %%ymm14, %%ymm13, %%ymm2\n" insn " %%ymm13, %%ymm14, %%ymm3\n"                    \
                     "dec %%rcx\n jnz 1b\n" :: "r"(N / 4) : "rcx", "ymm0", "ymm1", "ymm2", "ymm3", "memory");   \
    printf("%s ymm: %.2f G/s\n", insn, N / (now() - start) / 1e9);                                           \
  } while (0)
int main(void){
  double t0,t1;
  // (1) madd path: vpmaddubsw + vpaddw, 4 independent chains: 32 multiply-adds per pair
  t0=now();
  __asm__ volatile(
    "mov %0, %%rcx\n"
    "1:\n"
    "vpmaddubsw %%ymm14, %%ymm15, %%ymm0\n vpaddw %%ymm0, %%ymm8, %%ymm8\n"
    "vpmaddubsw %%ymm13, %%ymm15, %%ymm1\n vpaddw %%ymm1, %%ymm9, %%ymm9\n"
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm2\n vpaddw %%ymm2, %%ymm10, %%ymm10\n"
    "vpmaddubsw %%ymm13, %%ymm14, %%ymm3\n vpaddw %%ymm3, %%ymm11, %%ymm11\n"
    "dec %%rcx\n jnz 1b\n" :: "r"(N/4) : "rcx","ymm0","ymm1","ymm2","ymm3","ymm8","ymm9","ymm10","ymm11","memory");
  t1=now(); double madd=N/(t1-t0);
  printf("vpmaddubsw + vpaddw pairs: %.2f G/s = %.0f G multiply-adds/s\n", madd/1e9, madd*32/1e9);
  // (2) LUT step (g=3 weights per lookup, int16 table split in low/high bytes): per 32 lookups = 96 multiply-adds
  //     2 vpshufb (low, high table bytes), 2 vpxor (sign), 2 vpunpck{l,h}bw (bytes -> int16), 2 vpaddw.
  t0=now();
  __asm__ volatile(
    "mov %0, %%rcx\n"
    "1:\n"
    "vpshufb %%ymm15, %%ymm14, %%ymm0\n vpshufb %%ymm15, %%ymm13, %%ymm1\n"
    "vpxor %%ymm12, %%ymm0, %%ymm0\n vpxor %%ymm12, %%ymm1, %%ymm1\n"
    "vpunpcklbw %%ymm1, %%ymm0, %%ymm2\n vpunpckhbw %%ymm1, %%ymm0, %%ymm3\n"
    "vpaddw %%ymm2, %%ymm8, %%ymm8\n vpaddw %%ymm3, %%ymm9, %%ymm9\n"
    "vpshufb %%ymm14, %%ymm15, %%ymm4\n vpshufb %%ymm14, %%ymm13, %%ymm5\n"
    "vpxor %%ymm12, %%ymm4, %%ymm4\n vpxor %%ymm12, %%ymm5, %%ymm5\n"
    "vpunpcklbw %%ymm5, %%ymm4, %%ymm6\n vpunpckhbw %%ymm5, %%ymm4, %%ymm7\n"
    "vpaddw %%ymm6, %%ymm10, %%ymm10\n vpaddw %%ymm7, %%ymm11, %%ymm11\n"
    "dec %%rcx\n jnz 1b\n" :: "r"(N/2) : "rcx","ymm0","ymm1","ymm2","ymm3","ymm4","ymm5","ymm6","ymm7","ymm8","ymm9","ymm10","ymm11","memory");
  t1=now(); double lut=N/(t1-t0);
  printf("LUT steps (32 lookups x 3 weights, exact int16 tables): %.2f G/s = %.0f G multiply-adds/s\n", lut/1e9, lut*96/1e9);
  // (3), (4) one instruction alone, 4 independent results per iteration: its issue rate
  ISSUE_RATE("vpshufb");
  ISSUE_RATE("vpaddw");
  return 0;
}
