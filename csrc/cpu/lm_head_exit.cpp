// Greedy CPU kernel of kangaroo_kernels::lm_head_exit (semantics: kangaroo_kernels/reference/lm_head_exit.py):
// (RMSNorm +) the LM-head GEMV in fp32, argmax (lowest index on ties), the confidence 1 / sum(exp(logits - max)) and
// the exit flag, through the reference's own ATen calls from C++ (no Python per op). The sampled path stays with the reference
// (kangaroo_kernels/lm_head_exit.py dispatches).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace kangaroo {

void lm_head_exit_greedy_cpu(const at::Tensor& hidden, const at::Tensor& lm_head_weight,
                             const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& active,
                             double threshold, double eps, const at::Tensor& token, const at::Tensor& conf,
                             const at::Tensor& active_out, const at::Tensor& token_prob) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && lm_head_weight.dim() == 2 && lm_head_weight.size(1) == hidden.size(1),
                    "hidden must be [B, D] and lm_head_weight [V, D]");
  const int64_t B = hidden.size(0), V = lm_head_weight.size(0);
  auto ok = [&](const at::Tensor& t, at::ScalarType st) {
    return t.dim() == 1 && t.size(0) == B && t.is_contiguous() && t.scalar_type() == st && t.device().is_cpu();
  };
  TORCH_CHECK_VALUE(ok(token, at::kInt) && ok(conf, at::kFloat) && ok(active_out, at::kBool) &&
                        ok(token_prob, at::kFloat),
                    "token/conf/active_out/token_prob must be contiguous [B] int32/float32/bool/float32");
  if (active) TORCH_CHECK_VALUE(ok(*active, at::kBool), "active must be a contiguous [B] bool tensor");
  if (B == 0) return;
  at::Tensor x = hidden;
  if (norm_weight) {  // rms_norm_ref: fp32 statistics, rounded to hidden's dtype, times the weight
    const at::Tensor xf = hidden.to(at::kFloat);
    x = *norm_weight * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(hidden.scalar_type());
  }
  const at::Tensor logits = at::matmul(x.to(at::kFloat), lm_head_weight.to(at::kFloat).t()).contiguous();
  // the reference's own ATen reductions, so the results are bit for bit the reference's
  const at::Tensor m = std::get<0>(logits.max(-1, true));
  const at::Tensor c = (1.0 / at::exp(logits - m).sum(-1)).to(at::kFloat);
  const at::Tensor arg = logits.argmax(-1);
  const bool* act = active ? active->data_ptr<bool>() : nullptr;
  const float* cp = c.data_ptr<float>();
  const int64_t* ap = arg.data_ptr<int64_t>();
  int32_t* tok = token.data_ptr<int32_t>();
  float* cf = conf.data_ptr<float>();
  float* tp = token_prob.data_ptr<float>();
  bool* ao = active_out.data_ptr<bool>();  // may alias active (documented): act[b] is read before ao[b] is written
  const float thr = static_cast<float>(threshold);  // the reference compares in fp32
  for (int64_t b = 0; b < B; ++b) {
    const bool a_in = act ? act[b] : true;
    tok[b] = static_cast<int32_t>(ap[b]);
    cf[b] = cp[b];
    tp[b] = cp[b];
    ao[b] = a_in && (cp[b] >= thr);
  }
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("lm_head_exit_greedy_cpu", &kangaroo::lm_head_exit_greedy_cpu);
}
