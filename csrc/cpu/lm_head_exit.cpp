// CPU kernels of kangaroo_kernels::lm_head_exit (greedy) and lm_head_topk (semantics:
// kangaroo_kernels/reference/lm_head_exit.py): (RMSNorm +) the LM-head GEMV in fp32 through the reference's own ATen
// calls from C++ (so the same logits, bit for bit), then
//   lm_head_exit: argmax (lowest index on ties), the confidence 1 / sum(exp(logits - max)) and the exit flag;
//   lm_head_topk: the k best tokens in one pass over each row (value descending, lower index first among equal
//                 values, NaN above every number as torch.sort puts it), minus the row's logsumexp; the reference
//                 sorts the whole vocabulary (a 4096-token row: ~0.4 ms of a ~0.9 ms tree draft head).
// The sampled lm_head_exit path stays with the reference (kangaroo_kernels/ops/lm_head_exit.py dispatches).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/ops_cpu.h"

namespace kangaroo {

namespace {

// (RMSNorm +) logits in fp32 [B, V] contiguous, as lm_head_logits_ref computes them.
at::Tensor logits_ref_maths(const at::Tensor& hidden, const at::Tensor& lm_head_weight,
                            const std::optional<at::Tensor>& norm_weight, double eps) {
  const at::Tensor x = norm_weight ? rms_norm_hf(hidden, *norm_weight, eps) : hidden;
  return at::matmul(x.to(at::kFloat), lm_head_weight.to(at::kFloat).t()).contiguous();
}

// torch.sort(descending, stable) order: NaN first (by index), then larger values, then lower indices.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

}  // namespace

void lm_head_exit_greedy_cpu(const at::Tensor& hidden, const at::Tensor& lm_head_weight,
                             const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& active,
                             double threshold, double eps, const at::Tensor& token, const at::Tensor& conf,
                             const at::Tensor& active_out, const at::Tensor& token_prob) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && lm_head_weight.dim() == 2 && lm_head_weight.size(1) == hidden.size(1),
                    "hidden must be [B, D] and lm_head_weight [V, D]");
  const int64_t B = hidden.size(0);
  auto ok = [&](const at::Tensor& t, at::ScalarType st) {
    return t.dim() == 1 && t.size(0) == B && t.is_contiguous() && t.scalar_type() == st && t.device().is_cpu();
  };
  TORCH_CHECK_VALUE(ok(token, at::kInt) && ok(conf, at::kFloat) && ok(active_out, at::kBool) &&
                        ok(token_prob, at::kFloat),
                    "token/conf/active_out/token_prob must be contiguous [B] int32/float32/bool/float32");
  if (active) TORCH_CHECK_VALUE(ok(*active, at::kBool), "active must be a contiguous [B] bool tensor");
  if (B == 0) return;
  const at::Tensor logits = logits_ref_maths(hidden, lm_head_weight, norm_weight, eps);
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

void lm_head_topk_cpu(const at::Tensor& hidden, const at::Tensor& lm_head_weight,
                      const std::optional<at::Tensor>& norm_weight, int64_t k, double eps, const at::Tensor& tokens,
                      const at::Tensor& logprobs) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && lm_head_weight.dim() == 2 && lm_head_weight.size(1) == hidden.size(1),
                    "hidden must be [B, D] and lm_head_weight [V, D]");
  const int64_t B = hidden.size(0), V = lm_head_weight.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= V, "k must be in [1, V]");
  auto ok = [&](const at::Tensor& t, at::ScalarType st) {
    return t.dim() == 2 && t.size(0) == B && t.size(1) == k && t.is_contiguous() && t.scalar_type() == st &&
           t.device().is_cpu();
  };
  TORCH_CHECK_VALUE(ok(tokens, at::kInt) && ok(logprobs, at::kFloat),
                    "tokens/logprobs must be contiguous [B, k] int32/float32");
  if (B == 0) return;
  const at::Tensor logits = logits_ref_maths(hidden, lm_head_weight, norm_weight, eps);
  const at::Tensor lse = at::logsumexp(logits, -1).contiguous();  // the reference's own reduction
  const float* lp = logits.data_ptr<float>();
  const float* sp = lse.data_ptr<float>();
  int32_t* tok = tokens.data_ptr<int32_t>();
  float* out = logprobs.data_ptr<float>();
  std::vector<float> val(k);
  std::vector<int64_t> idx(k);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = lp + b * V;
    int64_t n = 0;  // val/idx[0, n) hold the best so far, in rank order
    for (int64_t j = 0; j < V; ++j) {
      const float v = row[j];
      if (n == k && !ranks_before(v, j, val[k - 1], idx[k - 1])) continue;
      int64_t p = n < k ? n++ : k - 1;
      for (; p > 0 && ranks_before(v, j, val[p - 1], idx[p - 1]); --p) {
        val[p] = val[p - 1];
        idx[p] = idx[p - 1];
      }
      val[p] = v;
      idx[p] = j;
    }
    for (int64_t i = 0; i < k; ++i) {
      tok[b * k + i] = static_cast<int32_t>(idx[i]);
      out[b * k + i] = val[i] - sp[b];
    }
  }
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("lm_head_exit_greedy_cpu", &kangaroo::below_autograd<&kangaroo::lm_head_exit_greedy_cpu>::call);
  m.impl("lm_head_topk_cpu", &kangaroo::below_autograd<&kangaroo::lm_head_topk_cpu>::call);
}
