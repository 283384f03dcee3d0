// Runtime ISA dispatch for the hand-written CPU loops.
//
// KANGAROO_ISA_CLONES compiles a function for AVX-512, AVX2+FMA and baseline x86-64 and lets the loader pick the
// one the CPU runs (GCC/Clang target_clones, an ifunc): no CPU feature is assumed at build or run time. Loops
// written as `omp simd` reductions vectorize under -fopenmp-simd (setup.py) without -ffast-math.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KANGAROO_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__clang__)
#define KANGAROO_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KANGAROO_ISA_CLONES
#endif
