"""Benchmark adapter_forward (one Kangaroo adapter decode step: RMSNorm, QKV, RoPE, cache append, attention,
O-proj, residual, RMSNorm; Triton kernels on GPU, the same kernels in the interpreter on CPU) against same-run
baselines.

Shapes: the adapter of Vicuna-7B (D=4096, 32/32 heads), Llama-3-8B (D=4096, GQA 32/8) and Qwen2.5-7B (D=3584,
GQA 28/4, q/k/v bias), Dh=128, bf16, adapter cache length S=2048 (and 512 / 8192 for Vicuna-7B), batch 1, 4, 16,
64. Headline (--quick on GPU): S=2048, B=1 and B=16, all three models; torch.compile for Vicuna-7B headline
shapes only (each shape is a fresh compile).

Impls, all in this run on the same weights:
  torch-eager        HF-style PyTorch: RMSNorm, fused QKV F.linear, RoPE, cache slice write, SDPA (GQA), O-proj,
                     residual, RMSNorm
  torch-eager+graph  the same captured in a CUDA graph (launch overhead removed: the fair eager comparison)
  torch-compile      torch.compile of torch-eager
  kangaroo           the op (eager launches, CUDA events per call)
  kangaroo+graph     the op replayed from a CUDA graph
  kangaroo-prenorm+graph  apply_out_norm=False (the out-norm left to lm_head_exit: one launch fewer)
On CPU a tiny shape runs with Triton in the interpreter: not GPU timings.

Bytes (the floor): adapter weights (4 D^2-ish + norms, bias) + the KV prefix read (2 * B * Hk * L * Dh) + the new
K/V row. Weight sets rotate where one set is under 64 MB.

  python bench/bench_adapter_forward.py [--quick] [--no-compile] [--budget-s S]
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():  # Triton reads this when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _common import (  # noqa: E402
    Recorder,
    agree,
    bench_args,
    bench_device,
    compile_call,
    n_input_sets,
    time_rotating,
    try_compile,
    want_compile,
)

# name: (D, Hq, Hk, Dh, q/k/v bias)
MODELS = {"vicuna-7b": (4096, 32, 32, 128, False), "llama-3-8b": (4096, 32, 8, 128, False),
          "qwen2.5-7b": (3584, 28, 4, 128, True)}
BATCHES = (1, 4, 16, 64)


def _rms(x, w, eps=1e-6):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def eager_adapter(h, norm_in, wqkv, bqkv, wo, norm_out, k_cache, v_cache, L: int, cos, sin, Hq: int, Hk: int):
    """Baseline, HF-style: every row at cache length L (a host int); cos/sin [Dh] in h's dtype."""
    B, Dh = h.shape[0], k_cache.shape[-1]
    qkv = F.linear(_rms(h, norm_in), wqkv, bqkv)
    q, k, v = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
    q = _rope(q.view(B, Hq, 1, Dh), cos, sin)
    k_cache[:, :, L] = _rope(k.view(B, Hk, Dh), cos, sin)
    v_cache[:, :, L] = v.view(B, Hk, Dh)
    o = F.scaled_dot_product_attention(q, k_cache[:, :, :L + 1], v_cache[:, :, :L + 1], enable_gqa=True)
    return _rms(h + F.linear(o.reshape(B, Hq * Dh), wo), norm_out)


def cases(on_gpu: bool, quick: bool):
    """(model, B, S, headline, compile), headline first."""
    if not on_gpu:
        yield "tiny", 1, 128, True, False
        if not quick:
            yield "tiny", 4, 128, False, False
        return
    for B in (1, 16):
        yield "vicuna-7b", B, 2048, True, True
    for m in ("llama-3-8b", "qwen2.5-7b"):
        for B in (1, 16):
            yield m, B, 2048, True, False
    if quick:
        return
    for m in MODELS:
        for B in (4, 64):
            yield m, B, 2048, False, False
    for S in (512, 8192):
        for B in BATCHES:
            yield "vicuna-7b", B, S, False, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    from kangaroo_kernels.ops.adapter_forward import _adapter_forward_triton, adapter_forward
    from kangaroo_kernels.rope import make_rope_cos_sin
    from kangaroo_kernels.types import AdapterWeights

    dtype = torch.bfloat16
    models = MODELS if on_gpu else {"tiny": (256, 4, 2, 64, True)}
    fused = adapter_forward if on_gpu else _adapter_forward_triton
    rec = Recorder("adapter_forward", dev, quick=args.quick, budget_s=args.budget_s)
    dgen = torch.Generator(device=dev).manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    for model, B, S, headline, allow_compile in cases(on_gpu, args.quick):
        D, Hq, Hk, Dh, bias = models[model]
        shape = f"{model} B={B} S={S} H={Hq}/{Hk} D={D}"
        if rec.out_of_time(shape, reserve=8.0):
            continue
        L = S - 1  # the step fills the cache's last slot

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=dgen, device=dev) * scale).to(dtype)

        w_bytes = ((Hq + 2 * Hk) * Dh * D + D * Hq * Dh + 2 * D + ((Hq + 2 * Hk) * Dh if bias else 0)) * 2
        kv_bytes = 2 * B * Hk * S * Dh * 2
        n = n_input_sets(w_bytes + kv_bytes, dev, max_sets=8)
        sets = []
        for _ in range(n):
            wqkv = rnd((Hq + 2 * Hk) * Dh, D, scale=D ** -0.5)
            bqkv = rnd((Hq + 2 * Hk) * Dh) if bias else None
            w = AdapterWeights.from_wqkv(1 + rnd(D, scale=0.1), wqkv, rnd(D, Hq * Dh, scale=(Hq * Dh) ** -0.5),
                                         1 + rnd(D, scale=0.1), Hq, Hk, bqkv)
            sets.append((rnd(B, D), w, wqkv, bqkv, rnd(B, Hk, S, Dh), rnd(B, Hk, S, Dh)))
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        outs = [torch.empty(B, D, dtype=dtype, device=dev) for _ in range(n)]
        c, s = make_rope_cos_sin(torch.tensor([L]), Dh, device=dev, dtype=torch.float32)[0].chunk(2)
        cos, sin = torch.cat([c, c]).to(dtype), torch.cat([s, s]).to(dtype)
        moved = w_bytes + 2 * B * Hk * L * Dh * 2 + 2 * B * Hk * Dh * 2 + 2 * B * D * 2

        def eager_args(i):
            h, w, wqkv, bqkv, kc, vc = sets[i]
            return (h, w.norm_in, wqkv, bqkv, w.wo, w.norm_out, kc, vc, L, cos, sin, Hq, Hk)

        def eager(i):
            return eager_adapter(*eager_args(i))

        def kernel(i, norm=True):
            h, w, _, _, kc, vc = sets[i]
            return fused(h, w, kc, vc, lens, lens, apply_out_norm=norm, out=outs[i], validate=False)

        ref = eager(0).float()
        got = kernel(0).float()
        note = agree(torch.allclose(ref, got, atol=5e-2, rtol=5e-2),
                     f"eager vs op max |diff| {float((ref - got).abs().max()):.3g}, {shape}", dev)
        rec.add("adapter_forward", "torch-eager", shape, "bf16", time_rotating(eager, n, dev, **it),
                bytes_moved=moved, batch=B, note=note)
        if on_gpu:
            rec.add("adapter_forward", "torch-eager+graph", shape, "bf16",
                    time_rotating(eager, n, dev, graph=True, **it), bytes_moved=moved, batch=B)
        if allow_compile and want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_adapter, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, *eager_args(0))
                if secs is not None:
                    rec.add("adapter_forward", "torch-compile", shape, "bf16",
                            time_rotating(lambda i: compiled(*eager_args(i)), n, dev, **it), bytes_moved=moved,
                            batch=B, note=f"compile {secs:.1f} s")
        impl = "kangaroo" if on_gpu else "kangaroo-triton-interpreter"
        rec.add("adapter_forward", impl, shape, "bf16", time_rotating(kernel, n, dev, **it), bytes_moved=moved,
                batch=B)
        if on_gpu:
            rec.add("adapter_forward", "kangaroo+graph", shape, "bf16",
                    time_rotating(kernel, n, dev, graph=True, **it), bytes_moved=moved, batch=B)
            rec.add("adapter_forward", "kangaroo-prenorm+graph", shape, "bf16",
                    time_rotating(lambda i: kernel(i, False), n, dev, graph=True, **it), bytes_moved=moved,
                    batch=B, note="apply_out_norm=False (norm fused into lm_head_exit)")
    rec.finish()


if __name__ == "__main__":
    main()
