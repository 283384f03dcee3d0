// Small-batch fp32 GEMMs and row helpers for the hand-written CPU layers (llama_layer, adapter_forward).
//
// A decode step multiplies 1..a few dozen rows by each weight. gemm_packed reads a packed weight once per 8
// rows, as one sequential stream, and computes each output as one fixed chain of multiply-adds over k, the same
// whatever the number of rows: a row's result does not depend on which rows it was batched with, so a verify block
// reproduces the plain decode steps' hidden states bit for bit (MKL's results depend on M). Speed: about MKL's on
// column-major weights when they stream from the last-level cache (bench/bench_llama_layer.py: within +-15 % for
// M = 1, 5, 8); what it saves is the per-call overhead of the ATen layer around it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpu/simd.h"

namespace kangaroo {

// The packed layouts of a [N, K] weight (kangaroo_kernels::pack_gemm_weight), tile t holding columns 32t..32t+31
// of w.T, zero-padded past N, each tile one contiguous stream:
//   fp32        [ceil(N / 32), K, 32] float: 128 bytes per k;
//   bf16 pairs  [ceil(N / 32), K, 16] int32 (a weight whose values are all bf16, e.g. a bf16 checkpoint run in
//               fp32): word j of row k holds column j's bf16 bits low and column j + 16's high, so a shift and a
//               mask give the two fp32 vectors exactly: half the bytes, the same products, the same bits.
constexpr int64_t kPackCols = 32;

// The build of the GEMM tiles this machine runs (small_gemm.cpp: cpu_isa, or on AVX-512 the faster build, measured).
Isa gemm_isa();

// Whether wp is a packed [N, K] weight in either layout (contiguous, CPU).
bool is_packed(const at::Tensor& wp, int64_t N, int64_t K);

// y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n])  (+ residual[m, n]) for m < M, n < N, fp32, with wp the packed w
// (either layout; is_packed). x rows are ldx apart, residual rows ldr, y rows ldy (y may alias residual). Tiles are
// split over torch's intra-op threads when the GEMM is large enough.
void gemm_packed(const float* x, int64_t ldx, int64_t M, const at::Tensor& wp, int64_t K, int64_t N,
                 const float* bias, const float* residual, int64_t ldr, float* y, int64_t ldy);

// y[n] = dot(w[n, :K], x) (+ b[n]) for n < N: a row-major [N, K] fp32 GEMV (rows ldw apart), split over threads.
void gemv_nk_f32(const float* w, int64_t ldw, const float* x, int64_t N, int64_t K, const float* b, float* y);

// HF LlamaRMSNorm of x[0, D) times w into y, fp32 (rms_norm_ref's roundings are exact there).
void rms_norm_row_f32(const float* x, const float* w, int64_t D, double eps, float* y);

// out[i] = silu(gate[i]) * up[i] for i < n (HF's act_fn(gate) * up), fp32.
void silu_mul_row_f32(const float* gate, const float* up, int64_t n, float* out);

}  // namespace kangaroo
