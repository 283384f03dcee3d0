// CPU implementation of kangaroo_kernels::verify_greedy (the sequential walk of
// csrc/include/kangaroo/verify_greedy.cuh; argmax only on the visited rows) and the metadata checks shared with
// the CUDA wrapper.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cpu/checks.h"
#include "kangaroo/verify_greedy.cuh"
#include "cpu/ops_cpu.h"

namespace kangaroo {

// Metadata checks shared by the CPU and CUDA implementations. Returns the filled params.
VerifyGreedyParams verify_greedy_check_args(const at::Tensor& draft_tokens, const at::Tensor& target,
                                            const std::optional<at::Tensor>& parents, const at::Tensor& accept_len,
                                            const at::Tensor& path, const at::Tensor& tokens) {
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2, "draft_tokens must have shape [B, N], got ",
                    shape_str(draft_tokens));
  const int64_t B = draft_tokens.size(0), N = draft_tokens.size(1);
  TORCH_CHECK_VALUE(N + 1 < (int64_t{1} << 31), "draft_tokens: N is too large");
  const auto dev = draft_tokens.device();
  check_meta("draft_tokens", draft_tokens, {B, N}, "[B, N]", dev);
  TORCH_CHECK_VALUE(draft_tokens.scalar_type() == at::kInt, "draft_tokens must be int32");
  VerifyGreedyParams p;
  const auto tt = target.scalar_type();
  if (tt == at::kInt) {
    check_meta("target", target, {B, N + 1}, "[B, N+1] (tokens)", dev);
    p.kind = TargetKind::kTokens;
  } else {
    TORCH_CHECK_VALUE(tt == at::kFloat || tt == at::kBFloat16 || tt == at::kHalf,
                      "target must be float32/bfloat16/float16 logits [B, N+1, V] or int32 tokens [B, N+1], got ",
                      tt);
    check_meta("target", target, {B, N + 1, -1}, "[B, N+1, V] (logits)", dev);
    p.V = target.size(2);
    TORCH_CHECK_VALUE(p.V >= 1 && p.V < (int64_t{1} << 31), "target: V must be in [1, 2^31), got ", p.V);
    p.kind = tt == at::kFloat ? TargetKind::kFloat32 : (tt == at::kBFloat16 ? TargetKind::kBFloat16
                                                                             : TargetKind::kFloat16);
  }
  if (parents) {
    check_meta("parents", *parents, {B, N}, "[B, N]", dev);
    TORCH_CHECK_VALUE(parents->scalar_type() == at::kInt, "parents must be int32");
    p.parents = parents->data_ptr<int32_t>();
  }
  check_meta("accept_len", accept_len, {B}, "[B]", dev);
  check_meta("path", path, {B, N + 1}, "[B, N+1]", dev);
  check_meta("tokens", tokens, {B, N + 1}, "[B, N+1]", dev);
  for (const auto* t : {&accept_len, &path, &tokens}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt,
                      t == &accept_len ? "accept_len" : (t == &path ? "path" : "tokens"), " must be int32");
  }
  p.draft_tokens = draft_tokens.data_ptr<int32_t>();
  p.target = target.data_ptr();
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.path = path.data_ptr<int32_t>();
  p.tokens = tokens.data_ptr<int32_t>();
  p.B = B;
  p.N = static_cast<int>(N);
  return p;
}

namespace {

template <typename T>
int32_t row_argmax(const T* row, int64_t V) {
  uint32_t best = 0;
  int64_t index = 0;
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t k = argmax_key(static_cast<float>(row[i]));
    if (k > best) {
      best = k;
      index = i;
    }
  }
  return static_cast<int32_t>(index);
}

template <typename T>
void walk_logits(const VerifyGreedyParams& p) {
  const T* logits = static_cast<const T*>(p.target);
  at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      verify_greedy_walk_host(p, b, [&](int r) { return row_argmax(logits + (b * (p.N + 1) + r) * p.V, p.V); });
    }
  });
}

void verify_greedy_cpu(const at::Tensor& draft_tokens, const at::Tensor& target,
                       const std::optional<at::Tensor>& parents, at::Tensor& accept_len, at::Tensor& path,
                       at::Tensor& tokens) {
  const VerifyGreedyParams p = verify_greedy_check_args(draft_tokens, target, parents, accept_len, path, tokens);
  switch (p.kind) {
    case TargetKind::kTokens: {
      const auto* tok = static_cast<const int32_t*>(p.target);
      at::parallel_for(0, p.B, 64, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          verify_greedy_walk_host(p, b, [&](int r) { return tok[b * (p.N + 1) + r]; });
        }
      });
      break;
    }
    case TargetKind::kFloat32:
      walk_logits<float>(p);
      break;
    case TargetKind::kBFloat16:
      walk_logits<c10::BFloat16>(p);
      break;
    case TargetKind::kFloat16:
      walk_logits<c10::Half>(p);
      break;
  }
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("verify_greedy", &kangaroo::below_autograd<&kangaroo::verify_greedy_cpu>::call);
}
