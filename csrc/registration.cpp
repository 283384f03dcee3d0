// Operator schemas of kangaroo_kernels (defined once here) and the _C Python module.
// CPU implementations live in csrc/cpu/*.cpp, CUDA implementations in csrc/*_cuda.cpp
// (wrappers) + csrc/*.cu (torch-free launchers of the kernels in csrc/include/kangaroo).
// The Triton-only ops (lm_head_topk, ...) are defined from Python; ops with a C++ CPU kernel and a Triton CUDA
// kernel (append_attention, ...) are defined here and get their CUDA implementation from Python.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/simd.h"
#include "cpu/small_gemm.h"


TORCH_LIBRARY(kangaroo_kernels, m) {
  // What the CPU kernels' dispatched loops run on this machine (KANGAROO_CPU_ISA=avx2 / baseline caps it).
  m.def("cpu_isa() -> str", [] { return std::string(kangaroo::isa_name(kangaroo::cpu_isa())); });
  // The build of the packed GEMM (llama_layer, the CPU LM head) that runs here: cpu_isa, or on an AVX-512 CPU the
  // faster of its AVX-512 and AVX2 builds, measured once (the same bits either way).
  m.def("gemm_isa() -> str", [] { return std::string(kangaroo::isa_name(kangaroo::gemm_isa())); });
  // Tree topology. parents[B,N] int32 (-1: child of the root), num_nodes[B] int32 or None.
  // Writes depth[B,N] i32, mask[B,N,W] i32 (W = ceil(N/32) ancestor-or-self bit words),
  // first_child[B,N] i32, next_sibling[B,N] i32; root's children are reported via
  // first_child of a virtual root: see kangaroo_kernels/tree.py.
  m.def(
      "build_tree(Tensor parents, Tensor? num_nodes, Tensor(a!) depth, Tensor(b!) mask, "
      "Tensor(c!) first_child, Tensor(d!) next_sibling, Tensor(e!) root_first_child) -> ()");
  // Greedy acceptance. draft_tokens[B,N] (-1 = padding), target: logits [B,N+1,V] or
  // tokens [B,N+1] int32; parents[B,N] or None (chain).
  m.def(
      "verify_greedy(Tensor draft_tokens, Tensor target, Tensor? parents, "
      "Tensor(a!) accept_len, Tensor(b!) path, Tensor(c!) tokens) -> ()");
  // Lossless speculative sampling. draft_probs[B,N,V] or None (one-hot drafts);
  // randomness from uniforms[B,N+1] or Philox(seed[B], offset[B]) (offset advanced in place).
  // Per-row settings temperature_rows[B] f32 (<= 0: greedy row), top_k_rows[B] i32, top_p_rows[B] f32
  // override the scalars; probs: target_logits holds probabilities.
  m.def(
      "verify_sample(Tensor draft_tokens, Tensor target_logits, Tensor? draft_probs, "
      "Tensor? parents, Tensor? uniforms, Tensor? seed, Tensor(d!)? offset, float temperature, "
      "int top_k, float top_p, Tensor(a!) accept_len, Tensor(b!) path, Tensor(c!) tokens, "
      "Tensor? temperature_rows=None, Tensor? top_k_rows=None, Tensor? top_p_rows=None, bool probs=False) -> ()");
  // KV compaction after tree verification, all layers in one launch.
  // k_cache/v_cache [L,B,Hk,S,Dh]; tree node j lives at cache_lens[b] + j.
  m.def(
      "compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) cache_lens, Tensor path, "
      "Tensor accept_len) -> ()");
  // N-gram lookup (the hybrid drafter's lookup branch). history[B,S] int32/int64, lens[B] int32; writes
  // tokens[B,M] int32 (-1 padded) and n[B] int32. Semantics: csrc/include/kangaroo/ngram_lookup.cuh.
  m.def("ngram_lookup(Tensor history, Tensor lens, int n_min, int n_max, Tensor(a!) tokens, Tensor(b!) n) -> ()");
  // The lookup branch merged into the cycle's draft tree. draft[B,N], look[B,M], n_look[B] or None, parents[B,N] or
  // None (a chain), all int32; writes tokens/parents_out/source[B,N+M], n_shared[B], lookup_nodes[B,M] int32.
  // Semantics: csrc/include/kangaroo/lookup_tree.cuh.
  m.def(
      "merge_lookup_tree(Tensor draft, Tensor look, Tensor? n_look, Tensor? parents, Tensor(a!) tokens, "
      "Tensor(b!) parents_out, Tensor(c!) source, Tensor(d!) n_shared, Tensor(e!) lookup_nodes) -> ()");
  // KV append + attention over prefix and new block (decode, chain, tree). CPU: csrc/cpu/append_attention.cpp;
  // CUDA: the Triton kernel registered by kangaroo_kernels/append_attention.py. num_splits 0: the kernel chooses.
  m.def(
      "append_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_lens, Tensor? tree_mask, Tensor? active, Tensor? positions, Tensor? rope_cos_sin, "
      "float sm_scale, int num_splits, Tensor(c!) out) -> ()");
  // One decode step of the Kangaroo adapter. CPU: csrc/cpu/adapter_forward.cpp; CUDA: the Triton kernels
  // registered by kangaroo_kernels/adapter_forward.py.
  m.def(
      "adapter_forward(Tensor h, Tensor norm_in, Tensor wq, Tensor wk, Tensor wv, Tensor? bq, Tensor? bk, "
      "Tensor? bv, Tensor wo, Tensor norm_out, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_lens, "
      "Tensor positions, Tensor? active, Tensor? rope_cos_sin, float rope_theta, float eps, bool apply_out_norm, "
      "Tensor(c!) out) -> ()");
  // lm_head_topk's CPU kernel (csrc/cpu/lm_head_exit.cpp): the reference's logits, a one-pass top-k, its
  // logsumexp (the op's schema is defined in kangaroo_kernels/ops/lm_head_exit.py).
  m.def(
      "lm_head_topk_cpu(Tensor hidden, Tensor lm_head_weight, Tensor? norm_weight, int k, float eps, "
      "Tensor(a!) tokens, Tensor(b!) logprobs) -> ()");
  // The greedy CPU kernel of lm_head_exit (whose schema, with sampling, is defined in kangaroo_kernels/lm_head_exit.py;
  // its CPU implementation calls this for temperature 0 without probs).
  m.def(
      "lm_head_exit_greedy_cpu(Tensor hidden, Tensor lm_head_weight, Tensor? norm_weight, Tensor? active, "
      "float threshold, float eps, Tensor(a!) token, Tensor(b!) conf, Tensor(c!) active_out, "
      "Tensor(d!) token_prob) -> ()");
  // The draft-only LM head on an int8 copy of the weights (CPU only: csrc/cpu/lm_head_exit_int8.cpp; wrapper and
  // checks in kangaroo_kernels/ops/lm_head_exit_int8.py).
  m.def(
      "lm_head_exit_int8(Tensor hidden, Tensor qweight, Tensor scale, Tensor? norm_weight, Tensor? active, "
      "float threshold, float eps, Tensor(a!) token, Tensor(b!) conf, Tensor(c!) active_out, "
      "Tensor(d!) token_prob) -> ()");
  // One Llama-family decoder layer on x[B,T,D] (kangaroo.model.LlamaModel.layer's maths; appends K/V to layer
  // `layer` of the stacked caches [L,B,Hk,S,Dh] at cache_lens, RoPE at positions[B,T]). CPU only
  // (csrc/cpu/llama_layer.cpp): one dispatcher crossing per layer; CUDA runs the layer's ops (in a CUDA graph).
  // The four weights are [N, K] (any layout) or packed by pack_gemm_weight (the CPU decoder's: hand loops, fp32 x).
  m.def(
      "llama_layer(Tensor x, Tensor ln1, Tensor wqkv, Tensor? bqkv, Tensor wo, Tensor ln2, Tensor wgu, Tensor wd, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, Tensor cache_lens, Tensor positions, Tensor? tree_mask, "
      "Tensor? active, Tensor rope_cos_sin, float eps, int num_heads, int num_kv_heads) -> Tensor");
  // llama_layer for layers first_layer .. first_layer + n - 1 in one crossing, their weights 7 per layer (ln1, wqkv,
  // bqkv or None, wo, ln2, wgu, wd): LlamaModel.forward_layers on CPU. CPU only (csrc/cpu/llama_layer.cpp).
  m.def(
      "llama_layers(Tensor x, Tensor?[] layers, Tensor(a!) k_cache, Tensor(b!) v_cache, int first_layer, "
      "Tensor cache_lens, Tensor positions, Tensor? tree_mask, Tensor? active, Tensor rope_cos_sin, float eps, "
      "int num_heads, int num_kv_heads) -> Tensor");
  // The final RMSNorm and the packed LM head in one crossing: fp32 logits [..., vocab_size] of h [..., D]
  // (LlamaModel.logits on CPU; rms_norm_ref's bits, then gemm_packed). CPU only (csrc/cpu/llama_layer.cpp).
  m.def("lm_logits(Tensor h, Tensor norm_weight, float eps, Tensor head, int vocab_size) -> Tensor");
  // One step of the CPU decoder's chain draft loop (kangaroo/draft.py with K = 1 and an int8 draft head) in one
  // crossing (csrc/cpu/draft_step.cpp): layers 0..l-1 on cur at pos for the rows in proc (their layer-l states into
  // hidden), then, with draft and a drafting row, the adapter step and the int8 head: draft_token, n_chain, cur,
  // proc <- drafting, drafting <- keep. Returns whether a row was drafting. CPU only.
  m.def(
      "draft_step(Tensor?[] layers, Tensor embed, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rope_cos_sin, "
      "float eps, int num_heads, int num_kv_heads, Tensor?[] adapter, Tensor(c!) adapter_k, Tensor(d!) adapter_v, "
      "float rope_theta, float adapter_eps, Tensor head_q, Tensor head_scale, Tensor? head_norm, float threshold, "
      "Tensor(e!) cur, Tensor pos, Tensor(f!) proc, Tensor(g!) drafting, bool draft, Tensor(h!) hidden, "
      "Tensor(i!) draft_token, Tensor(j!) n_chain) -> bool");
  // kangaroo.draft.draft for the CPU chain in one crossing (csrc/cpu/draft_step.cpp): with catch_up a one-node
  // adapter catch-up, cur <- tok, n_chain <- 0, drafts <- -1, then draft_step for steps 0..n_steps at L0 + step
  // (hidden[:, step], drafts[:, step]) over the rows alive and not in hit, until no row drafts (host_exit) or all
  // ran. Returns the shallow passes run, or -1 (nothing done) when the catch-up is wider than one node.
  m.def(
      "draft_chain(Tensor?[] layers, Tensor embed, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rope_cos_sin, "
      "float eps, int num_heads, int num_kv_heads, Tensor?[] adapter, Tensor(c!) adapter_k, Tensor(d!) adapter_v, "
      "float rope_theta, float adapter_eps, Tensor head_q, Tensor head_scale, Tensor? head_norm, float threshold, "
      "Tensor tok, Tensor L0, Tensor alive, Tensor(e!) need_catch, Tensor catch_n, Tensor catch_h, Tensor(f!) cur, "
      "Tensor(g!) hidden, Tensor(h!) drafts, Tensor(i!) n_chain, Tensor? hit, bool catch_up, int n_steps, "
      "bool host_exit) -> int");
  // The tail of a CPU decoder cycle (kangaroo/verify.py commit; csrc/cpu/commit_step.cpp) in one crossing: with
  // a = accept_len on live rows (0 elsewhere), the catch-up request (catch_n_in / catch_h_in, or without them the
  // leaf one: hbuf's row of the path's last accepted node), the lookup history, x0, L0, n_gen, EOS / length ends,
  // the packed per-cycle result out and alive. CPU only.
  m.def(
      "commit_step(Tensor tokens, Tensor accept_len, Tensor? path, Tensor? catch_n_in, Tensor? catch_h_in, "
      "Tensor? n_look, Tensor hbuf, Tensor n_chain, Tensor? look_n, Tensor(a!)? history, Tensor? eos, "
      "Tensor max_new, Tensor(b!) L0, Tensor(c!) tok, Tensor(d!) catch_n, Tensor(e!) need_catch, "
      "Tensor(f!) catch_h, Tensor(g!) n_gen, Tensor(h!) out, Tensor(i!) alive) -> ()");
  // llama_layer's packed CPU weight layouts (csrc/cpu/small_gemm.h): [N, K] -> [ceil(N / 32), K, 32], zero-padded,
  // or with bf16 (a weight whose values are all bf16) the pairs layout [ceil(N / 32), K, 16] int32; and back to the
  // first n rows (fp32).
  m.def("pack_gemm_weight(Tensor w, bool bf16=False) -> Tensor");
  m.def("unpack_gemm_weight(Tensor wp, int n) -> Tensor");
  // x[..., K] @ w.T for w [n, K] packed, fp32 (CPU: the decoder's LM head; a row's logits do not depend on the
  // other rows of the call).
  m.def("gemm_packed(Tensor x, Tensor wp, int n) -> Tensor");
  // True when the CUDA kernels were compiled into this library.
  m.def("has_cuda_kernels() -> bool");
}

TORCH_LIBRARY_IMPL(kangaroo_kernels, CompositeExplicitAutograd, m) {
  m.impl("has_cuda_kernels", []() -> bool {
#ifdef KANGAROO_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

static struct PyModuleDef kangaroo_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kangaroo_c_module); }
