// Counter-based Philox4x32-10 (Salmon et al., SC'11) for host and device, and the uniform mapping
// verify_sample uses. Torch-free; the Python twin is philox_uniforms in
// kangaroo_kernels/reference/verify_sample.py (bit-identical; tested against the Random123 known answers).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KANGAROO_PHILOX_HD __host__ __device__ __forceinline__
#else
#define KANGAROO_PHILOX_HD inline
#endif

namespace kangaroo {

struct PhiloxBlock {
  uint32_t x[4];
};

KANGAROO_PHILOX_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds: counter c[4], key k[2].
KANGAROO_PHILOX_HD PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                             uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kM0, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// The uniform for (seed, counter), in (0, 1) with 52 random bits:
//   key = (lo32(seed), hi32(seed)), counter block = (lo32(counter), hi32(counter), 0, 0),
//   m = (x0 << 20) | (x1 >> 12)  (a 52-bit integer),  u = (m + 0.5) * 2^-52  (exact in double).
// Both ends are excluded: 2^-53 <= u <= 1 - 2^-53.
KANGAROO_PHILOX_HD double philox_uniform(int64_t seed, int64_t counter) {
  const uint64_t s = static_cast<uint64_t>(seed), c = static_cast<uint64_t>(counter);
  const PhiloxBlock r = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u,
                                      static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  const uint64_t m = (static_cast<uint64_t>(r.x[0]) << 20) | (r.x[1] >> 12);
  return (static_cast<double>(m) + 0.5) * 0x1p-52;
}

}  // namespace kangaroo
