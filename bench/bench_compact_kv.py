"""Benchmark compact_kv (native op: all layers in one launch; CUDA kernel on GPU, C++ twin on CPU) against
same-run baselines.

Shapes: the KV caches of Vicuna-7B (L=32, Hk=32), Llama-3-8B (L=32, Hk=8) and Qwen2.5-7B (L=28, Hk=4), Dh=128,
bf16, stacked [L, B, Hk, S, Dh]; batch 1, 4, 16, 64; the accepted path of a tree of N=64 nodes with 6 accepted
(random increasing node indices: the typical case), a chain of 6 (an identity: only the lengths move), and a
tree-size / depth sweep (N=16 accepting 3, N=64 accepting 12). Headline (--quick on GPU; the only shapes with a
torch.compile baseline): Llama-3-8B, B=1 and B=16, tree N=64 accepting 6.

Impls, all in this run on the same caches:
  torch-eager     gather all N+1 candidate positions of every layer (identity past accept_len), scatter them back
  torch-compile   torch.compile of torch-eager (headline shapes)
  kangaroo        the op, eager launches (CUDA events per call)
  kangaroo+graph  the op replayed from a CUDA graph
The op advances cache_lens; it is reset before every timed call, outside the timed region.

Bytes: the op moves the K and V rows of the non-identity steps (read + write); the eager baseline moves all N+1
candidate rows through a temporary (read, write, read, write). Rotating inputs: each input set uses a different
window of positions in the same caches (distinct memory), enough windows to exceed L2 (> 64 MB) where they fit.

  python bench/bench_compact_kv.py [--quick] [--no-compile] [--budget-s S]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
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

from kangaroo_kernels.ops.compact_kv import compact_kv  # noqa: E402

# name: (layers, kv heads, head dim)
MODELS = {"vicuna-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}
BATCHES = (1, 4, 16, 64)
PREFIX = 32  # cache length before the first window


def accepted_paths(B: int, N: int, depth: int, chain: bool, gen: torch.Generator):
    """path [B, N+1] (increasing node indices, -1 padded) and accept_len [B] = depth."""
    path = torch.full((B, N + 1), -1, dtype=torch.int32)
    for b in range(B):
        nodes = torch.arange(depth) if chain else torch.randperm(N, generator=gen)[:depth].sort().values
        path[b, :depth] = nodes.to(torch.int32)
    return path, torch.full((B,), depth, dtype=torch.int32)


def eager_compact(k, v, lens, path, accept_len):
    """Gather all N+1 candidate positions (identity where i >= accept_len), then scatter them back."""
    L, B, H, S, Dh = k.shape
    i = torch.arange(path.shape[1], device=k.device)
    src = lens[:, None].long() + torch.where(i < accept_len[:, None], path.long(), i)
    dst = lens[:, None].long() + i
    src = src.clamp(max=S - 1).view(1, B, 1, -1, 1).expand(L, B, H, -1, Dh)
    dst = dst.clamp(max=S - 1).view(1, B, 1, -1, 1).expand(L, B, H, -1, Dh)
    for c in (k, v):
        c.scatter_(3, dst, c.gather(3, src))
    lens += accept_len


def cases(on_gpu: bool, quick: bool):
    """(model, B, kind, N, depth, headline), headline first."""
    if not on_gpu:
        for B in (1, 4):
            yield "tiny", B, "tree", 16, 4, B == 1
        yield "tiny", 1, "chain", 6, 6, False
        return
    for B in (1, 16):
        yield "llama-3-8b", B, "tree", 64, 6, True
    if quick:
        return
    for kind, N in (("tree", 64), ("chain", 6)):
        for m in MODELS:
            for B in BATCHES:
                if not (m == "llama-3-8b" and B in (1, 16) and kind == "tree"):
                    yield m, B, kind, N, 6, False
    for N, depth in ((16, 3), (64, 12)):
        for B in (1, 16):
            yield "llama-3-8b", B, "tree", N, depth, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    models = MODELS if on_gpu else {"tiny": (2, 2, 64)}
    rec = Recorder("compact_kv", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator().manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    dtype = torch.bfloat16
    for model, B, kind, N, depth, headline in cases(on_gpu, args.quick):
        L, H, Dh = models[model]
        shape = f"{kind} {model} L={L} B={B} Hk={H} Dh={Dh} N={N} accept={depth}"
        if rec.out_of_time(shape, reserve=5.0):
            continue
        row = H * Dh * 2  # bytes of one position of one layer, one of K/V
        window = L * B * (N + 1) * row * 2
        n = n_input_sets(window, dev, max_sets=32)
        S = PREFIX + n * (N + 1)
        k = torch.randn((L, B, H, S, Dh), device=dev, dtype=dtype)
        v = torch.randn((L, B, H, S, Dh), device=dev, dtype=dtype)
        sets = []
        for i in range(n):
            path, acc = accepted_paths(B, N, depth, kind == "chain", gen)
            lens0 = torch.full((B,), PREFIX + i * (N + 1), dtype=torch.int32, device=dev)
            sets.append((path.to(dev), acc.to(dev), lens0, lens0.clone()))
        p0, a0, l0, _ = sets[0]
        moved = int((p0.cpu()[:, :depth] != torch.arange(depth)).sum())  # non-identity steps
        op_bytes = 2 * 2 * moved * L * row  # K and V, read + write
        eager_bytes = 2 * 4 * B * (N + 1) * L * row

        # the baseline computes the same thing
        k1, v1, la, k2, v2, lb = k.clone(), v.clone(), l0.clone(), k.clone(), v.clone(), l0.clone()
        compact_kv(k1, v1, la, p0, a0)
        eager_compact(k2, v2, lb, p0, a0)
        note = agree(torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(la, lb), f"eager vs op, {shape}",
                     dev)
        del k1, v1, k2, v2

        def reset(i):
            sets[i][3].copy_(sets[i][2])

        def op(i):
            path, acc, _, lens = sets[i]
            compact_kv(k, v, lens, path, acc, validate=False)

        def eager(i):
            path, acc, _, lens = sets[i]
            eager_compact(k, v, lens, path, acc)

        rec.add("compact_kv", "torch-eager", shape, "bf16", time_rotating(eager, n, dev, pre=reset, **it),
                bytes_moved=eager_bytes, batch=B, note=note)
        if want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_compact, dynamic=False)
            if compiled is not None:
                reset(0)
                _, secs = compile_call(compiled, k, v, sets[0][3], p0, a0)
                if secs is not None:
                    t = time_rotating(lambda i: compiled(k, v, sets[i][3], sets[i][0], sets[i][1]), n, dev,
                                      pre=reset, **it)
                    rec.add("compact_kv", "torch-compile", shape, "bf16", t, bytes_moved=eager_bytes, batch=B,
                            note=f"compile {secs:.1f} s")
        rec.add("compact_kv", "kangaroo", shape, "bf16", time_rotating(op, n, dev, pre=reset, **it),
                bytes_moved=op_bytes, batch=B, note=f"{moved} non-identity moves")
        if on_gpu:
            rec.add("compact_kv", "kangaroo+graph", shape, "bf16",
                    time_rotating(op, n, dev, pre=reset, graph=True, **it), bytes_moved=op_bytes, batch=B,
                    note=f"{moved} non-identity moves")

    rec.finish()


if __name__ == "__main__":
    main()
