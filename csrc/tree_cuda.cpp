// CUDA implementation of kangaroo_kernels::build_tree: checks, then the torch-free launcher
// (csrc/tree.cu, kernel in csrc/include/kangaroo/tree.cuh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "kangaroo/tree.cuh"

namespace kangaroo {

// Defined in csrc/cpu/tree.cpp (the checks are shared by both devices).
BuildTreeParams build_tree_check_args(const at::Tensor& parents, const std::optional<at::Tensor>& num_nodes,
                                      const at::Tensor& depth, const at::Tensor& mask,
                                      const at::Tensor& first_child, const at::Tensor& next_sibling,
                                      const at::Tensor& root_first_child);

namespace {

void build_tree_cuda(const at::Tensor& parents, const std::optional<at::Tensor>& num_nodes, at::Tensor& depth,
                     at::Tensor& mask, at::Tensor& first_child, at::Tensor& next_sibling,
                     at::Tensor& root_first_child) {
  const BuildTreeParams p =
      build_tree_check_args(parents, num_nodes, depth, mask, first_child, next_sibling, root_first_child);
  const c10::cuda::CUDAGuard guard(parents.device());
  const cudaError_t err = build_tree_launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "build_tree kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CUDA, m) { m.impl("build_tree", &kangaroo::build_tree_cuda); }
