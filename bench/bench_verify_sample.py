"""Benchmark verify_sample: the native op (CUDA kernel on GPU, C++ twin on CPU) vs PyTorch eager (softmax, top-k /
top-p filtering of each visited node's row, and a Python walk with host syncs), chain N=6 and tree N=64,
V = 32000 / 152064, B = 1 / 8. Deterministic drafts (one-hot q), T = 0.7, top-p = 0.9.

The bandwidth floor counts the logits rows the walk must read: (accept_len + 1) rows of V per batch row.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import Recorder, bench_device, time_fn, time_graph  # noqa: E402

from kangaroo_kernels.verify_sample import verify_sample  # noqa: E402

TEMPERATURE, TOP_K, TOP_P = 0.7, 0, 0.9


def _case(B, N, V, tree, dtype, device, seed=0):
    """Logits with a planted likely draft per node (its logit raised above the parent row's maximum)."""
    gen = torch.Generator().manual_seed(seed)
    parents = None
    par = torch.arange(-1, N - 1).expand(B, N)
    if tree:  # 8 children per node, breadth first
        parents = torch.tensor([[-1 if j < 8 else (j - 8) // 8 for j in range(N)]] * B)
        par = parents
    logits = torch.randn(B, N + 1, V, generator=gen) * 2
    draft = torch.randint(0, V, (B, N), generator=gen)
    for b in range(B):
        for c in range(N):
            if c % 8 == 0 or not tree:  # the first child of each node is the likely one
                row = logits[b, par[b, c] + 1]
                row[draft[b, c]] = row.max() + 3.0
    return (draft.to(device), logits.to(dtype=dtype, device=device),
            None if parents is None else parents.to(device))


def _eager_probs(row, temperature, top_k, top_p):
    z = row.float() / temperature
    if 0 < top_k < z.numel():
        z = z.masked_fill(z < torch.topk(z, top_k).values[-1], float("-inf"))
    p = torch.softmax(z, -1)
    if top_p < 1.0:
        sp, idx = torch.sort(p, descending=True)
        drop = (torch.cumsum(sp, 0) - sp) >= top_p
        p = p.index_fill(0, idx[drop], 0.0)
    return p / p.sum()


def _eager(draft, logits, parents, uniforms, temperature, top_k, top_p):
    """The straightforward PyTorch implementation: per batch row, per visited node, filter then test."""
    B, N = draft.shape
    d, u = draft.tolist(), uniforms.tolist()
    par = parents.tolist() if parents is not None else [[c - 1 for c in range(N)]] * B
    out = []
    for b in range(B):
        v, toks = -1, []
        while True:
            p = _eager_probs(logits[b, v + 1], temperature, top_k, top_p)
            nxt = None
            for c in range(v + 1, N):
                if par[b][c] != v or d[b][c] < 0:
                    continue
                x = d[b][c]
                if u[b][c] < p[x].item():
                    nxt = c
                    break
                p[x] = 0.0
                p = p / p.sum()
            if nxt is None:
                cs = torch.cumsum(p, 0)
                toks.append(int(torch.searchsorted(cs, cs[-1:] * u[b][N]).clamp_max(p.numel() - 1)))
                break
            toks.append(d[b][nxt])
            v = nxt
        out.append(toks)
    return out


def main():
    device = bench_device()
    rec = Recorder("verify_sample", device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    on_gpu = device.type == "cuda"
    for tree, N in ((False, 6), (True, 64)):
        for V in (32000, 152064):
            for B in (1, 8):
                draft, logits, parents = _case(B, N, V, tree, dtype, device)
                seed = torch.arange(B, device=device) + 1
                offset = torch.zeros(B, dtype=torch.int64, device=device)
                u = torch.rand(B, N + 1, generator=torch.Generator().manual_seed(1)).clamp(1e-6, 1 - 1e-6)
                kw = dict(parents=parents, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, validate=False)

                def native():
                    return verify_sample(draft, logits, seed=seed, offset=offset, **kw)

                res = native()
                rows_read = int((res.accept_len.long() + 1).sum())
                gbytes = rows_read * V * logits.element_size() / 1e9
                shape = f"{'tree' if tree else 'chain'} B={B} N={N} V={V} acc={rows_read / B - 1:.1f}"
                warm, iters = (10, 50) if on_gpu else (1, 5)
                eager_us = time_fn(lambda: _eager(draft, logits, parents, u, TEMPERATURE, TOP_K, TOP_P), device,
                                   warmup=warm, iters=iters)
                rec.add("verify_sample", "torch_eager", shape, str(dtype).replace("torch.", ""), eager_us,
                        gbytes=gbytes)
                native_us = time_fn(native, device, warmup=warm, iters=iters)
                rec.add("verify_sample", "native", shape, str(dtype).replace("torch.", ""), native_us,
                        gbytes=gbytes, eager_us=eager_us)
                graph_us = time_graph(native, device)
                if graph_us is not None:
                    rec.add("verify_sample", "native+cuda_graph", shape, str(dtype).replace("torch.", ""), graph_us,
                            gbytes=gbytes, eager_us=eager_us)
    rec.finish()


if __name__ == "__main__":
    main()
