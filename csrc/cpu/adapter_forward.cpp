// CPU implementation of kangaroo_kernels::adapter_forward (semantics and roundings:
// kangaroo_kernels/reference/adapter_forward.py): the same ATen maths as the reference, called from C++, with the
// attention of append_attention's CPU kernel called directly (one CPU attention path for the model and the adapter).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/ops_cpu.h"
#include "cpu/small_gemm.h"

namespace kangaroo {

at::Tensor rms_norm_hf(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor xn = (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
  return w * xn;
}

namespace {

bool rows_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1; }
bool vec_f32(const std::optional<at::Tensor>& t) {
  return !t || (t->scalar_type() == at::kFloat && t->dim() == 1 && t->is_contiguous());
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
  const int64_t D = h.size(1), NQ = Hq * Dh, NK = Hk * Dh;
  if (h.scalar_type() == at::kFloat && h.stride(1) == 1 && rope_cos_sin && rows_f32(wq) && rows_f32(wk) &&
      rows_f32(wv) && rows_f32(wo) && vec_f32(norm_in) && vec_f32(norm_out) && vec_f32(bq) && vec_f32(bk) &&
      vec_f32(bv) &&
      wq.size(1) == D && wk.size(0) == NK && wv.size(0) == NK && wo.size(0) == D && wo.size(1) == NQ) {
    // fp32 (the CPU decoder's dtype): the same maths in hand loops, one scratch tensor for q/k/v and one for the
    // attention; a draft step's adapter is otherwise bound by the ~25 ATen calls' overhead, not by its GEMVs.
    at::Tensor qkv = at::empty({B, 1, Hq + 2 * Hk, Dh}, h.options());
    at::Tensor attn = at::empty({B, 1, Hq, Dh}, h.options());
    std::vector<float> x(D), r(D);
    const float* hp = h.data_ptr<float>();
    float* qp = qkv.data_ptr<float>();
    auto ptr = [](const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; };
    for (int64_t b = 0; b < B; ++b) {
      rms_norm_row_f32(hp + b * h.stride(0), norm_in.data_ptr<float>(), D, eps, x.data());
      float* row = qp + b * (NQ + 2 * NK);
      gemv_nk_f32(wq.data_ptr<float>(), wq.stride(0), x.data(), NQ, D, ptr(bq), row);
      gemv_nk_f32(wk.data_ptr<float>(), wk.stride(0), x.data(), NK, D, ptr(bk), row + NQ);
      gemv_nk_f32(wv.data_ptr<float>(), wv.stride(0), x.data(), NK, D, ptr(bv), row + NQ + NK);
    }
    append_attention_cpu(qkv.narrow(2, 0, Hq), qkv.narrow(2, Hq, Hk), qkv.narrow(2, Hq + Hk, Hk), k_cache, v_cache,
                         cache_lens, std::nullopt, active, positions.view({B, 1}), *rope_cos_sin,
                         1.0 / std::sqrt(static_cast<double>(Dh)), 0, attn);
    const float* ap = attn.data_ptr<float>();
    float* op = const_cast<at::Tensor&>(out).data_ptr<float>();
    const bool* act = active ? active->data_ptr<bool>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      float* ob = op + b * D;
      if (act && !act[b]) {
        std::fill(ob, ob + D, 0.f);
        continue;
      }
      gemv_nk_f32(wo.data_ptr<float>(), wo.stride(0), ap + b * NQ, D, NQ, nullptr, r.data());
      for (int64_t d = 0; d < D; ++d) r[d] += hp[b * h.stride(0) + d];
      if (apply_out_norm) {
        rms_norm_row_f32(r.data(), norm_out.data_ptr<float>(), D, eps, ob);
      } else {
        std::copy(r.begin(), r.end(), ob);
      }
    }
    return;
  }
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

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("adapter_forward", &kangaroo::below_autograd<&kangaroo::adapter_forward_cpu>::call);
}
