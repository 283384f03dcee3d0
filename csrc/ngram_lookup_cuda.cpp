// CUDA implementation of kangaroo_kernels::ngram_lookup: checks, then the torch-free launcher
// (csrc/ngram_lookup.cu, kernel in csrc/include/kangaroo/ngram_lookup.cuh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kangaroo/ngram_lookup.cuh"

namespace kangaroo {

// Defined in csrc/cpu/ngram_lookup.cpp (the checks are shared by both devices).
NgramLookupParams ngram_lookup_check_args(const at::Tensor& history, const at::Tensor& lens, int64_t n_min,
                                          int64_t n_max, const at::Tensor& tokens, const at::Tensor& n);

namespace {

void ngram_lookup_cuda(const at::Tensor& history, const at::Tensor& lens, int64_t n_min, int64_t n_max,
                       at::Tensor& tokens, at::Tensor& n) {
  const NgramLookupParams p = ngram_lookup_check_args(history, lens, n_min, n_max, tokens, n);
  const c10::cuda::CUDAGuard guard(history.device());
  const cudaError_t err = ngram_lookup_launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ngram_lookup kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CUDA, m) { m.impl("ngram_lookup", &kangaroo::ngram_lookup_cuda); }
