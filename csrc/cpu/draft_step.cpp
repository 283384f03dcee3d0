// CPU implementation of kangaroo_kernels::draft_step: one step of the CPU decoder's chain draft loop
// (kangaroo/draft.py, K = 1, an int8 draft head) in one dispatcher crossing.
//
// Why: on a small model the loop's ~25 Python-level tensor calls a step (the embedding, slicing the state buffers,
// the bookkeeping wheres) cost ~100 us, about as much as the step's layer, adapter and head kernels together. The
// step calls the same CPU kernels the unfused loop reaches through the dispatcher (llama_layer, adapter_forward,
// lm_head_exit_int8) on the same tensors, so it gives the same bits; only the glue moves into C++.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu/checks.h"
#include "cpu/ops_cpu.h"

namespace kangaroo {

namespace {

const at::Tensor& req(const std::optional<at::Tensor>& t, const char* what) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), "draft_step: ", what, " is missing");
  return *t;
}

}  // namespace

bool draft_step_cpu(const c10::List<std::optional<at::Tensor>>& layers, const at::Tensor& embed,
                    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rope_cos_sin, double eps,
                    int64_t num_heads, int64_t num_kv_heads, const c10::List<std::optional<at::Tensor>>& adapter,
                    const at::Tensor& adapter_k, const at::Tensor& adapter_v, double rope_theta, double adapter_eps,
                    const at::Tensor& head_q, const at::Tensor& head_scale,
                    const std::optional<at::Tensor>& head_norm, double threshold, const at::Tensor& cur,
                    const at::Tensor& pos, const at::Tensor& proc, const at::Tensor& drafting, bool draft,
                    const at::Tensor& hidden, const at::Tensor& draft_token, const at::Tensor& n_chain) {
  TORCH_CHECK_VALUE(layers.size() % 7 == 0 && layers.size() > 0,
                    "draft_step: layers must hold 7 tensors per shallow layer (ln1, wqkv, bqkv or None, wo, ln2, "
                    "wgu, wd), got ", layers.size());
  TORCH_CHECK_VALUE(adapter.size() == 9,
                    "draft_step: adapter must hold norm_in, wq, wk, wv, bq, bk, bv (or None), wo, norm_out, got ",
                    adapter.size(), " tensors");
  const int64_t B = cur.size(0), ell = static_cast<int64_t>(layers.size()) / 7, D = embed.size(1);
  const c10::Device cpu(c10::kCPU);
  check_i32("draft_step: cur", cur, {B}, "[B]", cpu);
  check_i32("draft_step: pos", pos, {B}, "[B]", cpu);
  check_typed("draft_step: proc", proc, {B}, "[B]", at::kBool, "bool", cpu);
  check_typed("draft_step: drafting", drafting, {B}, "[B]", at::kBool, "bool", cpu);
  check_i32("draft_step: n_chain", n_chain, {B}, "[B]", cpu);
  TORCH_CHECK_VALUE(draft_token.dim() == 1 && draft_token.size(0) == B && draft_token.scalar_type() == at::kInt,
                    "draft_step: draft_token must be [B=", B, "] int32");
  TORCH_CHECK_VALUE(hidden.dim() == 2 && hidden.size(0) == B && hidden.size(1) == D, "draft_step: hidden must be [B=",
                    B, ", D=", D, "], got ", shape_str(hidden));

  // layers 0..l-1 on the current tokens (the model's embedding rows, as F.embedding gives them)
  at::Tensor x = at::index_select(embed, 0, cur).unsqueeze(1);
  const at::Tensor positions = pos.unsqueeze(1);
  for (int64_t l = 0; l < ell; ++l) {
    auto w = [&](int64_t j) { return layers.get(7 * l + j); };
    x = llama_layer_cpu(x, req(w(0), "ln1"), req(w(1), "wqkv"), w(2), req(w(3), "wo"), req(w(4), "ln2"),
                        req(w(5), "wgu"), req(w(6), "wd"), k_cache, v_cache, l, pos, positions, std::nullopt, proc,
                        rope_cos_sin, eps, num_heads, num_kv_heads);
  }
  const at::Tensor h = x.select(1, 0);
  hidden.copy_(h);

  const bool* dr = drafting.data_ptr<bool>();
  bool any = false;
  for (int64_t b = 0; b < B; ++b) any = any || dr[b];
  if (!draft) return any;
  bool* pr = proc.data_ptr<bool>();
  if (!any) {  // what the predicated loop leaves: no row runs the next step
    for (int64_t b = 0; b < B; ++b) pr[b] = false;
    return false;
  }
  auto a = [&](int64_t j) { return adapter.get(j); };
  const at::Tensor r = at::empty({B, D}, h.options());
  adapter_forward_cpu(h.contiguous(), req(a(0), "norm_in"), req(a(1), "wq"), req(a(2), "wk"), req(a(3), "wv"), a(4),
                      a(5), a(6), req(a(7), "wo"), req(a(8), "norm_out"), adapter_k, adapter_v, pos, pos, drafting,
                      rope_cos_sin, rope_theta, adapter_eps, false, r);
  const auto i32 = cur.options(), f32 = cur.options().dtype(at::kFloat);
  const at::Tensor token = at::empty({B}, i32), conf = at::empty({B}, f32), prob = at::empty({B}, f32);
  const at::Tensor keep = at::empty({B}, proc.options());
  lm_head_exit_int8_cpu(r, head_q, head_scale, head_norm, drafting, threshold, adapter_eps, token, conf, keep, prob);

  const int32_t* tk = token.data_ptr<int32_t>();
  const bool* kp = keep.data_ptr<bool>();
  int32_t* dt = draft_token.data_ptr<int32_t>();
  const int64_t sd = draft_token.stride(0);
  int32_t* cu = cur.data_ptr<int32_t>();
  int32_t* nc = n_chain.data_ptr<int32_t>();
  bool* dw = drafting.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    const bool d = dr[b];
    dt[b * sd] = d ? tk[b] : -1;
    nc[b] += d ? 1 : 0;
    if (d) cu[b] = tk[b];
    pr[b] = d;      // proc <- drafting (dr aliases dw: read before the write below)
    dw[b] = kp[b];  // drafting <- keep (keep is false where the row was not drafting)
  }
  return true;
}

// kangaroo_kernels::draft_chain: kangaroo.draft.draft for the CPU chain in one crossing: with catch_up a one-node
// adapter catch-up (a wider one, with lookup, returns -1 at once: Python runs it and calls again without), the
// cycle's buffer resets and the draft loop of draft_step calls over the rows alive and not in hit (lookup_first's
// matched rows). Why: between the weight streams of a cycle every small tensor call from Python runs cold (a
// 256-wide RMSNorm's 7 torch calls took 250 us inside a cycle against 45 us alone), and the draft side made ~25 of
// them a cycle around its steps.
// Returns the shallow passes run: 0 (no row drafts) .. n_steps + 1 (all; the loop's last pass is shallow-only),
// or -1 (nothing done) for a catch-up wider than one node.
int64_t draft_chain_cpu(const c10::List<std::optional<at::Tensor>>& layers, const at::Tensor& embed,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rope_cos_sin,
                        double eps, int64_t num_heads, int64_t num_kv_heads,
                        const c10::List<std::optional<at::Tensor>>& adapter, const at::Tensor& adapter_k,
                        const at::Tensor& adapter_v, double rope_theta, double adapter_eps, const at::Tensor& head_q,
                        const at::Tensor& head_scale, const std::optional<at::Tensor>& head_norm, double threshold,
                        const at::Tensor& tok, const at::Tensor& L0, const at::Tensor& alive,
                        const at::Tensor& need_catch, const at::Tensor& catch_n, const at::Tensor& catch_h,
                        const at::Tensor& cur, const at::Tensor& hidden, const at::Tensor& drafts,
                        const at::Tensor& n_chain, const std::optional<at::Tensor>& hit, bool catch_up,
                        int64_t n_steps, bool host_exit) {
  TORCH_CHECK_VALUE(adapter.size() == 9, "draft_chain: adapter must hold 9 tensors, got ", adapter.size());
  const int64_t B = tok.size(0);
  const c10::Device cpu(c10::kCPU);
  check_i32("draft_chain: tok", tok, {B}, "[B]", cpu);
  check_i32("draft_chain: L0", L0, {B}, "[B]", cpu);
  check_i32("draft_chain: catch_n", catch_n, {B}, "[B]", cpu);
  check_typed("draft_chain: alive", alive, {B}, "[B]", at::kBool, "bool", cpu);
  check_typed("draft_chain: need_catch", need_catch, {B}, "[B]", at::kBool, "bool", cpu);
  TORCH_CHECK_VALUE(hidden.dim() == 3 && hidden.size(0) == B && drafts.dim() == 2 && drafts.size(0) == B,
                    "draft_chain: hidden must be [B, N, D] and drafts [B, W], got ", shape_str(hidden), " and ",
                    shape_str(drafts));
  TORCH_CHECK_VALUE(n_steps >= 1 && n_steps < hidden.size(1) && n_steps <= drafts.size(1),
                    "draft_chain: n_steps = ", n_steps, " must be in [1, ", std::min(hidden.size(1) - 1,
                    drafts.size(1)), "] for hidden ", shape_str(hidden), " and drafts ", shape_str(drafts));
  TORCH_CHECK_VALUE(catch_h.dim() == 3 && catch_h.size(0) == B && catch_h.size(2) == hidden.size(2) &&
                        (!catch_up || catch_h.size(1) == 1 || host_exit),
                    "draft_chain: catch_h must be [B, W, D] (W = 1 with catch_up on the predicated path), got ",
                    shape_str(catch_h));
  if (hit) check_typed("draft_chain: hit", *hit, {B}, "[B]", at::kBool, "bool", cpu);
  auto any = [](const at::Tensor& t) {
    const bool* p = t.data_ptr<bool>();
    for (int64_t b = 0; b < t.numel(); ++b)
      if (p[b]) return true;
    return false;
  };
  // the catch-up (kangaroo.draft.catch_up with one node): the adapter K/V of the last accepted node at L0 - catch_n
  const at::Tensor rows = need_catch.logical_and(alive);
  if (catch_up && catch_h.size(1) > 1) {  // host_exit: as wide as this cycle's longest catch-up; one node here
    const bool* rw = rows.data_ptr<bool>();
    const int32_t* cn = catch_n.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      if (rw[b] && cn[b] > 1) return -1;
  }
  if (catch_up && (!host_exit || any(rows))) {
    auto a = [&](int64_t j) { return adapter.get(j); };
    const at::Tensor start = (L0 - catch_n).clamp_min(0);
    const at::Tensor r = at::empty({B, catch_h.size(2)}, catch_h.options());
    adapter_forward_cpu(catch_h.select(1, 0).contiguous(), req(a(0), "norm_in"), req(a(1), "wq"), req(a(2), "wk"),
                        req(a(3), "wv"), a(4), a(5), a(6), req(a(7), "wo"), req(a(8), "norm_out"), adapter_k,
                        adapter_v, start, start, rows, rope_cos_sin, rope_theta, adapter_eps, false, r);
    need_catch.logical_and_(alive.logical_not());
  }
  cur.copy_(tok);
  n_chain.zero_();
  drafts.fill_(-1);
  const at::Tensor proc = hit ? alive.logical_and(hit->logical_not()) : alive.clone(), drafting = proc.clone();
  if (host_exit && !any(proc)) return 0;
  for (int64_t i = 0; i <= n_steps; ++i) {
    const bool more = draft_step_cpu(layers, embed, k_cache, v_cache, rope_cos_sin, eps, num_heads, num_kv_heads,
                                     adapter, adapter_k, adapter_v, rope_theta, adapter_eps, head_q, head_scale,
                                     head_norm, threshold, cur, L0 + i, proc, drafting, i < n_steps,
                                     hidden.select(1, i), drafts.select(1, std::min(i, n_steps - 1)), n_chain);
    if (i == n_steps || (host_exit && !more)) return i + 1;
  }
  return n_steps + 1;
}

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("draft_step", &kangaroo::below_autograd<&kangaroo::draft_step_cpu>::call);
  m.impl("draft_chain", &kangaroo::below_autograd<&kangaroo::draft_chain_cpu>::call);
}

}  // namespace kangaroo
