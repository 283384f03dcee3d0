// CPU implementation of kangaroo_kernels::llama_layer: one Llama-family decoder layer (kangaroo.model.LlamaModel.layer)
// in a single dispatcher crossing, with the attention of append_attention's CPU kernel called directly.
//
// fp32 with the model's column-major CPU weights (the decoder's CPU configuration) runs as hand loops over
// small_gemm.h: a small model's decode step was bound by the ~35 ATen calls' overhead (a 12 x 256 layer: 470 us, of
// which 125 us GEMVs; bench/bench_llama_layer.py compares both paths). The GEMMs' per-row results do not depend on
// how many rows share the call, so verifying k tokens reproduces k plain steps exactly.
// Other dtypes and layouts run the same maths as ATen calls.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/ops_cpu.h"
#include "cpu/small_gemm.h"

namespace kangaroo {

namespace {

bool vec_f32(const at::Tensor& t, int64_t n) {
  return t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous();
}

thread_local std::vector<float> tls_rows;

// The layer in hand loops (fp32 activations, packed weights in either layout): rows r = b * T + t of x [B, T, D]
// contiguous.
at::Tensor layer_f32(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& wqkv,
                     const std::optional<at::Tensor>& bqkv, const at::Tensor& wo, const at::Tensor& ln2,
                     const at::Tensor& wgu, const at::Tensor& wd, const at::Tensor& kc, const at::Tensor& vc,
                     const at::Tensor& cache_lens, const at::Tensor& positions,
                     const std::optional<at::Tensor>& tree_mask, const std::optional<at::Tensor>& active,
                     const at::Tensor& rope_cos_sin, double eps, int64_t Hq, int64_t Hk, int64_t Dh) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), R = B * T;
  const int64_t NQ = Hq * Dh, NQKV = (Hq + 2 * Hk) * Dh, I = wd.size(1);  // wd packed: [tiles, I, 32]
  at::Tensor qkv = at::empty({B, T, Hq + 2 * Hk, Dh}, x.options());
  at::Tensor attn = at::empty({B, T, Hq, Dh}, x.options());
  at::Tensor out = at::empty({B, T, D}, x.options());
  if (tls_rows.size() < static_cast<size_t>(R * (D + 3 * I))) tls_rows.resize(R * (D + 3 * I));
  float* h = tls_rows.data();  // [R, D] normed rows
  float* gu = h + R * D;       // [R, 2I] gate | up
  float* g = gu + R * 2 * I;   // [R, I] silu(gate) * up
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) rms_norm_row_f32(xp + r * D, ln1.data_ptr<float>(), D, eps, h + r * D);
  gemm_packed(h, D, R, wqkv, D, NQKV, bqkv ? bqkv->data_ptr<float>() : nullptr, nullptr, 0, qkv.data_ptr<float>(),
              NQKV);
  append_attention_cpu(qkv.narrow(2, 0, Hq), qkv.narrow(2, Hq, Hk), qkv.narrow(2, Hq + Hk, Hk), kc, vc, cache_lens,
                       tree_mask, active, positions, rope_cos_sin, std::pow(static_cast<double>(Dh), -0.5), 0, attn);
  gemm_packed(attn.data_ptr<float>(), NQ, R, wo, NQ, D, nullptr, xp, D, op, D);
  for (int64_t r = 0; r < R; ++r) rms_norm_row_f32(op + r * D, ln2.data_ptr<float>(), D, eps, h + r * D);
  gemm_packed(h, D, R, wgu, D, 2 * I, nullptr, nullptr, 0, gu, 2 * I);
  for (int64_t r = 0; r < R; ++r) silu_mul_row_f32(gu + r * 2 * I, gu + r * 2 * I + I, I, g + r * I);
  gemm_packed(g, I, R, wd, I, D, nullptr, op, D, op, D);
  return out;
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
  TORCH_CHECK_VALUE(k_cache.size(2) == Hk, "k_cache has ", k_cache.size(2), " KV heads, num_kv_heads is ", Hk);
  const int64_t D = x.size(2), I = wd.dim() >= 2 ? wd.size(1) : 0;  // wd: [D, I] or packed [tiles, I, 32]
  if (wqkv.dim() == 3 || wo.dim() == 3 || wgu.dim() == 3 || wd.dim() == 3) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && is_packed(wqkv, (Hq + 2 * Hk) * Dh, D) &&
                          is_packed(wo, D, Hq * Dh) && is_packed(wgu, 2 * I, D) && is_packed(wd, D, I) &&
                          vec_f32(ln1, D) && vec_f32(ln2, D) && (!bqkv || vec_f32(*bqkv, (Hq + 2 * Hk) * Dh)),
                      "llama_layer: packed weights (pack_gemm_weight) need fp32 x, norms and bias, and all four "
                      "weights packed (fp32 or bf16 pairs) with the layer's shapes");
    return layer_f32(x.contiguous(), ln1, wqkv, bqkv, wo, ln2, wgu, wd, k_cache.select(0, layer),
                     v_cache.select(0, layer), cache_lens, positions, tree_mask, active, rope_cos_sin, eps, Hq, Hk,
                     Dh);
  }
  TORCH_CHECK_VALUE(wqkv.dim() == 2 && wqkv.size(0) == (Hq + 2 * Hk) * Dh,
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

// kangaroo_kernels::llama_layers: layers first_layer .. first_layer + n - 1 (n = layers.size() / 7) in one crossing.
// A layer call from Python costs ~35-40 us of interpreter and dispatcher work whatever the layer's size (measured:
// 40 us for a 64-wide layer whose maths takes ~2 us), a tenth of a 256-wide model's decode step over 12 layers.
at::Tensor llama_layers_cpu(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& layers,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t first_layer,
                            const at::Tensor& cache_lens, const at::Tensor& positions,
                            const std::optional<at::Tensor>& tree_mask, const std::optional<at::Tensor>& active,
                            const at::Tensor& rope_cos_sin, double eps, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK_VALUE(layers.size() % 7 == 0, "llama_layers: layers must hold 7 tensors per layer (ln1, wqkv, bqkv or "
                    "None, wo, ln2, wgu, wd), got ", layers.size());
  const int64_t n = static_cast<int64_t>(layers.size()) / 7;
  TORCH_CHECK_VALUE(k_cache.dim() == 5 && first_layer >= 0 && first_layer + n <= k_cache.size(0),
                    "llama_layers: layers ", first_layer, "..", first_layer + n - 1,
                    " out of range of the stacked cache [layers, B, Hk, S, Dh]");
  at::Tensor h = x;
  for (int64_t l = 0; l < n; ++l) {
    auto w = [&](int64_t j) -> at::Tensor {
      const std::optional<at::Tensor> t = layers.get(7 * l + j);
      TORCH_CHECK_VALUE(t.has_value() && t->defined(), "llama_layers: layer ", first_layer + l, " weight ", j,
                        " is missing");
      return *t;
    };
    h = llama_layer_cpu(h, w(0), w(1), layers.get(7 * l + 2), w(3), w(4), w(5), w(6), k_cache, v_cache,
                        first_layer + l, cache_lens, positions, tree_mask, active, rope_cos_sin, eps, num_heads,
                        num_kv_heads);
  }
  return h;
}

// kangaroo_kernels::lm_logits: the final RMSNorm (rms_norm_hf: rms_norm_ref's calls, so its bits) and the packed LM
// head, fp32 logits [..., vocab_size] (LlamaModel.logits on CPU). In one crossing because between a cycle's weight
// streams the norm's 7 torch calls from Python ran cold: ~250 us a verify, against ~45 us in a loop of their own.
at::Tensor lm_logits_cpu(const at::Tensor& h, const at::Tensor& norm_weight, double eps, const at::Tensor& head,
                         int64_t vocab_size) {
  TORCH_CHECK_VALUE(h.scalar_type() == at::kFloat && h.dim() >= 1 && vec_f32(norm_weight, h.size(-1)),
                    "lm_logits: h must be fp32 [..., D] and norm_weight fp32 [D]");
  TORCH_CHECK_VALUE(vocab_size >= 1 && is_packed(head, vocab_size, h.size(-1)),
                    "lm_logits: head must be the packed [vocab_size, D] LM head (pack_gemm_weight)");
  const at::Tensor x = rms_norm_hf(h, norm_weight, eps).contiguous();
  const int64_t D = h.size(-1), M = x.numel() / D;
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = vocab_size;
  at::Tensor y = at::empty(shape, h.options());
  gemm_packed(x.data_ptr<float>(), D, M, head, D, vocab_size, nullptr, nullptr, 0, y.data_ptr<float>(), vocab_size);
  return y;
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("lm_logits", &kangaroo::below_autograd<&kangaroo::lm_logits_cpu>::call);
  m.impl("llama_layer", &kangaroo::below_autograd<&kangaroo::llama_layer_cpu>::call);
  m.impl("llama_layers", &kangaroo::below_autograd<&kangaroo::llama_layers_cpu>::call);
}
