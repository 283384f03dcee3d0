// CPU op implementations that other CPU ops call directly (no dispatcher round trip).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace kangaroo {

// kangaroo_kernels::append_attention on CPU tensors (csrc/cpu/append_attention.cpp).
void append_attention_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                          const std::optional<at::Tensor>& tree_mask, const std::optional<at::Tensor>& active,
                          const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& rope_cos_sin,
                          double sm_scale, int64_t num_splits, const at::Tensor& out);

}  // namespace kangaroo
