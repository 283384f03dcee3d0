// Torch-free launcher of the verify_sample kernel (csrc/include/kangaroo/verify_sample.cuh).
#include "kangaroo/verify_sample.cuh"

namespace kangaroo {

cudaError_t verify_sample_launch(const VerifySampleParams& p, LogitsDtype dtype, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  switch (dtype) {
    case LogitsDtype::kFloat32:
      return vsample::launch_verify_sample<float>(p, stream);
    case LogitsDtype::kBFloat16:
      return vsample::launch_verify_sample<__nv_bfloat16>(p, stream);
    case LogitsDtype::kFloat16:
      return vsample::launch_verify_sample<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kangaroo
