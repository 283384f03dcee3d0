// CUDA implementation of kangaroo_kernels::compact_kv: checks, then the torch-free launcher
// (csrc/compact_kv.cu, kernels in csrc/include/kangaroo/compact_kv.cuh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kangaroo/compact_kv.cuh"

namespace kangaroo {

// Defined in csrc/cpu/compact_kv.cpp (the checks are shared by both devices).
CompactKVParams compact_kv_check_args(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_lens, const at::Tensor& path,
                                      const at::Tensor& accept_len);

namespace {

void compact_kv_cuda(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& cache_lens, const at::Tensor& path,
                     const at::Tensor& accept_len) {
  const CompactKVParams p = compact_kv_check_args(k_cache, v_cache, cache_lens, path, accept_len);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaError_t err = compact_kv_launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "compact_kv kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CUDA, m) { m.impl("compact_kv", &kangaroo::compact_kv_cuda); }
