// CPU implementation of kangaroo_kernels::append_attention (semantics: kangaroo_kernels/reference/append_attention.py).
//
// One task per (row b, KV head kh): it rotates the T new keys (rounded to the cache dtype: the values the cache
// receives), then for every query row (token t, query head of kh) attends over the cached prefix
// [0, clamp(L, 0, S)) read in place plus the new block (causal, or the tree's ancestor bits), softmax in fp32, and
// finally writes the new K/V at slots L + t inside [0, S). Nothing is concatenated, and nothing is allocated per
// call but a per-thread scratch that only grows. Any head dim (even when RoPE is fused) and any strides work: q/k/v
// may be views of a fused QKV output and the caches one layer of a stacked cache.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/ops_cpu.h"
#include "cpu/simd.h"

namespace kangaroo {

namespace {

// fp32 dot with 8 independent partial sums (vectorisable without -ffast-math).
inline float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[i + u] * b[i + u];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
inline void load_row(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

// HF rotate-half RoPE of x[0, Dh) in place: fp32 maths, rounded to T (apply_rope_ref).
template <typename T>
inline void rope_row(float* x, const float* cs, int64_t Dh) {
  const int64_t half = Dh / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cs[i], s = cs[half + i];
    const float x1 = x[i], x2 = x[half + i];
    const float p1 = x1 * c, p2 = x2 * s, p3 = x2 * c, p4 = x1 * s;
    x[i] = static_cast<float>(static_cast<T>(p1 - p2));
    x[half + i] = static_cast<float>(static_cast<T>(p3 + p4));
  }
}

thread_local std::vector<float> tls_scratch;

inline float* scratch(size_t n) {
  if (tls_scratch.size() < n) tls_scratch.resize(n);
  return tls_scratch.data();
}

struct Args {
  const void *q, *kn, *vn, *lens, *tree, *active, *pos, *cs;
  void *kc, *vc, *out;
  bool lens64, pos64;
  int64_t B, T, Hq, Hk, G, Dh, S, W, max_pos;
  int64_t s_qb, s_qt, s_qh, s_qd, s_knb, s_knt, s_knh, s_knd, s_vnb, s_vnt, s_vnh, s_vnd;
  int64_t s_kcb, s_kch, s_kcs, s_kcd, s_vcb, s_vch, s_vcs, s_vcd, s_tmb, s_tmt, s_pb, s_pt, s_cs;
  float scale;
};

inline int64_t read_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// p[j] = exp(s[j] - m) for j < n, m >= every s[j] (so every argument is <= 0): vectorized, the softmax's only
// transcendental (std::exp, scalar, was a third of a 7-row verify layer's attention at a 200-token prefix).
template <Isa I>
KANGAROO_BODY void exp_shifted_body(const float* s, int64_t n, float m, float* p) {
  constexpr int W = kVecWidth<I>;
  map_vec<W>(s, n, p, [m](typename VecOf<W>::f v)
                          __attribute__((always_inline)) { return exp_nonpositive_vec<W>(v - m); });
}
KANGAROO_ISA_DISPATCH(cpu_isa, void, exp_shifted, (const float* s, int64_t n, float m, float* p),
                      (s, n, m, p))

// s[j] = scale * dot(q, k[j * ldk, +Dh)) for j < n; returns the max. Four keys per pass (independent FMA chains),
// every dot the same fixed-order arithmetic (dot16), so a key's score does not depend on its neighbours.
// dot16: 16 lane sums over d in steps of 16, in 16 / W vectors of W floats (the ISA's width: a 64-byte vector under
// AVX2 lives on the stack), then the lanes' sum in hsum16's pairwise order: the same bits for W = 16, 8 and 4.
template <int W>
__attribute__((always_inline)) inline float dot16(const float* q, const float* k, int64_t Dh) {
  typedef typename VecOf<W>::f V;
  constexpr int NV = 16 / W;
  V c[NV];
  for (int v = 0; v < NV; ++v) c[v] = V{};
  int64_t d = 0;
  for (; d + 16 <= Dh; d += 16)
    for (int v = 0; v < NV; ++v) c[v] += load_vec<V>(q + d + v * W) * load_vec<V>(k + d + v * W);
  float s;
  if constexpr (W == 16) {
    s = hsum16(c[0]);
  } else if constexpr (W == 8) {  // lane i + lane i + 8, then + 4, + 2, + 1
    const v8f a = c[0] + c[1];
    const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    s = (b[0] + b[2]) + (b[1] + b[3]);
  } else {
    const v4f b = (c[0] + c[2]) + (c[1] + c[3]);
    s = (b[0] + b[2]) + (b[1] + b[3]);
  }
  for (; d < Dh; ++d) s += q[d] * k[d];
  return s;
}

template <Isa I>
KANGAROO_BODY float scores_f32_body(const float* q, const float* k, int64_t ldk, int64_t n, int64_t Dh, float scale,
                                    float* s) {
  constexpr int W = kVecWidth<I>;
  float m = -INFINITY;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* kj = k + j * ldk;
    const float s0 = dot16<W>(q, kj, Dh), s1 = dot16<W>(q, kj + ldk, Dh), s2 = dot16<W>(q, kj + 2 * ldk, Dh),
                s3 = dot16<W>(q, kj + 3 * ldk, Dh);
    s[j] = s0 * scale;
    s[j + 1] = s1 * scale;
    s[j + 2] = s2 * scale;
    s[j + 3] = s3 * scale;
    m = std::max(std::max(m, std::max(s[j], s[j + 1])), std::max(s[j + 2], s[j + 3]));
  }
  for (; j < n; ++j) {
    s[j] = dot16<W>(q, k + j * ldk, Dh) * scale;
    m = std::max(m, s[j]);
  }
  return m;
}
KANGAROO_ISA_DISPATCH(cpu_isa, float, scores_f32,
                        (const float* q, const float* k, int64_t ldk, int64_t n, int64_t Dh, float scale, float* s),
                        (q, k, ldk, n, Dh, scale, s))

// acc[0, NV W) += p[j] * v[j * ldv, +NV W) for j < n in j order, skipping p[j] == 0 (masked or underflowed: adding
// nothing either way). The NV accumulators stay in registers across the keys (through memory, each key waited on
// the previous key's stores).
template <int W, int NV>
__attribute__((always_inline)) inline void pv_regs(const float* p, const float* v, int64_t ldv, int64_t n,
                                                   float* acc) {
  typedef typename VecOf<W>::f V;
  V a[NV];
  for (int i = 0; i < NV; ++i) a[i] = load_vec<V>(acc + W * i);
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    if (pj == 0.f) continue;
    const float* vj = v + j * ldv;
    for (int i = 0; i < NV; ++i) a[i] += pj * load_vec<V>(vj + W * i);
  }
  for (int i = 0; i < NV; ++i) store_vec(acc + W * i, a[i]);
}

// pv_regs over [0, Dh) in passes of at most 8 vectors (what stays in registers; each lane's sum over j is the same
// whichever pass holds it), the tail past a multiple of W through memory.
template <Isa I>
KANGAROO_BODY void pv_f32_body(const float* p, const float* v, int64_t ldv, int64_t n, int64_t Dh, float* acc) {
  constexpr int W = kVecWidth<I>;
  int64_t d0 = 0;
  for (; d0 + W <= Dh;) {
    const int64_t nv = std::min<int64_t>(8, (Dh - d0) / W);
    switch (nv) {
      case 8: pv_regs<W, 8>(p, v + d0, ldv, n, acc + d0); break;
      case 7: pv_regs<W, 7>(p, v + d0, ldv, n, acc + d0); break;
      case 6: pv_regs<W, 6>(p, v + d0, ldv, n, acc + d0); break;
      case 5: pv_regs<W, 5>(p, v + d0, ldv, n, acc + d0); break;
      case 4: pv_regs<W, 4>(p, v + d0, ldv, n, acc + d0); break;
      case 3: pv_regs<W, 3>(p, v + d0, ldv, n, acc + d0); break;
      case 2: pv_regs<W, 2>(p, v + d0, ldv, n, acc + d0); break;
      default: pv_regs<W, 1>(p, v + d0, ldv, n, acc + d0); break;
    }
    d0 += nv * W;
  }
  if (d0 == Dh) return;
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    if (pj == 0.f) continue;
    const float* vj = v + j * ldv;
#pragma omp simd
    for (int64_t d = d0; d < Dh; ++d) acc[d] += pj * vj[d];
  }
}
KANGAROO_ISA_DISPATCH(cpu_isa, void, pv_f32,
                        (const float* p, const float* v, int64_t ldv, int64_t n, int64_t Dh, float* acc),
                        (p, v, ldv, n, Dh, acc))

// The Q = T * G query rows of one KV head (row r = t * G + g: block token t, query head g of the group; qs [Q, Dh],
// rotated) over the unit-stride cached prefix [0, lp) (rows ldk / ldv apart) and the T new keys kn / vn [T, Dh]
// visible to each token (causal, or its tree words, ldw apart); row r's output goes to out + t * ldo + g * Dh.
// The prefix is read in chunks of kChunk keys that stay in L1 while every row uses them, so it streams from memory
// once per KV head, not once per query row (at a 400-token prefix a verify block re-reading it per row cost 40 us
// a row and layer). Per row the arithmetic does not depend on Q: the scores sit at their sequence positions
// (prefix, then the new keys), the max is exact, and the exp sum and every value sum run in that order, so a row's
// output is the same bits whatever rows share its pass and whether the keys before it are cached or new in the
// same block (a verify block reproduces the plain steps). Scratch: sc, pr [Q, lp + T], acc [Q, Dh], mx [Q].
constexpr int64_t kChunk = 32;

void attend_rows_f32(const float* qs, int64_t T, int64_t G, const float* kc, int64_t ldk, const float* vc,
                     int64_t ldv, int64_t lp, const float* kn, const float* vn, const int32_t* words, int64_t ldw,
                     float scale, int64_t Dh, float* sc, float* pr, float* acc, float* mx, float* out, int64_t ldo) {
  const int64_t Q = T * G, W = lp + T;
  std::fill(mx, mx + Q, -INFINITY);
  for (int64_t j0 = 0; j0 < lp; j0 += kChunk) {
    const int64_t n = std::min(kChunk, lp - j0);
    for (int64_t r = 0; r < Q; ++r)
      mx[r] = std::max(mx[r], scores_f32(qs + r * Dh, kc + j0 * ldk, ldk, n, Dh, scale, sc + r * W + j0));
  }
  for (int64_t r = 0; r < Q; ++r) {
    const int64_t t = r / G;
    const int32_t* wt = words ? words + t * ldw : nullptr;
    float* s = sc + r * W + lp;
    for (int64_t j = 0; j < T; ++j) {
      const bool vis = wt ? ((static_cast<uint32_t>(wt[j / 32]) >> (j % 32)) & 1u) != 0 : j <= t;
      s[j] = vis ? scores_f32(qs + r * Dh, kn + j * Dh, Dh, 1, Dh, scale, s + j) : -INFINITY;
      mx[r] = std::max(mx[r], s[j]);
    }
    if (mx[r] != -INFINITY) exp_shifted(sc + r * W, W, mx[r], pr + r * W);  // 0 where masked (-inf)
    std::fill(acc + r * Dh, acc + (r + 1) * Dh, 0.f);
  }
  for (int64_t j0 = 0; j0 < lp; j0 += kChunk) {
    const int64_t n = std::min(kChunk, lp - j0);
    for (int64_t r = 0; r < Q; ++r)
      if (mx[r] != -INFINITY) pv_f32(pr + r * W + j0, vc + j0 * ldv, ldv, n, Dh, acc + r * Dh);
  }
  for (int64_t r = 0; r < Q; ++r) {
    float* o = out + (r / G) * ldo + (r % G) * Dh;
    if (mx[r] == -INFINITY) {  // sees no key: attends to nothing
      std::fill(o, o + Dh, 0.f);
      continue;
    }
    const float* p = pr + r * W;
    float l = 0.f;
    for (int64_t j = 0; j < W; ++j) l += p[j];
    pv_f32(p + lp, vn, Dh, T, Dh, acc + r * Dh);
    const float inv = 1.f / l;
    for (int64_t d = 0; d < Dh; ++d) o[d] = acc[r * Dh + d] * inv;
  }
}

template <typename T>
void attend_bh(const Args& a, int64_t b, int64_t kh) {
  const int64_t NT = a.T, Dh = a.Dh, G = a.G, S = a.S;
  const T* q = static_cast<const T*>(a.q);
  const T* kn = static_cast<const T*>(a.kn);
  const T* vn = static_cast<const T*>(a.vn);
  T* kc = static_cast<T*>(a.kc) + b * a.s_kcb + kh * a.s_kch;
  T* vc = static_cast<T*>(a.vc) + b * a.s_vcb + kh * a.s_vch;
  T* out = static_cast<T*>(a.out);  // contiguous [B, T, Hq, Dh]
  const bool act = a.active == nullptr || static_cast<const bool*>(a.active)[b];
  if (!act) {
    for (int64_t t = 0; t < NT; ++t) {
      T* o = out + ((b * NT + t) * a.Hq + kh * G) * Dh;
      std::fill(o, o + G * Dh, static_cast<T>(0.0f));
    }
    return;
  }
  const int64_t L = read_index(a.lens, a.lens64, b);
  const int64_t lp = std::min(std::max<int64_t>(L, 0), S);
  // scratch: rotated new keys [T, Dh], new values [T, Dh], the queries [Q, Dh] and their outputs [Q, Dh], one cache
  // row converted to fp32 [Dh] (16-bit or strided caches), the rows' maxima [Q], scores and exps [Q, lp + T] each
  const bool kc_unit = a.s_kcd == 1, vc_unit = a.s_vcd == 1;
  const bool rows_f32 = std::is_same<T, float>::value && kc_unit && vc_unit;  // attend_rows_f32
  const int64_t Q = rows_f32 ? NT * G : 1;  // query rows sharing one pass (scratch for their scores and sums)
  float* knr = scratch(static_cast<size_t>(2 * NT * Dh + 2 * Dh + Q * (2 * Dh + 1 + 2 * (lp + NT))));
  float* vnr = knr + NT * Dh;
  float* qr = vnr + NT * Dh;   // [Q, Dh]
  float* acc = qr + Q * Dh;    // [Q, Dh]
  float* tmp = acc + Q * Dh;   // [Dh]
  float* mx = tmp + Dh;        // [Q]
  float* sc = mx + Q;          // [Q, lp + T]
  float* pr = sc + Q * (lp + NT);
  const float* cs = static_cast<const float*>(a.cs);
  auto cs_row = [&](int64_t t) {
    const int64_t p = a.pos ? read_index(a.pos, a.pos64, b * a.s_pb + t * a.s_pt) : L + t;
    return cs + std::min(std::max<int64_t>(p, 0), a.max_pos - 1) * a.s_cs;
  };
  for (int64_t t = 0; t < NT; ++t) {
    load_row(kn + b * a.s_knb + t * a.s_knt + kh * a.s_knh, a.s_knd, Dh, knr + t * Dh);
    if (cs) rope_row<T>(knr + t * Dh, cs_row(t), Dh);
    load_row(vn + b * a.s_vnb + t * a.s_vnt + kh * a.s_vnh, a.s_vnd, Dh, vnr + t * Dh);
  }
  if constexpr (std::is_same<T, float>::value) {
    if (rows_f32) {
      for (int64_t t = 0; t < NT; ++t)
        for (int64_t g = 0; g < G; ++g) {
          float* qt = qr + (t * G + g) * Dh;
          load_row(q + b * a.s_qb + t * a.s_qt + (kh * G + g) * a.s_qh, a.s_qd, Dh, qt);
          if (cs) rope_row<T>(qt, cs_row(t), Dh);
        }
      const int32_t* words = a.tree ? static_cast<const int32_t*>(a.tree) + b * a.s_tmb : nullptr;
      attend_rows_f32(qr, NT, G, kc, a.s_kcs, vc, a.s_vcs, lp, knr, vnr, words, a.s_tmt, a.scale, Dh, sc, pr, acc,
                      mx, out + (b * NT * a.Hq + kh * G) * Dh, a.Hq * Dh);
    }
  }
  for (int64_t t = 0; t < NT && !rows_f32; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kh * G + g;
      load_row(q + b * a.s_qb + t * a.s_qt + h * a.s_qh, a.s_qd, Dh, qr);
      if (cs) rope_row<T>(qr, cs_row(t), Dh);
      const int32_t* words = a.tree ? static_cast<const int32_t*>(a.tree) + b * a.s_tmb + t * a.s_tmt : nullptr;
      float m = -INFINITY;
      for (int64_t j = 0; j < lp; ++j) {
        const T* kr = kc + j * a.s_kcs;
        float s;
        if constexpr (std::is_same<T, float>::value) {
          if (kc_unit) {
            s = dot_f32(qr, kr, Dh);
          } else {
            load_row(kr, a.s_kcd, Dh, tmp);
            s = dot_f32(qr, tmp, Dh);
          }
        } else {
          load_row(kr, a.s_kcd, Dh, tmp);
          s = dot_f32(qr, tmp, Dh);
        }
        s *= a.scale;
        sc[j] = s;
        m = std::max(m, s);
      }
      for (int64_t j = 0; j < NT; ++j) {
        const bool vis = words ? ((static_cast<uint32_t>(words[j / 32]) >> (j % 32)) & 1u) != 0 : j <= t;
        if (!vis) {
          sc[lp + j] = -INFINITY;
          continue;
        }
        const float s = dot_f32(qr, knr + j * Dh, Dh) * a.scale;
        sc[lp + j] = s;
        m = std::max(m, s);
      }
      T* o = out + ((b * NT + t) * a.Hq + h) * Dh;
      if (m == -INFINITY) {  // sees no key: attends to nothing
        std::fill(o, o + Dh, static_cast<T>(0.0f));
        continue;
      }
      std::fill(acc, acc + Dh, 0.0f);
      float l = 0.0f;
      exp_shifted(sc, lp + NT, m, pr);  // 0 where masked (-inf)
      for (int64_t j = 0; j < lp + NT; ++j) {
        if (sc[j] == -INFINITY) continue;
        const float p = pr[j];
        l += p;
        const float* vr;
        if (j >= lp) {
          vr = vnr + (j - lp) * Dh;
        } else if (std::is_same<T, float>::value && vc_unit) {
          vr = reinterpret_cast<const float*>(vc + j * a.s_vcs);
        } else {
          load_row(vc + j * a.s_vcs, a.s_vcd, Dh, tmp);
          vr = tmp;
        }
        for (int64_t d = 0; d < Dh; ++d) acc[d] += p * vr[d];
      }
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < Dh; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  }
  for (int64_t t = 0; t < NT; ++t) {  // append (after every read of this head's prefix)
    const int64_t dst = L + t;
    if (dst < 0 || dst >= S) continue;
    T* kd = kc + dst * a.s_kcs;
    T* vd = vc + dst * a.s_vcs;
    for (int64_t d = 0; d < Dh; ++d) {
      kd[d * a.s_kcd] = static_cast<T>(knr[t * Dh + d]);
      vd[d * a.s_vcd] = static_cast<T>(vnr[t * Dh + d]);
    }
  }
}

void check_same(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
}

}  // namespace

void append_attention_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                          const std::optional<at::Tensor>& tree_mask, const std::optional<at::Tensor>& active,
                          const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& rope_cos_sin,
                          double sm_scale, int64_t num_splits, const at::Tensor& out) {
  (void)num_splits;  // one pass over the prefix on CPU
  // metadata guards (the Python wrapper gives precise messages; these keep direct torch.ops calls memory-safe)
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be [B, T, Hq, Dh]");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), Dh = q.size(3);
  TORCH_CHECK_VALUE(k_new.dim() == 4 && k_new.size(0) == B && k_new.size(1) == T && k_new.size(3) == Dh,
                    "k_new must be [B, T, Hk, Dh]");
  const int64_t Hk = k_new.size(2);
  TORCH_CHECK_VALUE(Hk >= 1 && Hq % Hk == 0, "k_new: Hk must divide Hq");
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), "v_new must be [B, T, Hk, Dh]");
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hk && k_cache.size(3) == Dh,
                    "k_cache must be [B, Hk, S, Dh]");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must be [B, Hk, S, Dh]");
  TORCH_CHECK_VALUE(cache_lens.dim() == 1 && cache_lens.size(0) == B && cache_lens.is_contiguous() &&
                        (cache_lens.scalar_type() == at::kInt || cache_lens.scalar_type() == at::kLong),
                    "cache_lens must be a contiguous [B] int32/int64 tensor");
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
                    "out must be a contiguous [B, T, Hq, Dh] tensor in q's dtype");
  for (auto* p : {&k_new, &v_new, &k_cache, &v_cache, &out}) check_same(*p, q, "k_new/v_new/caches/out");
  Args a{};
  const int64_t S = k_cache.size(2);
  if (tree_mask) {
    const auto& tm = *tree_mask;
    TORCH_CHECK_VALUE(tm.dim() == 3 && tm.size(0) == B && tm.size(1) == T && tm.size(2) == (T + 31) / 32 &&
                          tm.scalar_type() == at::kInt && tm.stride(2) == 1,
                      "tree_mask must be [B, T, ceil(T/32)] int32 with unit last stride");
    a.tree = tm.data_ptr();
    a.s_tmb = tm.stride(0);
    a.s_tmt = tm.stride(1);
  }
  if (active) {
    TORCH_CHECK_VALUE(active->dim() == 1 && active->size(0) == B && active->scalar_type() == at::kBool &&
                          active->is_contiguous(),
                      "active must be a contiguous [B] bool tensor");
    a.active = active->data_ptr();
  }
  if (rope_cos_sin) {
    const auto& cs = *rope_cos_sin;
    TORCH_CHECK_VALUE(cs.dim() == 2 && cs.size(1) == Dh && cs.size(0) >= 1 && cs.scalar_type() == at::kFloat &&
                          cs.stride(1) == 1,
                      "rope_cos_sin must be [max_pos, Dh] float32 with unit last stride");
    TORCH_CHECK_VALUE(Dh % 2 == 0, "q: fused RoPE (rotate-half) needs an even head dim, got Dh = ", Dh);
    a.cs = cs.data_ptr();
    a.s_cs = cs.stride(0);
    a.max_pos = cs.size(0);
    if (positions) {
      const auto& p = *positions;
      TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == B && p.size(1) == T &&
                            (p.scalar_type() == at::kInt || p.scalar_type() == at::kLong),
                        "positions must be [B, T] int32/int64");
      a.pos = p.data_ptr();
      a.pos64 = p.scalar_type() == at::kLong;
      a.s_pb = p.stride(0);
      a.s_pt = p.stride(1);
    }
  }
  if (B == 0 || T == 0) return;
  a.q = q.data_ptr();
  a.kn = k_new.data_ptr();
  a.vn = v_new.data_ptr();
  a.kc = k_cache.data_ptr();
  a.vc = v_cache.data_ptr();
  a.out = out.data_ptr();
  a.lens = cache_lens.data_ptr();
  a.lens64 = cache_lens.scalar_type() == at::kLong;
  a.B = B, a.T = T, a.Hq = Hq, a.Hk = Hk, a.G = Hq / Hk, a.Dh = Dh, a.S = S;
  a.s_qb = q.stride(0), a.s_qt = q.stride(1), a.s_qh = q.stride(2), a.s_qd = q.stride(3);
  a.s_knb = k_new.stride(0), a.s_knt = k_new.stride(1), a.s_knh = k_new.stride(2), a.s_knd = k_new.stride(3);
  a.s_vnb = v_new.stride(0), a.s_vnt = v_new.stride(1), a.s_vnh = v_new.stride(2), a.s_vnd = v_new.stride(3);
  a.s_kcb = k_cache.stride(0), a.s_kch = k_cache.stride(1), a.s_kcs = k_cache.stride(2), a.s_kcd = k_cache.stride(3);
  a.s_vcb = v_cache.stride(0), a.s_vch = v_cache.stride(1), a.s_vcs = v_cache.stride(2), a.s_vcd = v_cache.stride(3);
  a.scale = static_cast<float>(sm_scale);
  // small problems (decode of a small model) run inline: a thread-pool hand-off costs more than the work
  const int64_t work = (S + T) * T * (Hq / Hk) * Dh;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(work, 1));
  auto run = [&](auto tag) {
    using T_ = decltype(tag);
    at::parallel_for(0, B * Hk, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) attend_bh<T_>(a, i / Hk, i % Hk);
    });
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, "q must be float32/bfloat16/float16, got ", q.scalar_type());
  }
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("append_attention", &kangaroo::below_autograd<&kangaroo::append_attention_cpu>::call);
}
