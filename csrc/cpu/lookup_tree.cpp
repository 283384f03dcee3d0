// CPU implementation of kangaroo_kernels::merge_lookup_tree (the row function of
// csrc/include/kangaroo/lookup_tree.cuh) and the metadata checks shared with the CUDA wrapper.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cpu/checks.h"
#include "kangaroo/lookup_tree.cuh"
#include "cpu/ops_cpu.h"

namespace kangaroo {

// Metadata checks shared by the CPU and CUDA implementations. Returns the filled params.
MergeLookupParams merge_lookup_tree_check_args(const at::Tensor& draft, const at::Tensor& look,
                                               const std::optional<at::Tensor>& n_look,
                                               const std::optional<at::Tensor>& parents, const at::Tensor& tokens,
                                               const at::Tensor& parents_out, const at::Tensor& source,
                                               const at::Tensor& n_shared, const at::Tensor& lookup_nodes) {
  TORCH_CHECK_VALUE(draft.dim() == 2, "draft must have shape [B, N], got ", shape_str(draft));
  TORCH_CHECK_VALUE(look.dim() == 2 && look.size(0) == draft.size(0) && look.size(1) >= 1,
                    "look must have shape [B, M] with B = ", draft.size(0), " and M >= 1, got ", shape_str(look));
  const int64_t B = draft.size(0), N = draft.size(1), M = look.size(1);
  TORCH_CHECK_VALUE(N + M < (int64_t{1} << 30), "draft, look: N + M must be < 2^30");
  const auto dev = draft.device();
  check_i32("draft", draft, {B, N}, "[B, N]", dev);
  check_i32("look", look, {B, M}, "[B, M]", dev);
  if (n_look) check_i32("n_look", *n_look, {B}, "[B]", dev);
  if (parents) check_i32("parents", *parents, {B, N}, "[B, N]", dev);
  check_i32("tokens", tokens, {B, N + M}, "[B, N + M]", dev);
  check_i32("parents_out", parents_out, {B, N + M}, "[B, N + M]", dev);
  check_i32("source", source, {B, N + M}, "[B, N + M]", dev);
  check_i32("n_shared", n_shared, {B}, "[B]", dev);
  check_i32("lookup_nodes", lookup_nodes, {B, M}, "[B, M]", dev);
  MergeLookupParams p;
  p.draft = draft.data_ptr<int32_t>();
  p.look = look.data_ptr<int32_t>();
  p.n_look = n_look ? n_look->data_ptr<int32_t>() : nullptr;
  p.parents = parents ? parents->data_ptr<int32_t>() : nullptr;
  p.tokens = tokens.data_ptr<int32_t>();
  p.parents_out = parents_out.data_ptr<int32_t>();
  p.source = source.data_ptr<int32_t>();
  p.n_shared = n_shared.data_ptr<int32_t>();
  p.lookup_nodes = lookup_nodes.data_ptr<int32_t>();
  p.B = B;
  p.N = static_cast<int>(N);
  p.M = static_cast<int>(M);
  return p;
}

namespace {

void merge_lookup_tree_cpu(const at::Tensor& draft, const at::Tensor& look, const std::optional<at::Tensor>& n_look,
                           const std::optional<at::Tensor>& parents, at::Tensor& tokens, at::Tensor& parents_out,
                           at::Tensor& source, at::Tensor& n_shared, at::Tensor& lookup_nodes) {
  const MergeLookupParams p = merge_lookup_tree_check_args(draft, look, n_look, parents, tokens, parents_out, source,
                                                           n_shared, lookup_nodes);
  at::parallel_for(0, p.B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) merge_lookup_row(p, b);
  });
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("merge_lookup_tree", &kangaroo::below_autograd<&kangaroo::merge_lookup_tree_cpu>::call);
}
