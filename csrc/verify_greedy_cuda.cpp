// CUDA implementation of kangaroo_kernels::verify_greedy: checks, then the torch-free launcher
// (csrc/verify_greedy.cu, kernels in csrc/include/kangaroo/verify_greedy.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "kangaroo/verify_greedy.cuh"

namespace kangaroo {

// Defined in csrc/cpu/verify_greedy.cpp (the checks are shared by both devices).
VerifyGreedyParams verify_greedy_check_args(const at::Tensor& draft_tokens, const at::Tensor& target,
                                            const std::optional<at::Tensor>& parents, const at::Tensor& accept_len,
                                            const at::Tensor& path, const at::Tensor& tokens);

namespace {

void verify_greedy_cuda(const at::Tensor& draft_tokens, const at::Tensor& target,
                        const std::optional<at::Tensor>& parents, at::Tensor& accept_len, at::Tensor& path,
                        at::Tensor& tokens) {
  const VerifyGreedyParams p = verify_greedy_check_args(draft_tokens, target, parents, accept_len, path, tokens);
  const c10::cuda::CUDAGuard guard(draft_tokens.device());
  const VerifyGreedyPlan plan = verify_greedy_plan(p, verify_greedy_num_sms());
  // per-chunk maxima of the full mode (stream-ordered caching allocator: no sync, graph-safe)
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, draft_tokens.options().dtype(at::kByte));
  }
  const cudaError_t err = verify_greedy_launch(p, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                               c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "verify_greedy kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CUDA, m) { m.impl("verify_greedy", &kangaroo::verify_greedy_cuda); }
