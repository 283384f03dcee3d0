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

// Defined in csrc/cpu/verify_sample.cpp (checks and parameters shared by both devices).
VerifySampleParams verify_sample_params(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                                        const std::optional<at::Tensor>& draft_probs,
                                        const std::optional<at::Tensor>& parents,
                                        const std::optional<at::Tensor>& uniforms,
                                        const std::optional<at::Tensor>& seed,
                                        const std::optional<at::Tensor>& offset, double temperature, int64_t top_k,
                                        double top_p, at::Tensor& accept_len, at::Tensor& path, at::Tensor& tokens,
                                        const std::optional<at::Tensor>& temperature_rows,
                                        const std::optional<at::Tensor>& top_k_rows,
                                        const std::optional<at::Tensor>& top_p_rows, bool probs);

namespace {

void verify_sample_cuda(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                        const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& parents,
                        const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& seed,
                        const std::optional<at::Tensor>& offset, double temperature, int64_t top_k, double top_p,
                        at::Tensor& accept_len, at::Tensor& path, at::Tensor& tokens,
                        const std::optional<at::Tensor>& temperature_rows,
                        const std::optional<at::Tensor>& top_k_rows, const std::optional<at::Tensor>& top_p_rows,
                        bool probs) {
  VerifySampleParams p = verify_sample_params(draft_tokens, target_logits, draft_probs, parents, uniforms, seed,
                                               offset, temperature, top_k, top_p, accept_len, path, tokens,
                                               temperature_rows, top_k_rows, top_p_rows, probs);
  const int64_t B = p.B, V = p.V;
  const c10::cuda::CUDAGuard guard(draft_tokens.device());
  if (B == 0) return;
  // The residual workspace: one fp64 row of V per CTA, at most ~256 MiB (blocks stride over larger batches).
  // Allocated per call from the stream-ordered caching allocator, so CUDA-graph capture works.
  const int64_t rows = std::clamp<int64_t>((int64_t{256} << 20) / (8 * V), 1, std::min<int64_t>(B, 65535));
  at::Tensor workspace = at::empty({rows, V}, draft_tokens.options().dtype(at::kDouble));
  p.workspace = workspace.data_ptr<double>();
  p.workspace_rows = static_cast<int>(rows);
  LogitsDtype dtype = LogitsDtype::kFloat32;
  if (target_logits.scalar_type() == at::kBFloat16) dtype = LogitsDtype::kBFloat16;
  if (target_logits.scalar_type() == at::kHalf) dtype = LogitsDtype::kFloat16;
  const cudaError_t err = verify_sample_launch(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "verify_sample kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CUDA, m) { m.impl("verify_sample", &kangaroo::verify_sample_cuda); }
