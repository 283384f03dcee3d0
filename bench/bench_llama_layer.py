"""Benchmark the CPU decoder's layer (llama_layer) and its packed small-batch GEMM against same-run baselines.

The CPU model's fp32 layer runs as hand loops over packed weights (csrc/cpu/small_gemm, llama_layer.cpp): one pass
over each weight per 8 rows, which is what makes a verify block of T rows cost about one plain step. Shapes: the
shipped demo model's layer (D 256, GQA 4/2, I 768) and a larger one (D 512, 8/4, I 1408), T = 1 (a plain step),
T = 5 (a γ = 4 verify block) and T = 8, at a 128-token cached prefix; the GEMM alone at the demo layer's weights for
M = 1, 5, 8. Each measurement cycles through 12 layers' worth of weights (2 with --quick), as a 12-layer decode step
does: they stream from the last-level cache, not from L2 (with one weight reused every call MKL's M = 5 GEMM is
faster than gemm_packed; streamed, the other way round).

Impls, all in this run on the same inputs:
  torch-eager     the layer written with torch ops (F.linear on the column-major weights, the reference's RMSNorm,
                  append_attention's CPU op, SwiGLU): what the layer cost before it was one op
  aten-in-op      llama_layer on column-major weights: the same maths as ATen calls from C++ (MKL GEMMs)
  kangaroo-packed llama_layer on pack_gemm_weight's layout: the hand loops the decoder runs
For the GEMM: F.linear (torch-eager, MKL on the column-major weight) against gemm_packed. For the attention alone
(the demo head, Hq 4 / Hk 2, Dh 64, a 400-token prefix, T = 1 / 3 / 7, one K/V cache per layer): append_attention's
CPU op against the cache write + RoPE + F.scaled_dot_product_attention (torch-eager). Bytes: the layer's fp32
weights, or the cache's K/V (the floor at the measured copy bandwidth). A CPU timing, one thread unless
OMP_NUM_THREADS says otherwise.

  python bench/bench_llama_layer.py [--quick] [--budget-s S]
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import Recorder, agree, bench_args, time_rotating  # noqa: E402

EPS = 1e-6


def _weights(D, Hq, Hk, Dh, inter, gen):
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    return {"ln1": 1 + rnd(D, scale=0.1), "wqkv": rnd((Hq + 2 * Hk) * Dh, D, scale=D ** -0.5),
            "wo": rnd(D, Hq * Dh, scale=(Hq * Dh) ** -0.5), "ln2": 1 + rnd(D, scale=0.1),
            "wgu": rnd(2 * inter, D, scale=D ** -0.5), "wd": rnd(D, inter, scale=inter ** -0.5)}


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = torch.device("cpu")
    from kangaroo_kernels._ext import ops
    from kangaroo_kernels.ops.append_attention import append_attention
    from kangaroo_kernels.reference.adapter_forward import rms_norm_ref
    from kangaroo_kernels.rope import make_rope_cos_sin

    # (D, Hq, Hk, Dh, intermediate)
    layers = [(256, 4, 2, 64, 768)] + ([] if args.quick else [(512, 8, 4, 64, 1408)])
    blocks = [1, 5] if args.quick else [1, 5, 8]
    prefix = 16 if args.quick else 128
    rec = Recorder("llama_layer", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator().manual_seed(0)
    it = dict(iters=args.iters or (3 if args.quick else 40))
    n_layers = 2 if args.quick else 12
    for D, Hq, Hk, Dh, inter in layers:
        ps = [_weights(D, Hq, Hk, Dh, inter, gen) for _ in range(n_layers)]
        cms = [{k: t.t().contiguous().t() if t.dim() == 2 else t for k, t in p.items()} for p in ps]  # MKL's layout
        pks = [{k: ops().pack_gemm_weight(t) if t.dim() == 2 else t for k, t in p.items()} for p in ps]
        nbytes = 4 * sum(t.numel() for t in ps[0].values())
        S = prefix + max(blocks) + 1
        rope = make_rope_cos_sin(S, Dh)
        for T in blocks:
            shape = f"D={D} H={Hq}/{Hk} I={inter} T={T} prefix={prefix}"
            if rec.out_of_time(shape, reserve=5.0):
                continue
            kc, vc = (torch.randn(1, 1, Hk, S, Dh, generator=gen) for _ in "kv")
            lens = torch.full((1,), prefix, dtype=torch.int32)
            pos = lens.long()[:, None] + torch.arange(T)
            xs = [torch.randn(1, T, D, generator=gen) for _ in range(2)]

            def layer_op(w, i):
                return ops().llama_layer(xs[i % 2], w["ln1"], w["wqkv"], None, w["wo"], w["ln2"], w["wgu"], w["wd"],
                                         kc, vc, 0, lens, pos, None, None, rope, EPS, Hq, Hk)

            def eager(i):
                x, cm = xs[i % 2], cms[i]
                qkv = F.linear(rms_norm_ref(x, cm["ln1"], EPS), cm["wqkv"])
                q, k, v = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
                a = append_attention(q.reshape(1, T, Hq, Dh), k.reshape(1, T, Hk, Dh), v.reshape(1, T, Hk, Dh),
                                     kc[0], vc[0], lens, positions=pos, rope_cos_sin=rope, validate=False)
                x = x + F.linear(a.reshape(1, T, Hq * Dh), cm["wo"])
                gate, up = F.linear(rms_norm_ref(x, cm["ln2"], EPS), cm["wgu"]).chunk(2, dim=-1)
                return x + F.linear(F.silu(gate) * up, cm["wd"])

            got, want = layer_op(pks[0], 0), eager(0)
            note = agree(torch.allclose(got, want, rtol=1e-4, atol=1e-4),
                         f"packed vs eager max |diff| {float((got - want).abs().max()):.2g}, {shape}", dev)
            rec.add("llama_layer", "torch-eager", shape, "fp32", time_rotating(eager, n_layers, dev, **it),
                    bytes_moved=nbytes, batch=T, note=note)
            rec.add("llama_layer", "aten-in-op", shape, "fp32",
                    time_rotating(lambda i: layer_op(cms[i], i), n_layers, dev, **it), bytes_moved=nbytes, batch=T)
            rec.add("llama_layer", "kangaroo-packed", shape, "fp32",
                    time_rotating(lambda i: layer_op(pks[i], i), n_layers, dev, **it), bytes_moved=nbytes, batch=T)
    # the attention alone (append_attention's CPU op) at the demo head, a long prefix, one cache per layer (as in a
    # decode step the 12 layers' K/V stream from the last-level cache); torch-eager: the cache write + SDPA
    Hq, Hk, Dh = 4, 2, 64
    apref = 64 if args.quick else 400
    for T in ([1, 3] if args.quick else [1, 3, 7]):
        shape = f"attention H={Hq}/{Hk} Dh={Dh} T={T} prefix={apref}"
        if rec.out_of_time(shape, reserve=2.0):
            continue
        S = apref + T
        rope = make_rope_cos_sin(S, Dh)
        caches = [tuple(torch.randn(1, Hk, S, Dh, generator=gen) for _ in "kv") for _ in range(n_layers)]
        q, k, v = (torch.randn(1, T, h, Dh, generator=gen) for h in (Hq, Hk, Hk))
        lens = torch.full((1,), apref, dtype=torch.int32)
        pos = lens.long()[:, None] + torch.arange(T)
        causal = torch.ones(T, S, dtype=torch.bool).tril(apref)

        def attn_op(i):
            kc, vc = caches[i]
            return append_attention(q, k, v, kc, vc, lens, positions=pos, rope_cos_sin=rope, validate=False)

        def attn_eager(i):
            kc, vc = caches[i]
            cos, sin = rope[pos, :Dh // 2].repeat(1, 1, 2)[:, :, None], rope[pos, Dh // 2:].repeat(1, 1, 2)[:, :, None]
            rot = lambda x: x * cos + torch.cat([-x[..., Dh // 2:], x[..., :Dh // 2]], -1) * sin  # noqa: E731
            kc[0, :, apref:apref + T] = rot(k)[0].transpose(0, 1)
            vc[0, :, apref:apref + T] = v[0].transpose(0, 1)
            o = F.scaled_dot_product_attention(rot(q).transpose(1, 2), kc, vc, attn_mask=causal, enable_gqa=True)
            return o.transpose(1, 2)

        got, want = attn_op(0), attn_eager(0)
        note = agree(torch.allclose(got, want, rtol=1e-4, atol=1e-4),
                     f"append_attention vs SDPA max |diff| {float((got - want).abs().max()):.2g}, {shape}", dev)
        kv_bytes = 4 * 2 * Hk * S * Dh
        rec.add("append_attention_cpu", "torch-eager", shape, "fp32", time_rotating(attn_eager, n_layers, dev, **it),
                bytes_moved=kv_bytes, batch=T, note=note)
        rec.add("append_attention_cpu", "kangaroo", shape, "fp32", time_rotating(attn_op, n_layers, dev, **it),
                bytes_moved=kv_bytes, batch=T)
    # the GEMM alone, on the demo layers' weights
    ps = [_weights(256, 4, 2, 64, 768, gen) for _ in range(n_layers)]
    for M in ([1, 5] if args.quick else [1, 5, 8]):
        for name in ("wqkv", "wgu", "wd"):
            ws = [p[name].t().contiguous().t() for p in ps]
            N, K = ws[0].shape
            shape = f"{name} N={N} K={K} M={M}"
            if rec.out_of_time(shape, reserve=2.0):
                continue
            wps = [ops().pack_gemm_weight(w) for w in ws]
            xs = [torch.randn(M, K, generator=gen) for _ in range(2)]
            ok = torch.allclose(ops().gemm_packed(xs[0], wps[0], N), F.linear(xs[0], ws[0]), rtol=1e-4, atol=1e-5)
            note = agree(ok, f"gemm_packed vs F.linear, {shape}", dev)
            rec.add("gemm_packed", "torch-eager", shape, "fp32",
                    time_rotating(lambda i: F.linear(xs[i % 2], ws[i]), n_layers, dev, **it), bytes_moved=4 * N * K,
                    batch=M, note=note)
            rec.add("gemm_packed", "kangaroo-packed", shape, "fp32",
                    time_rotating(lambda i: ops().gemm_packed(xs[i % 2], wps[i], N), n_layers, dev, **it),
                    bytes_moved=4 * N * K, batch=M)
    rec.finish()


if __name__ == "__main__":
    main()
