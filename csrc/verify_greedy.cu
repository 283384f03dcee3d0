// Torch-free launcher of the verify_greedy kernels (csrc/include/kangaroo/verify_greedy.cuh).
#include <atomic>

#include "kangaroo/verify_greedy.cuh"

namespace kangaroo {

int verify_greedy_num_sms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < kMaxDevices) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1) sms = 1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

cudaError_t verify_greedy_launch(const VerifyGreedyParams& p, const VerifyGreedyPlan& plan, void* workspace,
                                 cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  switch (p.kind) {
    case TargetKind::kTokens:
      vgreedy::walk_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(p.B, vgreedy::kWalkWarps)),
                             vgreedy::kWalkWarps * 32, 0, stream>>>(p, nullptr, 0);
      return cudaGetLastError();
    case TargetKind::kFloat32:
      return vgreedy::launch_typed<float>(p, plan, workspace, stream);
    case TargetKind::kBFloat16:
      return vgreedy::launch_typed<__nv_bfloat16>(p, plan, workspace, stream);
    case TargetKind::kFloat16:
      return vgreedy::launch_typed<__half>(p, plan, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kangaroo
