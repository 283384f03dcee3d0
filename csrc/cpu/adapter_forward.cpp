// CPU implementation of kangaroo_kernels::adapter_forward (semantics and roundings:
// kangaroo_kernels/reference/adapter_forward.py): the same ATen maths as the reference, called from C++, with the
// attention of append_attention's CPU kernel called directly (one CPU attention path for the model and the adapter).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/ops_cpu.h"

namespace kangaroo {

namespace {

// HF LlamaRMSNorm: fp32 statistics, normalised value rounded to x's dtype, times weight (rms_norm_ref).
at::Tensor rms_norm_hf(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor xn = (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
  return w * xn;
}

// x @ w.T (+ b) accumulated in fp32, rounded once to x's dtype (the reference's _linear).
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  at::Tensor y = at::matmul(x.to(at::kFloat), w.to(at::kFloat).t());
  if (b) y = y + b->to(at::kFloat);
  return y.to(x.scalar_type());
}

}  // namespace

void adapter_forward_cpu(const at::Tensor& h, const at::Tensor& norm_in, const at::Tensor& wq, const at::Tensor& wk,
                         const at::Tensor& wv, const std::optional<at::Tensor>& bq,
                         const std::optional<at::Tensor>& bk, const std::optional<at::Tensor>& bv,
                         const at::Tensor& wo, const at::Tensor& norm_out, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& cache_lens, const at::Tensor& positions,
                         const std::optional<at::Tensor>& active, const std::optional<at::Tensor>& rope_cos_sin,
                         double rope_theta, double eps, bool apply_out_norm, const at::Tensor& out) {
  TORCH_CHECK_VALUE(h.dim() == 2 && k_cache.dim() == 4, "h must be [B, D] and k_cache [B, Hk, S, Dh]");
  const int64_t B = h.size(0), Hk = k_cache.size(1), Dh = k_cache.size(3);
  TORCH_CHECK_VALUE(Dh >= 1 && wq.dim() == 2 && wq.size(0) % Dh == 0, "wq must be [Hq * Dh, D]");
  const int64_t Hq = wq.size(0) / Dh;
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == B, "positions must be [B]");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == B && out.size(1) == h.size(1) && out.is_contiguous() &&
                        out.scalar_type() == h.scalar_type(),
                    "out must be a contiguous [B, D] tensor in h's dtype");
  if (B == 0) return;
  const at::Tensor x = rms_norm_hf(h, norm_in, eps);
  const at::Tensor q = linear_f32(x, wq, bq).view({B, 1, Hq, Dh});
  const at::Tensor k = linear_f32(x, wk, bk).view({B, 1, Hk, Dh});
  const at::Tensor v = linear_f32(x, wv, bv).view({B, 1, Hk, Dh});
  at::Tensor table, rope_pos;
  if (rope_cos_sin) {
    table = *rope_cos_sin;
    rope_pos = positions.view({B, 1});
  } else {  // one table row per batch row at float32(position) * inv_freq (HF's default rotary maths)
    const auto fopt = h.options().dtype(at::kFloat);
    const at::Tensor exponent = at::arange(0, Dh, 2, h.options().dtype(at::kLong)).to(at::kFloat) / Dh;
    const at::Tensor inv_freq = 1.0 / at::pow(rope_theta, exponent);
    const at::Tensor ang = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0).to(fopt);
    table = at::cat({ang.cos(), ang.sin()}, -1);
    rope_pos = at::arange(B, h.options().dtype(at::kLong)).unsqueeze(1);
  }
  at::Tensor attn = at::empty({B, 1, Hq, Dh}, h.options());
  append_attention_cpu(q, k, v, k_cache, v_cache, cache_lens, std::nullopt, active, rope_pos, table,
                       1.0 / std::sqrt(static_cast<double>(Dh)), 0, attn);
  const at::Tensor o = linear_f32(attn.view({B, Hq * Dh}), wo, std::nullopt);
  const at::Tensor r = (o.to(at::kFloat) + h.to(at::kFloat)).to(h.scalar_type());
  at::Tensor res = apply_out_norm ? rms_norm_hf(r, norm_out, eps) : r;
  if (active) res = at::where(active->unsqueeze(1), res, at::zeros({}, res.options()));
  const_cast<at::Tensor&>(out).copy_(res);
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) { m.impl("adapter_forward", &kangaroo::adapter_forward_cpu); }
