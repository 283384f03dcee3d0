// CUDA implementation of kangaroo_kernels::verify_sample: checks, then the torch-free launcher
// (csrc/verify_sample.cu, kernel in csrc/include/kangaroo/verify_sample.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>

#include "kangaroo/verify_sample.cuh"

namespace kangaroo {

// Defined in csrc/cpu/verify_sample.cpp (the checks are shared by both devices). Returns {B, N, V}.
std::array<int64_t, 3> verify_sample_check_args(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                                                const std::optional<at::Tensor>& draft_probs,
                                                const std::optional<at::Tensor>& parents,
                                                const std::optional<at::Tensor>& uniforms,
                                                const std::optional<at::Tensor>& seed,
                                                const std::optional<at::Tensor>& offset, double temperature,
                                                int64_t top_k, double top_p, const at::Tensor& accept_len,
                                                const at::Tensor& path, const at::Tensor& tokens);

namespace {

void verify_sample_cuda(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                        const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& parents,
                        const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& seed,
                        const std::optional<at::Tensor>& offset, double temperature, int64_t top_k, double top_p,
                        at::Tensor& accept_len, at::Tensor& path, at::Tensor& tokens) {
  const auto [B, N, V] = verify_sample_check_args(draft_tokens, target_logits, draft_probs, parents, uniforms, seed,
                                                  offset, temperature, top_k, top_p, accept_len, path, tokens);
  const c10::cuda::CUDAGuard guard(draft_tokens.device());
  if (B == 0) return;
  // The residual workspace: one fp64 row of V per CTA, at most ~256 MiB (blocks stride over larger batches).
  // Allocated per call from the stream-ordered caching allocator, so CUDA-graph capture works.
  const int64_t rows = std::clamp<int64_t>((int64_t{256} << 20) / (8 * V), 1, std::min<int64_t>(B, 65535));
  at::Tensor workspace = at::empty({rows, V}, draft_tokens.options().dtype(at::kDouble));
  VerifySampleParams p;
  p.draft_tokens = draft_tokens.data_ptr<int32_t>();
  p.logits = target_logits.data_ptr();
  p.logits_stride_b = target_logits.stride(0);
  p.logits_stride_n = target_logits.stride(1);
  if (draft_probs) {
    p.draft_probs = draft_probs->data_ptr<float>();
    p.q_stride_b = draft_probs->stride(0);
    p.q_stride_n = draft_probs->stride(1);
  }
  if (parents) p.parents = parents->data_ptr<int32_t>();
  if (uniforms) {
    if (uniforms->scalar_type() == at::kFloat) {
      p.uniforms_f32 = uniforms->data_ptr<float>();
    } else {
      p.uniforms_f64 = uniforms->data_ptr<double>();
    }
  } else {
    p.seed = seed->data_ptr<int64_t>();
    p.offset = offset->data_ptr<int64_t>();
  }
  p.workspace = workspace.data_ptr<double>();
  p.workspace_rows = static_cast<int>(rows);
  p.inv_t = 1.0f / static_cast<float>(temperature);
  p.top_k = static_cast<int>(std::min<int64_t>(top_k, V));
  p.top_p = top_p;
  p.B = static_cast<int>(B);
  p.N = static_cast<int>(N);
  p.V = static_cast<int>(V);
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.path = path.data_ptr<int32_t>();
  p.tokens = tokens.data_ptr<int32_t>();
  LogitsDtype dtype = LogitsDtype::kFloat32;
  if (target_logits.scalar_type() == at::kBFloat16) dtype = LogitsDtype::kBFloat16;
  if (target_logits.scalar_type() == at::kHalf) dtype = LogitsDtype::kFloat16;
  const cudaError_t err = verify_sample_launch(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "verify_sample kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CUDA, m) { m.impl("verify_sample", &kangaroo::verify_sample_cuda); }
