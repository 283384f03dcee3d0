// Torch-free launcher of the compact_kv kernels (csrc/include/kangaroo/compact_kv.cuh).
#include "kangaroo/compact_kv.cuh"

namespace kangaroo {

namespace {

template <int kBytes>
cudaError_t launch_width(const CompactKVParams& p, cudaStream_t stream) {
  const int64_t lanes = p.row_bytes / kBytes;
  const int64_t total = p.L * p.B * p.H * lanes;
  if (total > 0) {
    ckv::compact_kv_kernel<kBytes>
        <<<static_cast<unsigned>(ceil_div<int64_t>(total, ckv::kThreads)), ckv::kThreads, 0, stream>>>(p, lanes,
                                                                                                         total);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ckv::compact_kv_lens_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(p.B, 256)), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t compact_kv_launch(const CompactKVParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  // the widest access that every row start and the row length are aligned to
  uint64_t g = reinterpret_cast<uintptr_t>(p.k) | reinterpret_cast<uintptr_t>(p.v) |
               static_cast<uint64_t>(p.row_bytes);
  for (int d = 0; d < 4; ++d) g |= static_cast<uint64_t>(p.k_stride[d]) | static_cast<uint64_t>(p.v_stride[d]);
  if (g % 16 == 0) return launch_width<16>(p, stream);
  if (g % 8 == 0) return launch_width<8>(p, stream);
  if (g % 4 == 0) return launch_width<4>(p, stream);
  if (g % 2 == 0) return launch_width<2>(p, stream);
  return launch_width<1>(p, stream);
}

}  // namespace kangaroo
