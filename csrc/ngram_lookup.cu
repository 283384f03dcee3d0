// Torch-free launcher of the ngram_lookup kernel (csrc/include/kangaroo/ngram_lookup.cuh).
#include "kangaroo/ngram_lookup.cuh"

namespace kangaroo {

cudaError_t ngram_lookup_launch(const NgramLookupParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.B);
  if (p.history_i64) {
    ngram::ngram_lookup_kernel<int64_t><<<grid, ngram::kThreads, 0, stream>>>(p);
  } else {
    ngram::ngram_lookup_kernel<int32_t><<<grid, ngram::kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace kangaroo
