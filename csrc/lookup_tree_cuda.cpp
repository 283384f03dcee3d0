// CUDA implementation of kangaroo_kernels::merge_lookup_tree: checks, then the torch-free launcher
// (csrc/lookup_tree.cu, kernel in csrc/include/kangaroo/lookup_tree.cuh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "kangaroo/lookup_tree.cuh"

namespace kangaroo {

// Defined in csrc/cpu/lookup_tree.cpp (the checks are shared by both devices).
MergeLookupParams merge_lookup_tree_check_args(const at::Tensor& draft, const at::Tensor& look,
                                               const std::optional<at::Tensor>& n_look,
                                               const std::optional<at::Tensor>& parents, const at::Tensor& tokens,
                                               const at::Tensor& parents_out, const at::Tensor& source,
                                               const at::Tensor& n_shared, const at::Tensor& lookup_nodes);

namespace {

void merge_lookup_tree_cuda(const at::Tensor& draft, const at::Tensor& look, const std::optional<at::Tensor>& n_look,
                            const std::optional<at::Tensor>& parents, at::Tensor& tokens, at::Tensor& parents_out,
                            at::Tensor& source, at::Tensor& n_shared, at::Tensor& lookup_nodes) {
  const MergeLookupParams p = merge_lookup_tree_check_args(draft, look, n_look, parents, tokens, parents_out, source,
                                                           n_shared, lookup_nodes);
  const c10::cuda::CUDAGuard guard(draft.device());
  const cudaError_t err = merge_lookup_tree_launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "merge_lookup_tree kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CUDA, m) { m.impl("merge_lookup_tree", &kangaroo::merge_lookup_tree_cuda); }
