"""Benchmark compact_kv (native op, all layers in one launch) against a PyTorch-eager gather/scatter.

L=32 layers, Hk=8, Dh=128, bf16 caches; B in {1, 8}; accepted paths of a tree of N=64 nodes (or a chain, which
moves nothing). The floor is the bytes actually moved: K and V rows of the non-identity steps, read + write.

  python bench/bench_compact_kv.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _common import Recorder, bench_device, time_fn, time_graph  # noqa: E402

from kangaroo_kernels.compact_kv import compact_kv  # noqa: E402


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


def main():
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    kw = {} if on_gpu else {"warmup": 1, "iters": 3, "max_seconds": 0.5}
    L, H, Dh, N = 32, 8, 128, 64
    S = 512 if on_gpu else 96
    rec = Recorder("bench_compact_kv", dev)
    gen = torch.Generator().manual_seed(0)
    for B in (1, 8):
        k = torch.randn((L, B, H, S, Dh), generator=gen).to(torch.bfloat16).to(dev)
        v = torch.randn((L, B, H, S, Dh), generator=gen).to(torch.bfloat16).to(dev)
        for kind, depth in (("tree", 6), ("tree", 12), ("chain", 6)):
            path, accept_len = accepted_paths(B, N, depth, kind == "chain", gen)
            moved = int((path[:, :depth] != torch.arange(depth)).sum())  # non-identity steps
            gbytes = 2 * 2 * moved * L * H * Dh * k.element_size() / 1e9  # K and V, read + write
            path, accept_len = path.to(dev), accept_len.to(dev)
            lens0 = torch.full((B,), 8, dtype=torch.int32, device=dev)
            lens = lens0.clone()

            def fn():
                lens.copy_(lens0)  # keep the same positions on every call
                compact_kv(k, v, lens, path, accept_len, validate=False)

            def eager():
                lens.copy_(lens0)
                eager_compact(k, v, lens, path, accept_len)

            # the baseline computes the same thing
            k1, v1, l1, k2, v2, l2 = k.clone(), v.clone(), lens0.clone(), k.clone(), v.clone(), lens0.clone()
            compact_kv(k1, v1, l1, path, accept_len)
            eager_compact(k2, v2, l2, path, accept_len)
            assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(l1, l2)
            del k1, v1, k2, v2
            shape = f"{kind} L={L} B={B} Hk={H} Dh={Dh} N={N} accept={depth}"
            eager_us = time_fn(eager, dev, **kw)
            rec.add("compact_kv", "torch_eager", shape, "bf16", eager_us)
            rec.add("compact_kv", "kangaroo", shape, "bf16", time_fn(fn, dev, **kw), gbytes=gbytes, eager_us=eager_us)
            g_us = time_graph(fn, dev)
            if g_us is not None:
                rec.add("compact_kv", "kangaroo+graph", shape, "bf16", g_us, gbytes=gbytes, eager_us=eager_us)
    rec.finish()


if __name__ == "__main__":
    main()
