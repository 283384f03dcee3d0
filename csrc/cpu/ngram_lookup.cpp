// CPU implementation of kangaroo_kernels::ngram_lookup (the per-row scan of
// csrc/include/kangaroo/ngram_lookup.cuh) and the metadata checks shared with the CUDA wrapper.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "cpu/checks.h"
#include "kangaroo/ngram_lookup.cuh"
#include "cpu/ops_cpu.h"

namespace kangaroo {

// Metadata checks shared by the CPU and CUDA implementations. Returns the filled params.
NgramLookupParams ngram_lookup_check_args(const at::Tensor& history, const at::Tensor& lens, int64_t n_min,
                                          int64_t n_max, const at::Tensor& tokens, const at::Tensor& n) {
  TORCH_CHECK_VALUE(history.dim() == 2, "history must have shape [B, S], got ", shape_str(history));
  const int64_t B = history.size(0), S = history.size(1);
  TORCH_CHECK_VALUE(S < (int64_t{1} << 31), "history: S must be < 2^31");
  const auto dev = history.device();
  check_meta("history", history, {B, S}, "[B, S]", dev);
  TORCH_CHECK_VALUE(history.scalar_type() == at::kInt || history.scalar_type() == at::kLong,
                    "history must be int32 or int64, got ", history.scalar_type());
  check_meta("lens", lens, {B}, "[B]", dev);
  TORCH_CHECK_VALUE(lens.scalar_type() == at::kInt, "lens must be int32, got ", lens.scalar_type());
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(0) == B && tokens.size(1) >= 1,
                    "tokens must have shape [B, M] with B = ", B, " and M >= 1, got ", shape_str(tokens));
  check_meta("tokens", tokens, {B, tokens.size(1)}, "[B, M]", dev);
  TORCH_CHECK_VALUE(tokens.scalar_type() == at::kInt, "tokens must be int32, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(tokens.size(1) < (int64_t{1} << 31), "tokens: M must be < 2^31");
  check_meta("n", n, {B}, "[B]", dev);
  TORCH_CHECK_VALUE(n.scalar_type() == at::kInt, "n must be int32, got ", n.scalar_type());
  TORCH_CHECK_VALUE(n_min >= 1 && n_max >= n_min && n_max < (int64_t{1} << 31),
                    "n_min, n_max must satisfy 1 <= n_min <= n_max < 2^31, got n_min = ", n_min,
                    ", n_max = ", n_max);
  NgramLookupParams p;
  p.history = history.data_ptr();
  p.history_i64 = history.scalar_type() == at::kLong;
  p.lens = lens.data_ptr<int32_t>();
  p.tokens = tokens.data_ptr<int32_t>();
  p.n = n.data_ptr<int32_t>();
  p.B = B;
  p.S = S;
  p.n_min = static_cast<int>(n_min);
  p.n_max = static_cast<int>(n_max);
  p.M = static_cast<int>(tokens.size(1));
  return p;
}

namespace {

void ngram_lookup_cpu(const at::Tensor& history, const at::Tensor& lens, int64_t n_min, int64_t n_max,
                      at::Tensor& tokens, at::Tensor& n) {
  const NgramLookupParams p = ngram_lookup_check_args(history, lens, n_min, n_max, tokens, n);
  at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (p.history_i64) {
        ngram_lookup_row_host<int64_t>(p, b);
      } else {
        ngram_lookup_row_host<int32_t>(p, b);
      }
    }
  });
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("ngram_lookup", &kangaroo::below_autograd<&kangaroo::ngram_lookup_cpu>::call);
}
