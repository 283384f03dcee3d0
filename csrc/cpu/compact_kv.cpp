// CPU implementation of kangaroo_kernels::compact_kv (semantics and guards in
// csrc/include/kangaroo/compact_kv.cuh) and the metadata checks shared with the CUDA wrapper.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/checks.h"
#include "kangaroo/compact_kv.cuh"
#include "cpu/ops_cpu.h"

namespace kangaroo {

// Metadata checks shared by the CPU and CUDA implementations. Returns the filled params.
CompactKVParams compact_kv_check_args(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_lens, const at::Tensor& path,
                                      const at::Tensor& accept_len) {
  TORCH_CHECK_VALUE(k_cache.dim() == 5, "k_cache must have shape [L, B, Hk, S, Dh], got ", shape_str(k_cache));
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ",
                    shape_str(k_cache), ", got ", shape_str(v_cache));
  TORCH_CHECK_VALUE(k_cache.is_floating_point(), "k_cache must have a floating dtype, got ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache must have the dtype of k_cache (",
                    k_cache.scalar_type(), "), got ", v_cache.scalar_type());
  const auto dev = k_cache.device();
  TORCH_CHECK_VALUE(v_cache.device() == dev, "v_cache must be on ", dev, ", got ", v_cache.device());
  const int64_t L = k_cache.size(0), B = k_cache.size(1), H = k_cache.size(2), S = k_cache.size(3),
                Dh = k_cache.size(4);
  TORCH_CHECK_VALUE(S < (int64_t{1} << 31), "k_cache: S must be < 2^31");
  for (const auto* t : {&k_cache, &v_cache}) {
    TORCH_CHECK_VALUE(Dh <= 1 || t->stride(4) == 1, t == &k_cache ? "k_cache" : "v_cache",
                      " must be contiguous in its last dim (head_dim)");
  }
  TORCH_CHECK_VALUE(path.dim() == 2 && path.size(0) == B && path.size(1) >= 1,
                    "path must have shape [B, N+1] with B = ", B, ", got ", shape_str(path));
  check_i32("path", path, {B, path.size(1)}, "[B, N+1]", dev);
  check_i32("cache_lens", cache_lens, {B}, "[B]", dev);
  check_i32("accept_len", accept_len, {B}, "[B]", dev);
  CompactKVParams p;
  const int64_t es = k_cache.element_size();
  p.k = static_cast<char*>(k_cache.data_ptr());
  p.v = static_cast<char*>(v_cache.data_ptr());
  for (int d = 0; d < 4; ++d) {
    p.k_stride[d] = k_cache.stride(d) * es;
    p.v_stride[d] = v_cache.stride(d) * es;
  }
  p.cache_lens = cache_lens.data_ptr<int32_t>();
  p.path = path.data_ptr<int32_t>();
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.L = L;
  p.B = B;
  p.H = H;
  p.S = S;
  p.row_bytes = Dh * es;
  p.N = static_cast<int>(path.size(1) - 1);
  return p;
}

namespace {

void compact_kv_cpu(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& cache_lens, const at::Tensor& path,
                    const at::Tensor& accept_len) {
  const CompactKVParams p = compact_kv_check_args(k_cache, v_cache, cache_lens, path, accept_len);
  const std::vector<int32_t> lens(p.cache_lens, p.cache_lens + p.B);
  const int64_t cols = p.L * p.B * p.H;
  at::parallel_for(0, cols, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t h = c % p.H, b = (c / p.H) % p.B, l = c / (p.H * p.B);
      compact_kv_column_host(p, l, b, h, lens[b]);
    }
  });
  for (int64_t b = 0; b < p.B; ++b) p.cache_lens[b] = compact_kv_new_len(p, b, lens[b]);
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("compact_kv", &kangaroo::below_autograd<&kangaroo::compact_kv_cpu>::call);
}
