// CPU implementation of kangaroo_kernels::commit_step: the tail of a CPU decoder cycle (kangaroo/verify.py commit,
// with the leaf catch-up request of _catch_leaf when none is given) in one dispatcher crossing.
//
// Why: commit is ~25 tensor calls on [B] vectors; right after the layers (caches cold) each costs 5-10 us, so the
// tail cost ~190 us a cycle: ~8 % of a Kangaroo cycle and ~4 % of a plain step on the demo model. Here it is one
// loop over rows, integer bookkeeping and row copies only: the same bits as the Python function
// (tests/test_commit_step.py compares every buffer).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include "cpu/checks.h"
#include "cpu/ops_cpu.h"

namespace kangaroo {

namespace {

const c10::Device kCpu(c10::kCPU);

// t: [B, -1, D] of dtype `like`, last dim contiguous (a row of D elements is one memcpy).
void check_rows(const char* name, const at::Tensor& t, int64_t B, int64_t D, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == B && t.size(2) == D, name, " must be [B=", B, ", W, D=", D,
                    "], got ", shape_str(t));
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(), ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.stride(2) == 1 && t.device() == kCpu, name, " must be a CPU tensor with a contiguous last dim");
}

const int32_t* i32_or_null(const std::optional<at::Tensor>& t, const char* name, int64_t B) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_i32(name, *t, {B}, "[B]", kCpu);
  return t->data_ptr<int32_t>();
}

}  // namespace

void commit_step_cpu(const at::Tensor& tokens, const at::Tensor& accept_len, const std::optional<at::Tensor>& path,
                     const std::optional<at::Tensor>& catch_n_in, const std::optional<at::Tensor>& catch_h_in,
                     const std::optional<at::Tensor>& n_look, const at::Tensor& hbuf, const at::Tensor& n_chain,
                     const std::optional<at::Tensor>& look_n, const std::optional<at::Tensor>& history,
                     const std::optional<at::Tensor>& eos, const at::Tensor& max_new, const at::Tensor& L0,
                     const at::Tensor& tok, const at::Tensor& catch_n, const at::Tensor& need_catch,
                     const at::Tensor& catch_h, const at::Tensor& n_gen, const at::Tensor& out,
                     const at::Tensor& alive) {
  const int64_t B = alive.size(0);
  check_typed("commit_step: alive", alive, {B}, "[B]", at::kBool, "bool", kCpu);
  check_typed("commit_step: need_catch", need_catch, {B}, "[B]", at::kBool, "bool", kCpu);
  check_i32("commit_step: tokens", tokens, {B, -1}, "[B, T]", kCpu);
  const int64_t T = tokens.size(1);
  const char* vecs[] = {"commit_step: accept_len", "commit_step: n_chain", "commit_step: max_new", "commit_step: L0",
                        "commit_step: tok", "commit_step: catch_n", "commit_step: n_gen"};
  const at::Tensor* vts[] = {&accept_len, &n_chain, &max_new, &L0, &tok, &catch_n, &n_gen};
  for (int i = 0; i < 7; ++i) check_i32(vecs[i], *vts[i], {B}, "[B]", kCpu);
  check_i32("commit_step: out", out, {B, -1}, "[B, 6 + N]", kCpu);
  TORCH_CHECK_VALUE(out.size(1) >= 5 + T, "commit_step: out must be at least 5 + T = ", 5 + T, " wide, got ",
                    shape_str(out));
  TORCH_CHECK_VALUE(hbuf.dim() == 3 && hbuf.size(0) == B, "commit_step: hbuf must be [B=", B, ", N+1, D], got ",
                    shape_str(hbuf));
  const int64_t D = hbuf.size(2), W = catch_h.dim() == 3 ? catch_h.size(1) : 0;
  check_rows("commit_step: hbuf", hbuf, B, D, hbuf);
  check_rows("commit_step: catch_h", catch_h, B, D, hbuf);
  TORCH_CHECK_VALUE(catch_h.is_contiguous(), "commit_step: catch_h must be contiguous");
  const bool given = catch_n_in.has_value() && catch_n_in->defined();
  TORCH_CHECK_VALUE(given == (catch_h_in.has_value() && catch_h_in->defined()),
                    "commit_step: catch_n_in and catch_h_in come together (or neither: the leaf catch-up)");
  const int32_t* cni = i32_or_null(catch_n_in, "commit_step: catch_n_in", B);
  if (given) {
    check_rows("commit_step: catch_h_in", *catch_h_in, B, D, hbuf);
    TORCH_CHECK_VALUE(catch_h_in->size(1) == 1 || catch_h_in->size(1) == W, "commit_step: catch_h_in must be 1 or W=",
                      W, " wide, got ", shape_str(*catch_h_in));
  }
  const int32_t* nl = i32_or_null(n_look, "commit_step: n_look", B);
  const int32_t* ln = i32_or_null(look_n, "commit_step: look_n", B);
  const bool lookup = ln != nullptr;
  TORCH_CHECK_VALUE(lookup == (history.has_value() && history->defined()),
                    "commit_step: look_n and history come together (the lookup's buffers, or neither)");
  TORCH_CHECK_VALUE(nl == nullptr || lookup, "commit_step: n_look needs the lookup's buffers");
  int32_t* hist = nullptr;
  int64_t S = 0;
  if (lookup) {
    check_i32("commit_step: history", *history, {B, -1}, "[B, S]", kCpu);
    hist = history->data_ptr<int32_t>();
    S = history->size(1);
  }
  const int32_t* pa = nullptr;
  int64_t P = 0;
  if (path.has_value() && path->defined()) {
    check_i32("commit_step: path", *path, {B, -1}, "[B, P]", kCpu);
    TORCH_CHECK_VALUE(path->size(1) > 0, "commit_step: path must have at least one column");
    pa = path->data_ptr<int32_t>();
    P = path->size(1);
  }
  const int32_t* eo = nullptr;
  int64_t E = 0;
  if (eos.has_value() && eos->defined()) {
    check_i32("commit_step: eos", *eos, {-1}, "[E]", kCpu);
    eo = eos->data_ptr<int32_t>();
    E = eos->size(0);
  }

  const int32_t *tk = tokens.data_ptr<int32_t>(), *al = accept_len.data_ptr<int32_t>();
  const int32_t *nc = n_chain.data_ptr<int32_t>(), *mx = max_new.data_ptr<int32_t>();
  int32_t *l0 = L0.data_ptr<int32_t>(), *x0 = tok.data_ptr<int32_t>(), *cn = catch_n.data_ptr<int32_t>();
  int32_t *ng = n_gen.data_ptr<int32_t>(), *o = out.data_ptr<int32_t>();
  bool *live_p = alive.data_ptr<bool>(), *need = need_catch.data_ptr<bool>();
  const int64_t es = hbuf.element_size(), row = D * es, Nh = hbuf.size(1), ow = out.size(1);
  const char* hb = static_cast<const char*>(hbuf.data_ptr());
  const char* chi = given ? static_cast<const char*>(catch_h_in->data_ptr()) : nullptr;
  char* ch = static_cast<char*>(catch_h.data_ptr());
  // the leaf catch-up's node of a live row: the path's last accepted node (nodes are hbuf rows 1..)
  auto leaf = [&](int64_t b, int32_t a) -> int64_t {
    const int64_t last = std::max<int32_t>(a - 1, 0);
    return pa == nullptr ? last : std::max<int32_t>(pa[b * P + std::min(last, P - 1)], 0);
  };
  for (int64_t b = 0; b < B; ++b) {  // every check before the first write: a bad call changes nothing
    const int32_t a = live_p[b] ? al[b] : 0;
    TORCH_CHECK_VALUE(a >= 0 && a < T, "commit_step: accept_len[", b, "] = ", a, " is outside [0, T=", T, ")");
    TORCH_CHECK_VALUE(pa == nullptr || a <= P, "commit_step: accept_len[", b, "] = ", a, " exceeds path's width ", P);
    TORCH_CHECK_VALUE(given || !live_p[b] || leaf(b, a) + 1 < Nh, "commit_step: row ", b, "'s last accepted node ",
                      leaf(b, a), " has no hbuf row (hbuf ", shape_str(hbuf), ")");
  }
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* t = tk + b * T;
    const bool live = live_p[b];
    const int32_t a = live ? al[b] : 0;
    if (live) {
      int32_t c;
      const char* src;
      int64_t step = 0;  // bytes between the source's W columns (0: one row broadcast over W)
      if (given) {
        c = cni[b];
        const at::Tensor& h = *catch_h_in;
        src = chi + b * h.stride(0) * es;
        step = h.size(1) == 1 ? 0 : h.stride(1) * es;
      } else {  // _catch_leaf: the path's last accepted node, when the adapter never ran on it
        const int64_t last = leaf(b, a);
        c = a > 0 && last >= nc[b] - 1;
        src = hb + b * hbuf.stride(0) * es + (last + 1) * hbuf.stride(1) * es;
      }
      if (lookup) {  // the committed history (before L0 advances): tokens[:, :n] at L0 + 1 ..
        const int64_t start = l0[b] + 1, n = std::max<int64_t>(0, std::min<int64_t>(T, S - start));
        if (n > 0) std::memcpy(hist + b * S + start, t, n * sizeof(int32_t));
      }
      x0[b] = t[a];
      l0[b] += a + 1;
      cn[b] = c;
      // memmove: catch_h_in may be catch_h itself (the autoregressive step keeps it)
      for (int64_t w = 0; w < W; ++w) std::memmove(ch + (b * W + w) * row, src + w * step, row);
    }
    need[b] = cn[b] > 0;
    bool hit = false;
    for (int64_t j = 0; live && eo != nullptr && j <= a && !hit; ++j)
      for (int64_t e = 0; e < E && !hit; ++e) hit = t[j] == eo[e];
    if (live) ng[b] += a + 1;
    int32_t* ob = o + b * ow;
    ob[0] = a;
    ob[1] = live ? nc[b] : 0;
    ob[2] = live;
    if (lookup) {
      ob[3] = nl != nullptr ? nl[b] : 0;
      ob[4] = live && ln[b] > 0;
    }
    std::memcpy(ob + 5, t, T * sizeof(int32_t));
    live_p[b] = live && !hit && ng[b] < mx[b];
  }
}

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("commit_step", &kangaroo::below_autograd<&kangaroo::commit_step_cpu>::call);
}

}  // namespace kangaroo
