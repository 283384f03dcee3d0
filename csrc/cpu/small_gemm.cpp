// Small-batch fp32 GEMMs and row helpers for the hand-written CPU layers (declarations and contract: small_gemm.h),
// and the pack_gemm_weight / unpack_gemm_weight ops that define the packed layout.
//
// gemm_packed works on 32-column tiles: for each k it loads the tile's 32 weights once (two vectors on AVX-512) and
// multiplies them into up to 8 rows' accumulators (16 vector registers on AVX-512; 3 rows on AVX2, 1 baseline), so
// the weight is read once per row group, front to back (AVX2 runs more than 3 rows as half tiles of up to 6
// rows). The vectors are GCC vector types of the ISA's width, built for AVX-512, AVX2+FMA and baseline x86-64
// (KANGAROO_ISA_DISPATCH) from the same source; each lane accumulates its own column in k order, so the chain
// behind an output is fixed by K alone, never by M, the row group, the vector width (AVX-512 and AVX2 give the same
// bits) or the thread split (threads split on tile boundaries).
// Packed (tile-major) instead of the column-major [K, N] storage: there each k reads 128 bytes N * 4 apart, which
// the prefetchers follow poorly (measured on the demo's layer: 1.00 / 1.34 / 1.95x for 1 / 4 / 7 rows column-major,
// 0.94 / 1.07 / 1.26x packed, streaming from L3).
#include "cpu/small_gemm.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/simd.h"
#include "cpu/ops_cpu.h"

namespace kangaroo {
namespace {

constexpr int64_t kNB = kPackCols;  // columns per tile
// software prefetch distance in k rows (4 KB of fp32): measured 1.2-1.4x on 5-row GEMMs from DRAM
constexpr int64_t kAhead = 32;

struct Epilogue {
  const float* bias;
  const float* residual;
  int64_t ldr;
  float* y;
  int64_t ldy;
};

// Rows per weight pass for W-float vectors: the MB x 32 / W accumulators, the tile row's 32 / W weight vectors and
// a broadcast must fit the ISA's vector registers (32 zmm; 16 ymm; 16 xmm), or every one of them goes through the
// stack (GCC 12 spilled the AVX2 build of 8-row 64-byte vectors: 12x slower than AVX-512). AVX2 went from 2 rows to
// 3 when a pass stopped holding all four weight vectors at once (tile): a 3- and 5-row GEMM on the demo's layers,
// 1.22 / 1.64x a 1-row one before, 0.96 / 1.24x after (AMD EPYC Zen 3, weights streaming from DRAM).
template <Isa I>
constexpr int kRows = I == Isa::kAvx512 ? 8 : I == Isa::kAvx2 ? 3 : 1;
// Rows per half-tile pass (AVX2, several row groups: half_tile): 12 accumulators, 2 weight vectors, a broadcast.
constexpr int kHalfRows = 6;
// k rows per block of a multi-pass GEMM (tiles): 8 KB of weights.
template <bool BF16>
constexpr int64_t kKBlockRows = BF16 ? 128 : 64;

// Rows [m0, m0 + MB) x the tile's columns [n0, n0 + nc), nc <= 32 (the last tile may be partial), in NV = 32 / W
// vectors of W floats (VecOf, simd.h), vector v holding columns [v W, v W + W). BF16: the tile holds bf16 pairs
// (small_gemm.h), turned into fp32 vectors by a shift and a mask: the same values as the fp32 tile of a bf16-exact
// weight, so the same multiply-adds and the same bits.
// Rows k0..k1-1 of the tile only, when part is set: the sums so far come from part ([MB, 32] floats, unless k0 = 0)
// and go back there (unless k1 = K, then to y): tiles() runs several row groups over one k block while it is in L1.
struct KBlock {
  int64_t k0, k1;
  float* part;
};

template <int W, int MB, bool BF16>
__attribute__((always_inline)) inline void tile(const float* x, int64_t ldx, int64_t m0, const void* wt, int64_t K,
                                                int64_t n0, int64_t nc, const Epilogue& e, KBlock kb) {
  typedef typename VecOf<W>::f V;
  typedef typename VecOf<W>::u U;
  constexpr int NV = kNB / W;
  V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = kb.k0 > 0 ? load_vec<V>(kb.part + m * kNB + v * W) : V{};
  const float* xr = x + m0 * ldx;
  const float* wf = static_cast<const float*>(wt);
  const uint32_t* wb = static_cast<const uint32_t*>(wt);
  for (int64_t k = kb.k0; k < kb.k1; ++k) {
    // One weight vector (bf16: one pair of them) at a time, into every row's accumulator: MB x NV accumulators,
    // two weight vectors and a broadcast are live (3 rows on AVX2: 12 + 2 + 1 of 16 ymm). The row's x[k] is
    // loaded again for each vector (xk is laundered through an empty asm, so GCC cannot keep MB broadcasts live
    // across vectors and spill accumulators instead): a broadcast load is as cheap as a register.
    const float* xk = xr + k;
    if constexpr (BF16) {  // word j: column j's bf16 bits low, column j + 16's high
      __builtin_prefetch(wb + (k + 2 * kAhead) * 16);
      for (int v = 0; v < NV / 2; ++v) {
        const U pair = load_vec<U>(wb + k * 16 + v * W);
        const V lo = bit_cast_vec<V>(U(pair << 16)), hi = bit_cast_vec<V>(U(pair & 0xFFFF0000u));
        asm("" : "+r"(xk));
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const float a = xk[m * ldx];
          acc[m][v] += a * lo;
          acc[m][NV / 2 + v] += a * hi;
        }
      }
    } else {
      __builtin_prefetch(wf + (k + kAhead) * kNB);
      __builtin_prefetch(wf + (k + kAhead) * kNB + 16);
      for (int v = 0; v < NV; ++v) {
        const V w = load_vec<V>(wf + k * kNB + v * W);
        asm("" : "+r"(xk));
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[m][v] += xk[m * ldx] * w;
      }
    }
  }
  if (kb.k1 < K) {
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) store_vec(kb.part + m * kNB + v * W, acc[m][v]);
    return;
  }
  for (int m = 0; m < MB; ++m) {
    float out[kNB];
    for (int v = 0; v < NV; ++v) store_vec(out + v * W, acc[m][v]);
    float* yr = e.y + (m0 + m) * e.ldy + n0;
    const float* rr = e.residual ? e.residual + (m0 + m) * e.ldr + n0 : nullptr;
    for (int64_t j = 0; j < nc; ++j) {
      float v = out[j];
      if (e.bias) v += e.bias[n0 + j];
      if (rr) v += rr[j];
      yr[j] = v;
    }
  }
}

// Half a tile for AVX2 (W = 8, NV = 4) row groups of several passes: the two vectors of half h, all MB rows, with
// every row's broadcast used twice (the 6 x 16 micro-kernel shape: 12 accumulators, 2 weight vectors, 1
// broadcast of 16 ymm). A full-tile pass loads a broadcast per multiply-add (three rows: 16 loads to 12 FMAs, bound
// by the load ports); here 8 loads feed 12 FMAs. Half h is vectors h (columns 8h..8h+7) and 2 + h (16 + 8h..
// 16 + 8h+7): in bf16 pairs the pair vector h, in fp32 one vector of each of the k row's two cache lines (so the
// first half brings both lines and the second reads them from L1).
// Each column's chain is the full tile's (the same multiply-adds in k order), so the same bits. PF: prefetch the
// next k block (the first row group of either half, so memory keeps streaming while the second half computes: with
// the first half alone prefetching, a 5-row GEMM streaming its weights was ~10 % slower than full-tile passes).
// Measured against 3-row full-tile passes, one core, AMD EPYC Zen 2 (A/B interleaved in one process): 4-6 rows
// 1.00-1.13x faster streaming the weights, 1.05-1.25x from L2, 63 rows (a prefill chunk) 1.1-1.4x; the demo8
// verify of 5 tokens 1.06x, a 63-token prefill 1.09-1.18x.
template <int W, int MB, bool BF16, bool PF>
__attribute__((always_inline)) inline void half_tile(const float* x, int64_t ldx, int64_t m0, const void* wt,
                                                     int64_t K, int64_t n0, int64_t nc, const Epilogue& e,
                                                     KBlock kb, int h) {
  typedef typename VecOf<W>::f V;
  typedef typename VecOf<W>::u U;
  static_assert(kNB / W == 4, "half tiles split a tile of four vectors");
  const int va = h, vb = 2 + h;
  V acc[MB][2];
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = kb.k0 > 0 ? load_vec<V>(kb.part + m * kNB + va * W) : V{};
    acc[m][1] = kb.k0 > 0 ? load_vec<V>(kb.part + m * kNB + vb * W) : V{};
  }
  const float* xr = x + m0 * ldx;
  const float* wf = static_cast<const float*>(wt);
  const uint32_t* wb = static_cast<const uint32_t*>(wt);
  for (int64_t k = kb.k0; k < kb.k1; ++k) {
    V w0, w1;
    if constexpr (BF16) {
      if constexpr (PF) __builtin_prefetch(wb + (k + kKBlockRows<true>) * 16);
      const U pair = load_vec<U>(wb + k * 16 + h * W);
      w0 = bit_cast_vec<V>(U(pair << 16));
      w1 = bit_cast_vec<V>(U(pair & 0xFFFF0000u));
    } else {
      if constexpr (PF) {
        __builtin_prefetch(wf + (k + kKBlockRows<false>) * kNB);
        __builtin_prefetch(wf + (k + kKBlockRows<false>) * kNB + 16);
      }
      w0 = load_vec<V>(wf + k * kNB + va * W);
      w1 = load_vec<V>(wf + k * kNB + vb * W);
    }
    const float* xk = xr + k;
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      asm("" : "+r"(xk));  // one broadcast live at a time (GCC would hoist all MB of them and spill accumulators)
      const float a = xk[m * ldx];
      acc[m][0] += a * w0;
      acc[m][1] += a * w1;
    }
  }
  if (kb.k1 < K) {
    for (int m = 0; m < MB; ++m) {
      store_vec(kb.part + m * kNB + va * W, acc[m][0]);
      store_vec(kb.part + m * kNB + vb * W, acc[m][1]);
    }
    return;
  }
  for (int m = 0; m < MB; ++m) {
    float out[2 * W];
    store_vec(out, acc[m][0]);
    store_vec(out + W, acc[m][1]);
    float* yr = e.y + (m0 + m) * e.ldy + n0;
    const float* rr = e.residual ? e.residual + (m0 + m) * e.ldr + n0 : nullptr;
    for (int j = 0; j < 2; ++j) {
      const int64_t c0 = (j == 0 ? va : vb) * W;
      for (int64_t c = c0; c < std::min<int64_t>(nc, c0 + W); ++c) {
        float v = out[j * W + c - c0];
        if (e.bias) v += e.bias[n0 + c];
        if (rr) v += rr[c];
        yr[c] = v;
      }
    }
  }
}

// The last rows (r < MB) of a half-tile row group (R: the largest remainder still to try).
template <int W, int R, bool BF16, bool PF>
__attribute__((always_inline)) inline void half_tile_rest(int64_t r, const float* x, int64_t ldx, int64_t m0,
                                                          const void* wt, int64_t K, int64_t n0, int64_t nc,
                                                          const Epilogue& e, KBlock kb, int h) {
  if constexpr (R >= 1) {
    if (r == R) return half_tile<W, R, BF16, PF>(x, ldx, m0, wt, K, n0, nc, e, kb, h);
    half_tile_rest<W, R - 1, BF16, PF>(r, x, ldx, m0, wt, K, n0, nc, e, kb, h);
  }
}

// The last M % MB rows of a tile (R: the largest remainder still to try).
template <int W, int R, bool BF16>
__attribute__((always_inline)) inline void tile_rest(int64_t r, const float* x, int64_t ldx, int64_t m0,
                                                     const void* wt, int64_t K, int64_t n0, int64_t nc,
                                                     const Epilogue& e, KBlock kb) {
  if constexpr (R >= 1) {
    if (r == R) return tile<W, R, BF16>(x, ldx, m0, wt, K, n0, nc, e, kb);
    tile_rest<W, R - 1, BF16>(r, x, ldx, m0, wt, K, n0, nc, e, kb);
  }
}

// Tiles [t0, t1) for all M rows, kRows<I> rows of kVecWidth<I>-float vectors per weight pass.
template <Isa I, bool BF16>
__attribute__((always_inline)) inline void tiles(const float* x, int64_t ldx, int64_t M, const void* wp, int64_t K,
                                                 int64_t N, int64_t t0, int64_t t1, const Epilogue& e) {
  constexpr int W = kVecWidth<I>, MB = kRows<I>;
  constexpr int64_t kKBlock = kKBlockRows<BF16>;
  const int64_t tile_bytes = K * kNB * (BF16 ? 2 : 4);
  std::vector<float> part;  // the row groups' partial sums between k blocks ([M, 32])
  for (int64_t t = t0; t < t1; ++t) {
    const void* wt = static_cast<const char*>(wp) + t * tile_bytes;
    const int64_t n0 = t * kNB, nc = std::min(kNB, N - n0);
    if (M <= MB) {  // one pass
      const KBlock all{0, K, nullptr};
      if (M == MB) tile<W, MB, BF16>(x, ldx, 0, wt, K, n0, nc, e, all);
      else tile_rest<W, MB - 1, BF16>(M, x, ldx, 0, wt, K, n0, nc, e, all);
      continue;
    }
    // Several passes (row groups): k block by k block, each block read from memory by the first group and from L1
    // by the others (whole-K passes read the tile again from L2 or further: a 5-row GEMM cost 1.6x a 1-row one on
    // fp32 weights streaming from DRAM, AMD EPYC Zen 3; in k blocks of 8 KB, ~1.3x). Same sums in the same order.
    if (part.size() < static_cast<size_t>(M * kNB)) part.resize(M * kNB);
    for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
      const int64_t k1 = std::min(K, k0 + kKBlock);
      if constexpr (I == Isa::kAvx2) {  // half tiles (half_tile) of up to kHalfRows rows
        constexpr int MH = kHalfRows;
        for (int h = 0; h < 2; ++h) {
          int64_t m0 = 0;
          for (; m0 + MH <= M; m0 += MH) {
            const KBlock kb{k0, k1, part.data() + m0 * kNB};
            if (m0 == 0) half_tile<W, MH, BF16, true>(x, ldx, m0, wt, K, n0, nc, e, kb, h);
            else half_tile<W, MH, BF16, false>(x, ldx, m0, wt, K, n0, nc, e, kb, h);
          }
          const KBlock kb{k0, k1, part.data() + m0 * kNB};
          if (m0 == 0) half_tile_rest<W, MH - 1, BF16, true>(M - m0, x, ldx, m0, wt, K, n0, nc, e, kb, h);
          else half_tile_rest<W, MH - 1, BF16, false>(M - m0, x, ldx, m0, wt, K, n0, nc, e, kb, h);
        }
        continue;
      }
      int64_t m0 = 0;
      for (; m0 + MB <= M; m0 += MB)
        tile<W, MB, BF16>(x, ldx, m0, wt, K, n0, nc, e, KBlock{k0, k1, part.data() + m0 * kNB});
      tile_rest<W, MB - 1, BF16>(M - m0, x, ldx, m0, wt, K, n0, nc, e, KBlock{k0, k1, part.data() + m0 * kNB});
    }
  }
}

// Tiles [t0, t1) of a packed weight in either layout (bf16: the pairs layout).
template <Isa I>
KANGAROO_BODY void gemm_tiles_body(const float* x, int64_t ldx, int64_t M, const void* wp, bool bf16, int64_t K,
                                   int64_t N, int64_t t0, int64_t t1, const Epilogue& e) {
  if (bf16) return tiles<I, true>(x, ldx, M, wp, K, N, t0, t1, e);
  tiles<I, false>(x, ldx, M, wp, K, N, t0, t1, e);
}
KANGAROO_ISA_DISPATCH(gemm_isa, void, gemm_tiles,
                        (const float* x, int64_t ldx, int64_t M, const void* wp, bool bf16, int64_t K, int64_t N,
                         int64_t t0, int64_t t1, const Epilogue& e),
                        (x, ldx, M, wp, bf16, K, N, t0, t1, e))


template <Isa>
KANGAROO_BODY void gemv_rows_body(const float* w, int64_t ldw, const float* x, int64_t N, int64_t K,
                                  const float* b, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    const float* r = w + n * ldw;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += r[k] * x[k];
    y[n] = b ? s + b[n] : s;
  }
}
KANGAROO_ISA_DISPATCH(cpu_isa, void, gemv_rows,
                      (const float* w, int64_t ldw, const float* x, int64_t N, int64_t K, const float* b, float* y),
                      (w, ldw, x, N, K, b, y))

// silu(g) = g * sigmoid(g), the sigmoid from e = exp(-|g|) (no overflow either side): 1 / (1 + e) for g >= 0, else
// e / (1 + e). On W-float vectors (simd.h map_vec: every element the same code).
template <Isa I>
KANGAROO_BODY void silu_mul_body(const float* gate, const float* up, int64_t n, float* out) {
  constexpr int W = kVecWidth<I>;
  typedef typename VecOf<W>::f V;
  typedef typename VecOf<W>::u U;
  map_vec<W>(gate, n, out, [](V g) __attribute__((always_inline)) {
    const V e = exp_nonpositive_vec<W>(bit_cast_vec<V>(bit_cast_vec<U>(g) | 0x80000000u));  // exp(-|g|)
    const V d = 1.f + e;
    return g * (g >= 0.f ? 1.f / d : e / d);
  });
  int64_t i = 0;
  for (; i + W <= n; i += W) store_vec(out + i, load_vec<V>(out + i) * load_vec<V>(up + i));
  for (; i < n; ++i) out[i] *= up[i];
}
KANGAROO_ISA_DISPATCH(cpu_isa, void, silu_mul, (const float* gate, const float* up, int64_t n, float* out),
                      (gate, up, n, out))

}  // namespace

// The GEMM tiles' build: cpu_isa(), but on an AVX-512 CPU whichever of the AVX-512 build (16-float vectors, 8 rows
// a pass) and the AVX2 one (8 floats, 2 rows) runs decode-sized GEMMs on weights past L2 faster here, measured once
// (~15 ms): on an AMD EPYC Zen 5 the AVX2 build ran the decoder's layers 1.1-1.6x faster (1 to 5 rows). Both give
// the same bits (per column the same FMA chain in k order), so the pick never changes a result. KANGAROO_CPU_ISA
// caps it like cpu_isa; KANGAROO_GEMM_ISA=avx512 or avx2 picks without measuring (on an AVX-512 CPU).
Isa gemm_isa() {
  static const Isa isa = [] {
    const Isa cpu = cpu_isa();
#if defined(__x86_64__) && defined(__GNUC__)
    const char* force = std::getenv("KANGAROO_GEMM_ISA");  // "avx512" / "avx2": skip the measurement
    if (cpu == Isa::kAvx512 && force != nullptr && std::string(force) == "avx512") return Isa::kAvx512;
    if (cpu == Isa::kAvx512 && force != nullptr && std::string(force) == "avx2") return Isa::kAvx2;
    if (cpu == Isa::kAvx512) {  // a decode-like load: 1, 3 and 5 rows by 12 weights streaming from past L2
      constexpr int64_t K = 256, N = 1024, T = N / kNB, L = 12, tile = K * kNB / 2;
      std::vector<uint32_t> w(L * T * tile, 0x3C003C00u);  // bf16 pairs of 0.0078
      std::vector<float> x(8 * K, 0.5f), y(8 * N);
      const Epilogue e{nullptr, nullptr, 0, y.data(), N};
      auto time = [&](auto fn) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int64_t M : {1, 3, 5})
          for (int64_t l = 0; l < L; ++l) fn(x.data(), K, M, w.data() + l * T * tile, true, K, N, 0, T, e);
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      };
      double t2 = 1e30, t512 = 1e30;
      for (int rep = 0; rep < 6; ++rep) {  // alternating, the best of each: a busy machine's hiccups fall out
        t2 = std::min(t2, time(gemm_tiles_avx2));
        t512 = std::min(t512, time(gemm_tiles_avx512));
      }
      return t2 < t512 ? Isa::kAvx2 : Isa::kAvx512;
    }
#endif
    return cpu;
  }();
  return isa;
}

bool is_packed(const at::Tensor& wp, int64_t N, int64_t K) {
  const bool f32 = wp.scalar_type() == at::kFloat && wp.dim() == 3 && wp.size(2) == kNB;
  const bool bf16 = wp.scalar_type() == at::kInt && wp.dim() == 3 && wp.size(2) == kNB / 2;
  return (f32 || bf16) && wp.is_contiguous() && wp.size(0) == (N + kNB - 1) / kNB && wp.size(1) == K &&
         wp.device().is_cpu();
}

void gemm_packed(const float* x, int64_t ldx, int64_t M, const at::Tensor& wp, int64_t K, int64_t N,
                 const float* bias, const float* residual, int64_t ldr, float* y, int64_t ldy) {
  if (M <= 0 || N <= 0) return;
  const Epilogue e{bias, residual, ldr, y, ldy};
  const int64_t tiles = (N + kNB - 1) / kNB;
  const bool bf16 = wp.scalar_type() == at::kInt;
  const void* w = wp.data_ptr();
  // about 64K multiply-adds per tile range before a second thread pays for its fork
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kNB * K * std::min<int64_t>(M, 8)));
  at::parallel_for(0, tiles, grain,
                   [&](int64_t t0, int64_t t1) { gemm_tiles(x, ldx, M, w, bf16, K, N, t0, t1, e); });
}

void gemv_nk_f32(const float* w, int64_t ldw, const float* x, int64_t N, int64_t K, const float* b, float* y) {
  at::parallel_for(0, N, std::max<int64_t>(32, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    gemv_rows(w + n0 * ldw, ldw, x, n1 - n0, K, b ? b + n0 : nullptr, y + n0);
  });
}

void rms_norm_row_f32(const float* x, const float* w, int64_t D, double eps, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  for (int64_t d = 0; d < D; ++d) y[d] = w[d] * (x[d] * r);
}

void silu_mul_row_f32(const float* gate, const float* up, int64_t n, float* out) { silu_mul(gate, up, n, out); }

// int64 values in [0, 2^32) -> the int32 tensor with those 32 bits (two's complement, no reliance on overflow).
at::Tensor to_int32_bits(const at::Tensor& v) {
  return at::where(v >= (1LL << 31), v - (1LL << 32), v).to(at::kInt);
}

// [N, K] -> [ceil(N / 32), K, 32] (any dtype; rows past N zero), or with bf16 the pairs layout [ceil(N / 32), K, 16]
// int32 (small_gemm.h) of a weight whose every value is a bf16 (ValueError otherwise: the pairs would round it).
at::Tensor pack_gemm_weight(const at::Tensor& w, bool bf16) {
  TORCH_CHECK_VALUE(w.dim() == 2, "pack_gemm_weight: w must be [N, K], got ", w.dim(), " dims");
  const int64_t N = w.size(0), K = w.size(1), tiles = (N + kNB - 1) / kNB;
  at::Tensor padded = at::zeros({tiles * kNB, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  at::Tensor t = padded.view({tiles, kNB, K}).transpose(1, 2);  // [T, K, 32]
  if (!bf16) return t.contiguous();
  TORCH_CHECK_VALUE(w.is_floating_point(), "pack_gemm_weight: bf16 packing needs a floating-point w");
  const at::Tensor b = t.to(at::kBFloat16);
  TORCH_CHECK_VALUE(w.scalar_type() == at::kBFloat16 || at::equal(b.to(w.scalar_type()), t),
                    "pack_gemm_weight: w is not exactly representable in bf16 (pack it with bf16=False)");
  const at::Tensor bits = b.view(at::kShort).to(at::kLong).bitwise_and(0xFFFF);  // [T, K, 32] bf16 bit patterns
  return to_int32_bits(bits.narrow(2, 0, kNB / 2) + bits.narrow(2, kNB / 2, kNB / 2) * 65536).contiguous();
}

// The inverse: a packed weight (either layout) -> the [n, K] fp32 weight (n <= 32 T), contiguous.
at::Tensor unpack_gemm_weight(const at::Tensor& wp, int64_t n) {
  const bool pairs = wp.dim() == 3 && wp.scalar_type() == at::kInt && wp.size(2) == kNB / 2;
  TORCH_CHECK_VALUE(pairs || (wp.dim() == 3 && wp.size(2) == kNB), "unpack_gemm_weight: wp must be [T, K, ", kNB,
                    "] or bf16 pairs [T, K, ", kNB / 2, "] int32");
  const int64_t T = wp.size(0);
  TORCH_CHECK_VALUE(T == 0 ? n == 0 : (n > (T - 1) * kNB && n <= T * kNB), "unpack_gemm_weight: n = ", n,
                    " rows do not pack into ", T, " tiles of ", kNB);
  at::Tensor t = wp;
  if (pairs) {  // low halves are columns 0..15 of a tile, high halves 16..31: each a float's top 16 bits
    const at::Tensor lo = to_int32_bits(wp.to(at::kLong).bitwise_and(0xFFFF) * 65536);
    const at::Tensor hi = wp.bitwise_and(-65536);  // 0xFFFF0000
    t = at::cat({lo, hi}, 2).view(at::kFloat);
  }
  return t.transpose(1, 2).reshape({T * kNB, wp.size(1)}).narrow(0, 0, n).contiguous();
}

// x [..., K] fp32 times the packed [n, K] weight: [..., n] fp32.
at::Tensor gemm_packed_cpu(const at::Tensor& x, const at::Tensor& wp, int64_t n) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "gemm_packed: x must be fp32");
  TORCH_CHECK_VALUE(x.dim() >= 1 && n >= 1 && is_packed(wp, n, x.size(-1)),
                    "gemm_packed: wp must be a contiguous pack_gemm_weight result ([ceil(n / ", kNB, "), K, ", kNB,
                    "] fp32 or [ceil(n / ", kNB, "), K, ", kNB / 2, "] int32 bf16 pairs) with K = x.size(-1)");
  const at::Tensor xc = x.contiguous();
  const int64_t K = x.size(-1), M = K ? xc.numel() / K : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  gemm_packed(xc.data_ptr<float>(), K, M, wp, K, n, nullptr, nullptr, 0, y.data_ptr<float>(), n);
  return y;
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("gemm_packed", &kangaroo::below_autograd<&kangaroo::gemm_packed_cpu>::call);
}

TORCH_LIBRARY_IMPL(kangaroo_kernels, CompositeExplicitAutograd, m) {
  m.impl("pack_gemm_weight", &kangaroo::pack_gemm_weight);
  m.impl("unpack_gemm_weight", &kangaroo::unpack_gemm_weight);
}
