"""Benchmark append_attention (Triton split-KV kernel on GPU; the same kernel in the interpreter on CPU) against
same-run baselines.

Shapes: the attention heads of Vicuna-7B (32/32), Llama-3-8B (GQA 32/8) and Qwen2.5-7B (GQA 28/4), Dh=128, bf16;
batch 1, 4, 16, 64; decode (T=1) at cache length S=2048 for every model, an S sweep (512, 8192) for Llama-3-8B,
and verification blocks at S=2048: a chain of T=6 (causal inside the block) and a tree of T=64 (ancestor bit
mask). Headline (--quick on GPU): decode at S=2048 for all three models at B=1 and B=16, chain 6 / tree 64 for
Llama-3-8B at B=1; torch.compile runs for the Llama-3-8B headline shapes only (each shape is a fresh compile).

Impls, all in this run on the same inputs:
  torch-eager     cache slice write + F.scaled_dot_product_attention (enable_gqa) with a bool mask for T > 1
  torch-compile   torch.compile of torch-eager
  kangaroo        the op (eager launches, CUDA events per call)
  kangaroo+graph  the op replayed from a CUDA graph
On CPU the kernel runs in the Triton interpreter at a tiny shape: not GPU timings.

Bytes: the KV prefix read (2 * B * Hk * L * Dh), the new K/V written, q read and out written. Inputs rotate over
enough cache sets to exceed L2 (> 64 MB) where they fit.

  python bench/bench_append_attention.py [--quick] [--no-compile] [--budget-s S]
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

MODELS = {"vicuna-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}
BATCHES = (1, 4, 16, 64)


def tree_masks(parents: torch.Tensor):
    """parents[T] (-1: root child) -> (ancestor-or-self bool [T, T], int32 bit words [T, ceil(T/32)])."""
    T = parents.numel()
    anc = torch.eye(T, dtype=torch.bool)
    for j in range(T):
        if parents[j] >= 0:
            anc[j] |= anc[parents[j]]
    bits = anc.to(torch.int64) << (torch.arange(T) % 32)
    W = (T + 31) // 32
    words = torch.zeros(T, W, dtype=torch.int64).index_add_(1, torch.arange(T) // 32, bits)
    return anc, torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def eager_append_attention(q, k_new, v_new, k_cache, v_cache, L: int, mask):
    """Baseline: rows share one length L (a host int); mask [T, L+T] bool or None (T = 1)."""
    T = q.shape[1]
    k_cache[:, :, L:L + T] = k_new.transpose(1, 2)
    v_cache[:, :, L:L + T] = v_new.transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :L + T], v_cache[:, :, :L + T],
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def cases(on_gpu: bool, quick: bool):
    """(model, B, S, T, headline, compile), headline first."""
    if not on_gpu:
        yield "tiny", 1, 128, 1, True, False
        yield "tiny", 1, 128, 6, False, False
        if not quick:
            yield "tiny", 1, 128, 64, False, False
            yield "tiny", 4, 128, 1, False, False
        return
    for B in (1, 16):
        yield "llama-3-8b", B, 2048, 1, True, True
    yield "llama-3-8b", 1, 2048, 6, True, True
    yield "llama-3-8b", 1, 2048, 64, True, True
    for m in ("vicuna-7b", "qwen2.5-7b"):
        for B in (1, 16):
            yield m, B, 2048, 1, True, False
    if quick:
        return
    for m in MODELS:
        for B in BATCHES:
            if B not in (1, 16):
                yield m, B, 2048, 1, False, False
    for S in (512, 8192):
        for B in BATCHES:
            yield "llama-3-8b", B, S, 1, False, False
    for T in (6, 64):
        for B in BATCHES:
            if B != 1:
                yield "llama-3-8b", B, 2048, T, False, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    from kangaroo_kernels.ops.append_attention import _append_attention_triton, append_attention

    dtype = torch.bfloat16
    models = MODELS if on_gpu else {"tiny": (8, 2, 64)}
    attn = append_attention if on_gpu else _append_attention_triton
    rec = Recorder("append_attention", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator().manual_seed(0)
    dgen = torch.Generator(device=dev).manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    for model, B, S, T, headline, allow_compile in cases(on_gpu, args.quick):
        Hq, Hk, Dh = models[model]
        op = {1: "decode", 6: "chain6", 64: "tree64"}.get(T, f"T{T}")
        shape = f"{op} {model} B={B} S={S} T={T} H={Hq}/{Hk} D={Dh}"
        if rec.out_of_time(shape, reserve=8.0):
            continue
        L = S - T
        kv_bytes = 2 * B * Hk * S * Dh * 2
        n = n_input_sets(kv_bytes, dev, max_sets=16)

        def rnd(*shape):
            return torch.randn(*shape, generator=dgen, device=dev, dtype=dtype)

        sets = []
        for _ in range(n):
            sets.append((rnd(B, T, Hq, Dh), rnd(B, T, Hk, Dh), rnd(B, T, Hk, Dh), rnd(B, Hk, S, Dh),
                         rnd(B, Hk, S, Dh)))
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        outs = [torch.empty(B, T, Hq, Dh, dtype=dtype, device=dev) for _ in range(n)]
        tree_mask = mask = None
        if T > 1 and op == "tree64":
            parents = torch.cat([torch.tensor([-1]), torch.randint(0, T, (T - 1,), generator=gen)])
            parents = torch.minimum(parents, torch.arange(T) - 1)  # topological
            anc, words = tree_masks(parents)
            tree_mask = words.expand(B, T, -1).contiguous().to(dev)
            mask = torch.cat([torch.ones(T, L, dtype=torch.bool), anc], dim=1).to(dev)
        elif T > 1:
            mask = torch.cat([torch.ones(T, L, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()],
                             dim=1).to(dev)
        gbytes_moved = kv_bytes * L / S + 2 * B * T * Hk * Dh * 2 + 2 * B * T * Hq * Dh * 2

        def eager(i):
            return eager_append_attention(*sets[i], L, mask)

        def kernel(i):
            q, kn, vn, kc, vc = sets[i]
            return attn(q, kn, vn, kc, vc, lens, tree_mask=tree_mask, out=outs[i], validate=False)

        ref = eager(0).float()
        got = kernel(0).float()
        note = agree(torch.allclose(ref, got, atol=3e-2, rtol=3e-2),
                     f"eager vs op max |diff| {float((ref - got).abs().max()):.3g}, {shape}", dev)
        rec.add("append_attention", "torch-eager", shape, "bf16", time_rotating(eager, n, dev, **it),
                bytes_moved=gbytes_moved, batch=B, note=note)
        if allow_compile and want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_append_attention, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, *sets[0], L, mask)
                if secs is not None:
                    rec.add("append_attention", "torch-compile", shape, "bf16",
                            time_rotating(lambda i: compiled(*sets[i], L, mask), n, dev, **it),
                            bytes_moved=gbytes_moved, batch=B, note=f"compile {secs:.1f} s")
        impl = "kangaroo" if on_gpu else "kangaroo-triton-interpreter"
        rec.add("append_attention", impl, shape, "bf16", time_rotating(kernel, n, dev, **it),
                bytes_moved=gbytes_moved, batch=B)
        if on_gpu:
            rec.add("append_attention", "kangaroo+graph", shape, "bf16",
                    time_rotating(kernel, n, dev, graph=True, **it), bytes_moved=gbytes_moved, batch=B)
    rec.finish()


if __name__ == "__main__":
    main()
