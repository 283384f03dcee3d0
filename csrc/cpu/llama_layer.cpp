// CPU implementation of kangaroo_kernels::llama_layer: one Llama-family decoder layer (kangaroo.model.LlamaModel.layer)
// in a single dispatcher crossing. The same ATen calls as the Python layer (so the same results, bit for bit), made
// from C++, with the attention of append_attention's CPU kernel called directly: a small model's CPU decode step is
// bound by per-op overhead, not by its GEMVs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "cpu/ops_cpu.h"

namespace kangaroo {

namespace {

// HF LlamaRMSNorm rounding (kangaroo_kernels.reference.adapter_forward.rms_norm_ref).
at::Tensor rms_norm_hf(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  return w * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
}

}  // namespace

at::Tensor llama_layer_cpu(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& wqkv,
                           const std::optional<at::Tensor>& bqkv, const at::Tensor& wo, const at::Tensor& ln2,
                           const at::Tensor& wgu, const at::Tensor& wd, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, int64_t layer, const at::Tensor& cache_lens,
                           const at::Tensor& positions, const std::optional<at::Tensor>& tree_mask,
                           const std::optional<at::Tensor>& active, const at::Tensor& rope_cos_sin, double eps,
                           int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [B, T, D]");
  TORCH_CHECK_VALUE(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(),
                    "k_cache/v_cache must be stacked [layers, B, Hk, S, Dh]");
  TORCH_CHECK_VALUE(layer >= 0 && layer < k_cache.size(0), "layer out of range of the stacked cache");
  const int64_t B = x.size(0), T = x.size(1), Hq = num_heads, Hk = num_kv_heads, Dh = k_cache.size(4);
  TORCH_CHECK_VALUE(k_cache.size(2) == Hk && wqkv.dim() == 2 && wqkv.size(0) == (Hq + 2 * Hk) * Dh,
                    "wqkv must be [(Hq + 2 Hk) * Dh, D] for the cache's Hk and Dh");
  const at::Tensor h = rms_norm_hf(x, ln1, eps);
  const at::Tensor qkv = at::linear(h, wqkv, bqkv);
  const at::Tensor q = qkv.narrow(-1, 0, Hq * Dh).reshape({B, T, Hq, Dh});
  const at::Tensor k = qkv.narrow(-1, Hq * Dh, Hk * Dh).reshape({B, T, Hk, Dh});
  const at::Tensor v = qkv.narrow(-1, (Hq + Hk) * Dh, Hk * Dh).reshape({B, T, Hk, Dh});
  at::Tensor a = at::empty({B, T, Hq, Dh}, x.options());
  append_attention_cpu(q, k, v, k_cache.select(0, layer), v_cache.select(0, layer), cache_lens, tree_mask, active,
                       positions, rope_cos_sin, std::pow(static_cast<double>(Dh), -0.5), 0, a);
  const at::Tensor x1 = x + at::linear(a.reshape({B, T, Hq * Dh}), wo);
  const at::Tensor h2 = rms_norm_hf(x1, ln2, eps);
  const auto gu = at::linear(h2, wgu).chunk(2, -1);
  return x1 + at::linear(at::silu(gu[0]) * gu[1], wd);
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) { m.impl("llama_layer", &kangaroo::llama_layer_cpu); }
