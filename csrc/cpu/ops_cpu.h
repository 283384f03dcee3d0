// CPU op implementations that other CPU ops call directly (no dispatcher round trip).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace kangaroo {

// The CPU ops' registered entry points run their own ATen calls (views, allocations, small ops) below the autograd
// and view-tracking keys: no op here has a backward, and through those keys a small layer's glue cost ~1.6x
// (llama_layer on a 64-wide layer, where the maths is ~2 us: 39 -> 24 us a call).
// Registration: m.impl("op", &below_autograd<&op_cpu>::call).
template <auto F>
struct below_autograd;
template <typename R, typename... A, R (*F)(A...)>
struct below_autograd<F> {
  static R call(A... a) {
    const at::AutoDispatchBelowADInplaceOrView guard;
    return F(a...);
  }
};

// HF LlamaRMSNorm as ATen calls: fp32 statistics, the normalised value rounded to x's dtype, times w
// (kangaroo_kernels.reference.adapter_forward.rms_norm_ref; csrc/cpu/adapter_forward.cpp).
at::Tensor rms_norm_hf(const at::Tensor& x, const at::Tensor& w, double eps);

// kangaroo_kernels::append_attention on CPU tensors (csrc/cpu/append_attention.cpp).
void append_attention_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                          const std::optional<at::Tensor>& tree_mask, const std::optional<at::Tensor>& active,
                          const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& rope_cos_sin,
                          double sm_scale, int64_t num_splits, const at::Tensor& out);

// kangaroo_kernels::adapter_forward on CPU tensors (csrc/cpu/adapter_forward.cpp).
void adapter_forward_cpu(const at::Tensor& h, const at::Tensor& norm_in, const at::Tensor& wq, const at::Tensor& wk,
                         const at::Tensor& wv, const std::optional<at::Tensor>& bq,
                         const std::optional<at::Tensor>& bk, const std::optional<at::Tensor>& bv,
                         const at::Tensor& wo, const at::Tensor& norm_out, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& cache_lens, const at::Tensor& positions,
                         const std::optional<at::Tensor>& active, const std::optional<at::Tensor>& rope_cos_sin,
                         double rope_theta, double eps, bool apply_out_norm, const at::Tensor& out);

// kangaroo_kernels::llama_layer on CPU tensors (csrc/cpu/llama_layer.cpp).
at::Tensor llama_layer_cpu(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& wqkv,
                           const std::optional<at::Tensor>& bqkv, const at::Tensor& wo, const at::Tensor& ln2,
                           const at::Tensor& wgu, const at::Tensor& wd, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, int64_t layer, const at::Tensor& cache_lens,
                           const at::Tensor& positions, const std::optional<at::Tensor>& tree_mask,
                           const std::optional<at::Tensor>& active, const at::Tensor& rope_cos_sin, double eps,
                           int64_t num_heads, int64_t num_kv_heads);

// kangaroo_kernels::lm_head_exit_int8 on CPU tensors (csrc/cpu/lm_head_exit_int8.cpp).
void lm_head_exit_int8_cpu(const at::Tensor& hidden, const at::Tensor& qweight, const at::Tensor& scale,
                           const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& active,
                           double threshold, double eps, const at::Tensor& token, const at::Tensor& conf,
                           const at::Tensor& active_out, const at::Tensor& token_prob);

}  // namespace kangaroo
