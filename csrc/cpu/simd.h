// Runtime ISA dispatch for the hand-written CPU loops.
//
// KANGAROO_ISA_DISPATCH(pick, ret, name, (params), (args)) defines `ret name params`, which runs name##_body<I> (an
// always_inline function template written once) compiled for AVX-512, AVX2 + FMA or baseline x86-64, whichever
// pick() (usually cpu_isa) returns on the machine it runs on: no CPU feature is assumed at build or run time. A body
// may use its ISA's vector width (VecOf / kVecWidth) and register blocking:
// with one 64-byte vector type for every ISA (as in the target_clones builds this replaces), GCC 12 keeps the AVX2
// and baseline builds' accumulators on the stack (measured through the cap below on an AVX-512 machine: the AVX2
// build's GEMM 12x and plain decoding 9.5x slower than the AVX-512 build's; with its own width, 1.0-1.2x).
// KANGAROO_CPU_ISA=avx2 / baseline caps the pick, so the tests run every build on any machine.
// Loops written as `omp simd` reductions vectorize under -fopenmp-simd (setup.py) without -ffast-math.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace kangaroo {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

// What the CPU runs (AVX-512 F/BW/DQ/VL, or AVX2 + FMA, else baseline), read once. KANGAROO_CPU_ISA=avx2 or
// baseline caps it: the tests run the fallbacks on any machine.
inline Isa cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    const char* cap = std::getenv("KANGAROO_CPU_ISA");
    const std::string want = cap ? cap : "";
    const bool fma = __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (want != "avx2" && want != "baseline" && avx512 && fma) return Isa::kAvx512;
    if (want != "baseline" && fma) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace kangaroo

// A dispatched function's body: inlined into each ISA's build of it.
#define KANGAROO_BODY __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__)
#define KANGAROO_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define KANGAROO_TARGET_AVX2 __attribute__((target("avx2,fma")))
// `ret name params` runs name##_body<I> (a body templated on the Isa it is built for: its vector width, its
// register blocking) built for the ISA that pick() returns (cpu_isa, or a measurement of the builds the CPU runs).
#define KANGAROO_ISA_DISPATCH(pick, ret, name, params, args)                                              \
  KANGAROO_TARGET_AVX512 ret name##_avx512 params { return name##_body<::kangaroo::Isa::kAvx512> args; } \
  KANGAROO_TARGET_AVX2 ret name##_avx2 params { return name##_body<::kangaroo::Isa::kAvx2> args; }       \
  ret name##_baseline params { return name##_body<::kangaroo::Isa::kBaseline> args; }                    \
  ret name params {                                                                                       \
    switch (pick()) {                                                                                     \
      case ::kangaroo::Isa::kAvx512: return name##_avx512 args;                                           \
      case ::kangaroo::Isa::kAvx2: return name##_avx2 args;                                               \
      default: return name##_baseline args;                                                               \
    }                                                                                                     \
  }
#else
#define KANGAROO_ISA_DISPATCH(pick, ret, name, params, args) \
  ret name params { return name##_body<::kangaroo::Isa::kBaseline> args; }
#endif

// The vector helpers below are always inlined into a dispatched body: their by-value vector ABI never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kangaroo {

// 16 floats as one GCC vector: one zmm in the AVX-512 build of a body, two ymm under AVX2, four xmm in the
// baseline; the same per-lane arithmetic in all three.
typedef float v16f __attribute__((vector_size(64)));

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// Loads, stores and bit casts of GCC vector types V, by value: taking the address of an accumulator would keep a
// whole accumulator array out of registers.
template <typename V>
__attribute__((always_inline)) inline V load_vec(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
__attribute__((always_inline)) inline void store_vec(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename To, typename From>
__attribute__((always_inline)) inline To bit_cast_vec(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_vec: sizes differ");
  To t;
  std::memcpy(&t, &v, sizeof(t));
  return t;
}

// W floats (and W uint32) as one GCC vector: a body templated on W uses the register width of the ISA it is built
// for (a 64-byte vector under AVX2 is two ymm that GCC 12 keeps on the stack once many are live).
template <int W>
struct VecOf;
// The vector width in floats a body built for ISA I uses: 16 (zmm), 8 (ymm), 4 (xmm).
template <Isa I>
constexpr int kVecWidth = I == Isa::kAvx512 ? 16 : I == Isa::kAvx2 ? 8 : 4;
template <>
struct VecOf<16> {
  typedef v16f f;
  typedef uint32_t u __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};
template <>
struct VecOf<8> {
  typedef v8f f;
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct VecOf<4> {
  typedef v4f f;
  typedef uint32_t u __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
};

// The lanes' sum in a fixed pairwise order (lane i + lane i + 8, then + 4, + 2, + 1), with register shuffles: a
// spill to memory and scalar adds cost ~70 cycles a call, which made attention scores a third of a decode layer.
__attribute__((always_inline)) inline float hsum16(v16f v) {
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp(x) for x <= 0 (a logit minus its row's max) on each lane of a W-float vector, in plain float arithmetic
// (std::exp does not vectorize without -ffast-math): 2^(x log2 e) split into 2^round (exponent bits) and a
// polynomial of the rest; relative error ~2e-7, far inside the confidence's tolerance. Below -87 the result is 0
// (fp32 underflow). Written on vectors: GCC 12 vectorized the scalar form's `omp simd` loops for AVX-512 (masked
// blends) but not for AVX2 or SSE ("control flow in loop"), which left the attention softmax, SiLU and the draft
// head's exp sum scalar there.
template <int W>
__attribute__((always_inline)) inline typename VecOf<W>::f exp_nonpositive_vec(typename VecOf<W>::f x) {
  typedef typename VecOf<W>::f V;
  typedef typename VecOf<W>::i I;
  const V lo = V{} - 87.f;
  const V t = (x > lo ? x : lo) * 1.44269504089f;
  const V fi = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const V f = t - fi;  // in [-0.5, 0.5]: the Taylor series of 2^f = e^(f ln 2) to degree 6 is within 2e-7
  V p = V{} + 1.54035304e-4f;
  p = p * f + 1.33335581e-3f;
  p = p * f + 9.61812911e-3f;
  p = p * f + 5.55041087e-2f;
  p = p * f + 2.40226507e-1f;
  p = p * f + 6.93147181e-1f;
  p = p * f + 1.f;
  const I bits = (__builtin_convertvector(fi, I) + 127) << 23;
  return x < lo ? V{} : p * bit_cast_vec<V>(bits);
}

// y[j] = fn(x[j]) for j < n on W-float vectors, the tail through a zero-padded vector: every element runs the same
// vector code, so y[j] does not depend on where j falls (a softmax's keys, a verify block against plain steps).
template <int W, typename Fn>
__attribute__((always_inline)) inline void map_vec(const float* x, int64_t n, float* y, Fn fn) {
  typedef typename VecOf<W>::f V;
  int64_t j = 0;
  for (; j + W <= n; j += W) store_vec(y + j, fn(load_vec<V>(x + j)));
  if (j < n) {
    float buf[W] = {};
    for (int64_t k = j; k < n; ++k) buf[k - j] = x[k];
    store_vec(buf, fn(load_vec<V>(buf)));
    for (int64_t k = j; k < n; ++k) y[k] = buf[k - j];
  }
}

}  // namespace kangaroo
