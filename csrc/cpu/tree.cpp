// CPU implementation of kangaroo_kernels::build_tree (the sequential definition in
// csrc/include/kangaroo/tree.cuh) and the metadata checks shared with the CUDA wrapper.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/checks.h"
#include "kangaroo/tree.cuh"
#include "cpu/ops_cpu.h"

namespace kangaroo {

// Metadata checks shared by the CPU and CUDA implementations. Returns the filled params (pointers included).
BuildTreeParams build_tree_check_args(const at::Tensor& parents, const std::optional<at::Tensor>& num_nodes,
                                      const at::Tensor& depth, const at::Tensor& mask,
                                      const at::Tensor& first_child, const at::Tensor& next_sibling,
                                      const at::Tensor& root_first_child) {
  TORCH_CHECK_VALUE(parents.dim() == 2, "parents must have shape [B, N], got ", shape_str(parents));
  const int64_t B = parents.size(0), N = parents.size(1);
  TORCH_CHECK_VALUE(N <= 65536, "parents: N must be <= 65536, got ", N);
  const int64_t W = ceil_div<int64_t>(N, 32);
  const auto dev = parents.device();
  check_i32("parents", parents, {B, N}, "[B, N]", dev);
  if (num_nodes) check_i32("num_nodes", *num_nodes, {B}, "[B]", dev);
  check_i32("depth", depth, {B, N}, "[B, N]", dev);
  check_i32("mask", mask, {B, N, W}, "[B, N, ceil(N/32)]", dev);
  check_i32("first_child", first_child, {B, N}, "[B, N]", dev);
  check_i32("next_sibling", next_sibling, {B, N}, "[B, N]", dev);
  check_i32("root_first_child", root_first_child, {B}, "[B]", dev);
  BuildTreeParams p;
  p.parents = parents.data_ptr<int32_t>();
  p.num_nodes = num_nodes ? num_nodes->data_ptr<int32_t>() : nullptr;
  p.depth = depth.data_ptr<int32_t>();
  p.mask = mask.data_ptr<int32_t>();
  p.first_child = first_child.data_ptr<int32_t>();
  p.next_sibling = next_sibling.data_ptr<int32_t>();
  p.root_first_child = root_first_child.data_ptr<int32_t>();
  p.B = B;
  p.N = static_cast<int>(N);
  p.W = static_cast<int>(W);
  return p;
}

namespace {

void build_tree_cpu(const at::Tensor& parents, const std::optional<at::Tensor>& num_nodes, at::Tensor& depth,
                    at::Tensor& mask, at::Tensor& first_child, at::Tensor& next_sibling,
                    at::Tensor& root_first_child) {
  const BuildTreeParams p =
      build_tree_check_args(parents, num_nodes, depth, mask, first_child, next_sibling, root_first_child);
  at::parallel_for(0, p.B, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> last;
    for (int64_t b = begin; b < end; ++b) build_tree_row_host(p, b, last);
  });
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("build_tree", &kangaroo::below_autograd<&kangaroo::build_tree_cpu>::call);
}
