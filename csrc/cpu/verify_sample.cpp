// CPU twin of verify_sample (same algorithm and bits as the CUDA kernel in
// csrc/include/kangaroo/verify_sample.cuh; it materialises per-node vectors instead of re-reading the row).
// Also defines the argument checks the CUDA wrapper shares.

// The sampling maths must round exactly like the kernel and the reference: no FMA contraction here
// (no-trapping-math only lets GCC vectorise the selects; it changes no value).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/checks.h"
#include "kangaroo/verify_sample.cuh"
#include "cpu/ops_cpu.h"

namespace kangaroo {

// Metadata checks shared by the CPU and CUDA implementations (defined once, here). Returns {B, N, V}.
std::array<int64_t, 3> verify_sample_check_args(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                                                const std::optional<at::Tensor>& draft_probs,
                                                const std::optional<at::Tensor>& parents,
                                                const std::optional<at::Tensor>& uniforms,
                                                const std::optional<at::Tensor>& seed,
                                                const std::optional<at::Tensor>& offset, double temperature,
                                                int64_t top_k, double top_p, const at::Tensor& accept_len,
                                                const at::Tensor& path, const at::Tensor& tokens,
                                                const std::optional<at::Tensor>& temperature_rows,
                                                const std::optional<at::Tensor>& top_k_rows,
                                                const std::optional<at::Tensor>& top_p_rows, bool probs) {
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2, "draft_tokens must have shape [B, N], got ", shape_str(draft_tokens));
  TORCH_CHECK_VALUE(draft_tokens.scalar_type() == at::kInt, "draft_tokens must be int32");
  TORCH_CHECK_VALUE(draft_tokens.is_contiguous(), "draft_tokens must be contiguous");
  const int64_t B = draft_tokens.size(0), N = draft_tokens.size(1);
  TORCH_CHECK_VALUE(B < (int64_t{1} << 31), "draft_tokens: B must be < 2^31, got ", B);
  const auto dev = draft_tokens.device();
  check_shape("target_logits", target_logits, {B, N + 1, -1}, "[B, N+1, V]");
  const int64_t V = target_logits.size(2);
  TORCH_CHECK_VALUE(V >= 1 && V < (int64_t{1} << 31), "target_logits: V must be in [1, 2^31), got ", V);
  TORCH_CHECK_VALUE(N + 1 < (int64_t{1} << 31), "draft_tokens: N is too large");
  const auto lt = target_logits.scalar_type();
  TORCH_CHECK_VALUE(lt == at::kFloat || lt == at::kBFloat16 || lt == at::kHalf,
                    "target_logits must be float32/bfloat16/float16, got ", lt);
  TORCH_CHECK_VALUE(V == 1 || target_logits.stride(2) == 1, "target_logits must be contiguous in its last dim");
  TORCH_CHECK_VALUE(target_logits.device() == dev, "target_logits must be on ", dev);
  if (draft_probs) {
    check_shape("draft_probs", *draft_probs, {B, N, V}, "[B, N, V]");
    TORCH_CHECK_VALUE(draft_probs->scalar_type() == at::kFloat, "draft_probs must be float32");
    TORCH_CHECK_VALUE(V == 1 || draft_probs->stride(2) == 1, "draft_probs must be contiguous in its last dim");
    TORCH_CHECK_VALUE(draft_probs->device() == dev, "draft_probs must be on ", dev);
  }
  if (parents) {
    check_shape("parents", *parents, {B, N}, "[B, N]");
    TORCH_CHECK_VALUE(parents->scalar_type() == at::kInt, "parents must be int32");
    TORCH_CHECK_VALUE(parents->is_contiguous(), "parents must be contiguous");
    TORCH_CHECK_VALUE(parents->device() == dev, "parents must be on ", dev);
  }
  if (uniforms) {
    check_shape("uniforms", *uniforms, {B, N + 1}, "[B, N+1]");
    TORCH_CHECK_VALUE(uniforms->scalar_type() == at::kFloat || uniforms->scalar_type() == at::kDouble,
                      "uniforms must be float32/float64");
    TORCH_CHECK_VALUE(uniforms->is_contiguous(), "uniforms must be contiguous");
    TORCH_CHECK_VALUE(uniforms->device() == dev, "uniforms must be on ", dev);
  } else {
    TORCH_CHECK_VALUE(seed.has_value() && offset.has_value(),
                      "verify_sample needs uniforms [B, N+1] or both seed [B] and offset [B]");
  }
  for (const auto* t : {&seed, &offset}) {
    if (!t->has_value()) continue;
    const char* name = t == &seed ? "seed" : "offset";
    check_shape(name, **t, {B}, "[B]");
    TORCH_CHECK_VALUE((*t)->scalar_type() == at::kLong, name, " must be int64");
    TORCH_CHECK_VALUE((*t)->is_contiguous(), name, " must be contiguous");
    TORCH_CHECK_VALUE((*t)->device() == dev, name, " must be on ", dev);
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0 && static_cast<float>(temperature) > 0.0f,
                    "temperature must be > 0 (use verify_greedy for T = 0), got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0 (0: off), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", top_p);
  const std::pair<const char*, const std::optional<at::Tensor>*> rows[] = {
      {"temperature", &temperature_rows}, {"top_k", &top_k_rows}, {"top_p", &top_p_rows}};
  for (const auto& r : rows) {
    if (!r.second->has_value()) continue;
    const at::Tensor& t = **r.second;
    check_shape(r.first, t, {B}, "[B]");
    TORCH_CHECK_VALUE(t.scalar_type() == (r.second == &top_k_rows ? at::kInt : at::kFloat), r.first,
                      " per-row values must be ", r.second == &top_k_rows ? "int32" : "float32");
    TORCH_CHECK_VALUE(t.is_contiguous(), r.first, " per-row values must be contiguous");
    TORCH_CHECK_VALUE(t.device() == dev, r.first, " per-row values must be on ", dev);
  }
  const std::pair<const char*, const at::Tensor*> outs[] = {{"accept_len", &accept_len}, {"path", &path},
                                                            {"tokens", &tokens}};
  for (const auto& o : outs) {
    const at::Tensor& t = *o.second;
    if (o.second == &accept_len) {
      check_shape(o.first, t, {B}, "[B]");
    } else {
      check_shape(o.first, t, {B, N + 1}, "[B, N+1]");
    }
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, o.first, " must be int32");
    TORCH_CHECK_VALUE(t.is_contiguous(), o.first, " must be contiguous");
    TORCH_CHECK_VALUE(t.device() == dev, o.first, " must be on ", dev);
  }
  return {B, N, V};
}

// The kernel parameters both devices fill the same way (after the shared checks); the CUDA wrapper adds its
// workspace. Defined once, here.
VerifySampleParams verify_sample_params(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                                        const std::optional<at::Tensor>& draft_probs,
                                        const std::optional<at::Tensor>& parents,
                                        const std::optional<at::Tensor>& uniforms,
                                        const std::optional<at::Tensor>& seed,
                                        const std::optional<at::Tensor>& offset, double temperature, int64_t top_k,
                                        double top_p, at::Tensor& accept_len, at::Tensor& path, at::Tensor& tokens,
                                        const std::optional<at::Tensor>& temperature_rows,
                                        const std::optional<at::Tensor>& top_k_rows,
                                        const std::optional<at::Tensor>& top_p_rows, bool probs) {
  const auto [B, N, V] = verify_sample_check_args(draft_tokens, target_logits, draft_probs, parents, uniforms, seed,
                                                  offset, temperature, top_k, top_p, accept_len, path, tokens,
                                                  temperature_rows, top_k_rows, top_p_rows, probs);
  VerifySampleParams p;
  p.draft_tokens = draft_tokens.data_ptr<int32_t>();
  p.logits = target_logits.data_ptr();
  p.logits_stride_b = target_logits.stride(0);
  p.logits_stride_n = target_logits.stride(1);
  if (draft_probs) {
    p.draft_probs = draft_probs->data_ptr<float>();
    p.q_stride_b = draft_probs->stride(0);
    p.q_stride_n = draft_probs->stride(1);
  }
  if (parents) p.parents = parents->data_ptr<int32_t>();
  if (uniforms) {
    if (uniforms->scalar_type() == at::kFloat) {
      p.uniforms_f32 = uniforms->data_ptr<float>();
    } else {
      p.uniforms_f64 = uniforms->data_ptr<double>();
    }
  } else {
    p.seed = seed->data_ptr<int64_t>();
    p.offset = offset->data_ptr<int64_t>();
  }
  p.inv_t = 1.0f / static_cast<float>(temperature);
  p.top_k = static_cast<int>(std::min<int64_t>(top_k, V));
  p.top_p = top_p;
  if (temperature_rows) p.temperature_rows = temperature_rows->data_ptr<float>();
  if (top_k_rows) p.top_k_rows = top_k_rows->data_ptr<int32_t>();
  if (top_p_rows) p.top_p_rows = top_p_rows->data_ptr<float>();
  p.probs = probs;
  p.B = static_cast<int>(B);
  p.N = static_cast<int>(N);
  p.V = static_cast<int>(V);
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.path = path.data_ptr<int32_t>();
  p.tokens = tokens.data_ptr<int32_t>();
  return p;
}

namespace {

using namespace kangaroo::vsample;

// Per-thread buffers reused across the rows a thread handles.
struct RowBuffers {
  std::vector<float> z, e;
  std::vector<uint32_t> key;
  std::vector<uint32_t> tmp;
  std::vector<std::pair<uint32_t, double>> cand;
  std::vector<double> r0, r;
};

// The largest key t with sum_{key >= t} mass >= target among cand (weighted quickselect, expected O(n)).
// Returns false when rounding puts the target out of reach.
bool mass_select(std::vector<std::pair<uint32_t, double>>& cand, double target, uint32_t* out) {
  size_t lo = 0, hi = cand.size();
  double above = 0.0;
  while (hi - lo > 32) {
    const uint32_t pivot = cand[lo + (hi - lo) / 2].first;
    auto first = cand.begin() + lo, last = cand.begin() + hi;
    auto mid1 = std::partition(first, last, [pivot](const auto& a) { return a.first > pivot; });
    auto mid2 = std::partition(mid1, last, [pivot](const auto& a) { return a.first == pivot; });
    double gt = 0.0, eq = 0.0;
    for (auto it = first; it != mid1; ++it) gt += it->second;
    for (auto it = mid1; it != mid2; ++it) eq += it->second;
    if (above + gt >= target) {
      hi = lo + (mid1 - first);
    } else if (above + gt + eq >= target) {
      *out = pivot;
      return true;
    } else {
      above += gt + eq;
      lo = lo + (mid2 - first);
    }
  }
  std::sort(cand.begin() + lo, cand.begin() + hi, [](const auto& a, const auto& b) { return a.first > b.first; });
  double cum = above;
  for (size_t i = lo; i < hi; ++i) {
    cum += cand[i].second;
    if (cum >= target) {
      *out = cand[i].first;
      return true;
    }
  }
  return false;
}

// Fills buf.r0 with the node's filtered target (unnormalised) and returns its mass S; false for an
// invalid row (NaN, +inf, no finite value; with probs also a negative entry or no positive one).
template <typename T>
bool node_target(const T* row, int64_t V, const RowSampling& rs, bool probs, RowBuffers& buf, double* S) {
  float* __restrict z = buf.z.data();
  const float inv_t = rs.greedy ? 1.0f : rs.inv_t;
  float m = -INFINITY;
  bool bad = false;
  for (int64_t i = 0; i < V; ++i) {
    z[i] = node_value(static_cast<float>(row[i]), inv_t, probs);
    bad |= std::isnan(z[i]) || z[i] == INFINITY || (probs && z[i] < 0.0f);
    m = std::max(m, z[i]);
  }
  if (bad || !(probs ? m > 0.0f : m > -INFINITY)) return false;
  double* __restrict r0 = buf.r0.data();
  if (rs.greedy) {  // one-hot at the first argmax
    int64_t a = 0;
    while (!(z[a] == m)) ++a;
    std::fill(r0, r0 + V, 0.0);
    r0[a] = 1.0;
    *S = 1.0;
    return true;
  }
  float* __restrict e = buf.e.data();
  for (int64_t i = 0; i < V; ++i) e[i] = node_weight(z[i], m, probs);
  const int64_t top_k = rs.top_k;
  const double top_p = rs.top_p;
  double s = 0.0;
  if (!(top_k > 0 && top_k < V) && !(top_p < 1.0)) {
    for (int64_t i = 0; i < V; ++i) {
      r0[i] = static_cast<double>(e[i]);
      s += r0[i];
    }
    *S = s;
    return true;
  }
  uint32_t* __restrict key = buf.key.data();
  for (int64_t i = 0; i < V; ++i) key[i] = logit_key(z[i]);
  uint32_t tau = 0u;
  if (top_k > 0 && top_k < V) {
    buf.tmp.assign(key, key + V);
    std::nth_element(buf.tmp.begin(), buf.tmp.begin() + (top_k - 1), buf.tmp.end(), std::greater<uint32_t>());
    tau = buf.tmp[top_k - 1];
  }
  for (int64_t i = 0; i < V; ++i) {
    r0[i] = key[i] >= tau ? static_cast<double>(e[i]) : 0.0;
    s += r0[i];
  }
  if (top_p < 1.0) {
    buf.cand.clear();
    for (int64_t i = 0; i < V; ++i) {
      if (r0[i] > 0.0) buf.cand.emplace_back(key[i], r0[i]);
    }
    uint32_t t;
    if (mass_select(buf.cand, top_p * s, &t) && t > tau) {
      s = 0.0;
      for (int64_t i = 0; i < V; ++i) {
        if (key[i] < t) r0[i] = 0.0;
        s += r0[i];
      }
    }
  }
  *S = s;
  return true;
}

template <typename T>
void sample_row(const VerifySampleParams& p, int64_t b, RowBuffers& buf) {
  const int64_t N = p.N, V = p.V;
  int32_t* path = p.path + b * (N + 1);
  int32_t* tokens = p.tokens + b * (N + 1);
  std::fill(path, path + N + 1, -1);
  std::fill(tokens, tokens + N + 1, -1);
  const int32_t* d = p.draft_tokens + b * N;
  const int32_t* par = p.parents == nullptr ? nullptr : p.parents + b * N;
  const bool philox = p.uniforms_f32 == nullptr && p.uniforms_f64 == nullptr;
  const int64_t seed = philox ? p.seed[b] : 0, offset = philox ? p.offset[b] : 0;
  auto uniform = [&](int64_t j) -> double {
    if (p.uniforms_f32 != nullptr) return static_cast<double>(p.uniforms_f32[b * (N + 1) + j]);
    if (p.uniforms_f64 != nullptr) return p.uniforms_f64[b * (N + 1) + j];
    return philox_uniform(seed, offset + j);
  };
  auto valid = [&](int64_t c) { return d[c] >= 0 && d[c] < V; };
  auto next_child = [&](int64_t v, int64_t after) -> int64_t {
    if (par == nullptr) return (after == v && v + 1 < N && valid(v + 1)) ? v + 1 : -1;
    for (int64_t c = after + 1; c < N; ++c) {
      if (par[c] == v && valid(c)) return c;
    }
    return -1;
  };
  const T* logits = static_cast<const T*>(p.logits) + b * p.logits_stride_b;
  const RowSampling rs = row_sampling(p, b);

  int64_t v = -1, accepted = 0;
  while (true) {
    double S;
    if (!node_target(logits + (v + 1) * p.logits_stride_n, V, rs, p.probs, buf, &S)) break;
    const double* r = buf.r0.data();
    double n = S;
    int64_t acc_child = -1;
    for (int64_t c = next_child(v, v); c >= 0; c = next_child(v, c)) {
      const int32_t x = d[c];
      const float* q = p.draft_probs == nullptr ? nullptr : p.draft_probs + b * p.q_stride_b + c * p.q_stride_n;
      const double qx = q == nullptr ? 1.0 : static_cast<double>(q[x]);
      if (accept_draft(uniform(c), qx, r[x], n)) {
        acc_child = c;
        break;
      }
      double n_new = 0.0;
      for (int64_t i = 0; i < V; ++i) {
        const double qi = q == nullptr ? (i == x ? 1.0 : 0.0) : static_cast<double>(q[i]);
        const double nv = residual_step(r[i], n, qi);
        buf.r[i] = nv;
        n_new += nv;
      }
      if (!(n_new > 0.0)) {  // nothing left (e.g. p == q): fall back to the filtered target
        r = buf.r0.data();
        n = S;
        break;
      }
      r = buf.r.data();
      n = n_new;
    }
    if (acc_child >= 0) {
      path[accepted] = static_cast<int32_t>(acc_child);
      tokens[accepted] = d[acc_child];
      ++accepted;
      v = acc_child;
      continue;
    }
    const double target = uniform(N) * n;
    double cum = 0.0;
    int64_t tok = -1, last_pos = -1;
    for (int64_t i = 0; i < V; ++i) {
      if (!(r[i] > 0.0)) continue;
      cum += r[i];
      last_pos = i;
      if (cum > target) {
        tok = i;
        break;
      }
    }
    tokens[accepted] = static_cast<int32_t>(tok >= 0 ? tok : last_pos);
    break;
  }
  p.accept_len[b] = static_cast<int32_t>(accepted);
  if (philox) p.offset[b] = offset + (N + 1);
}

void verify_sample_cpu(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                       const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& parents,
                       const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& seed,
                       const std::optional<at::Tensor>& offset, double temperature, int64_t top_k, double top_p,
                       at::Tensor& accept_len, at::Tensor& path, at::Tensor& tokens,
                       const std::optional<at::Tensor>& temperature_rows, const std::optional<at::Tensor>& top_k_rows,
                       const std::optional<at::Tensor>& top_p_rows, bool probs) {
  const VerifySampleParams p = verify_sample_params(draft_tokens, target_logits, draft_probs, parents, uniforms,
                                                     seed, offset, temperature, top_k, top_p, accept_len, path,
                                                     tokens, temperature_rows, top_k_rows, top_p_rows, probs);
  const int64_t B = p.B, V = p.V;
  const auto dtype = target_logits.scalar_type();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    RowBuffers buf;
    buf.z.resize(V);
    buf.e.resize(V);
    buf.key.resize(V);
    buf.r0.resize(V);
    buf.r.resize(V);
    for (int64_t b = begin; b < end; ++b) {
      switch (dtype) {
        case at::kBFloat16:
          sample_row<c10::BFloat16>(p, b, buf);
          break;
        case at::kHalf:
          sample_row<c10::Half>(p, b, buf);
          break;
        default:
          sample_row<float>(p, b, buf);
      }
    }
  });
}

}  // namespace

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("verify_sample", &kangaroo::below_autograd<&kangaroo::verify_sample_cpu>::call);
}
