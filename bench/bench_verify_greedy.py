"""Benchmark verify_greedy (native op) against a PyTorch-eager implementation.

Chain N=6 and a random tree N=64, V in {32000, 128256, 152064}, B in {1, 8}, bf16 logits. GB/s counts the logits
bytes the native op actually reads: all B*(N+1) rows in its "full" mode, only the rows on the accepted paths in
its "lazy" mode (the plan in csrc/include/kangaroo/verify_greedy.cuh; the mode is part of the shape string).

  python bench/bench_verify_greedy.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _common import Recorder, bench_device, time_fn, time_graph  # noqa: E402

from kangaroo_kernels.verify_greedy import verify_greedy  # noqa: E402

LAZY_BYTES = 32 << 20  # kLazyBytes of the CUDA plan


def tree_parents(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """Random trees shaped like top-k drafting: each node hangs under one of the 8 most recent nodes."""
    rows = []
    for _ in range(B):
        rows.append([-1 if j < 4 else int(torch.randint(max(-1, j - 8), j, (1,), generator=gen)) for j in range(N)])
    return torch.tensor(rows, dtype=torch.int32)


def planted_drafts(target_tok, parents, p_match, gen):
    B, N1 = target_tok.shape
    N = N1 - 1
    par = parents.long() if parents is not None else (torch.arange(N) - 1).expand(B, N)
    want = torch.gather(target_tok, 1, par + 1)
    hit = torch.rand((B, N), generator=gen) < p_match
    return torch.where(hit, want, (want + 1) % 1000).to(torch.int32)


def eager_verify(draft, logits, parents, max_depth):
    """The straightforward PyTorch version: argmax of every row, then a vectorised walk."""
    B, N = draft.shape
    tgt = logits.argmax(-1).to(torch.int32)  # [B, N+1]
    ar = torch.arange(B, device=draft.device)
    if parents is None:
        match = (draft == tgt[:, :N]).int()
        accept_len = match.cumprod(1).sum(1)
        path = torch.where(torch.arange(N + 1, device=draft.device) < accept_len[:, None],
                           torch.arange(N + 1, device=draft.device), -1)
        return accept_len, path, tgt[ar, accept_len]
    cur = torch.full((B,), -1, dtype=torch.long, device=draft.device)
    alive = torch.ones(B, dtype=torch.bool, device=draft.device)
    accept_len = torch.zeros(B, dtype=torch.long, device=draft.device)
    path = torch.full((B, N + 1), -1, dtype=torch.long, device=draft.device)
    for _ in range(max_depth):
        tok = tgt[ar, cur + 1]
        ok = (parents == cur[:, None]) & (draft == tok[:, None]) & alive[:, None]
        has = ok.any(1)
        child = ok.int().argmax(1)
        path[ar, accept_len] = torch.where(has, child, path[ar, accept_len])
        accept_len += has.long()
        cur = torch.where(has, child, cur)
        alive &= has
    return accept_len, path, tgt[ar, cur + 1]


def main():
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    kw = {} if on_gpu else {"warmup": 1, "iters": 3, "max_seconds": 0.5}
    rec = Recorder("bench_verify_greedy", dev)
    gen = torch.Generator().manual_seed(0)
    for kind, N in (("chain", 6), ("tree", 64)):
        for V in (32000, 128256, 152064):
            for B in (1, 8):
                logits = torch.randn((B, N + 1, V), generator=gen).to(torch.bfloat16)
                tgt = logits.float().argmax(-1)
                parents = tree_parents(B, N, gen) if kind == "tree" else None
                draft = planted_drafts(tgt, parents, 0.8, gen)
                max_depth = N if parents is None else int(_depth(parents).max())
                logits, draft = logits.to(dev), draft.to(dev)
                parents = parents.to(dev) if parents is not None else None
                acc = verify_greedy(draft, logits, parents=parents)
                e_len, e_path, e_tok = eager_verify(draft, logits, parents, max_depth)  # same answer
                assert torch.equal(e_len.int(), acc.accept_len) and torch.equal(e_path.int(), acc.path)
                assert torch.equal(e_tok.int(), acc.tokens[torch.arange(B, device=dev), acc.accept_len.long()])
                row_bytes = V * logits.element_size()
                lazy = on_gpu and B * (N + 1) * row_bytes > LAZY_BYTES
                rows_read = int((acc.accept_len + 1).sum()) if lazy else B * (N + 1)
                if not on_gpu:  # the CPU twin reads only the visited rows
                    rows_read = int((acc.accept_len + 1).sum())
                gbytes = rows_read * row_bytes / 1e9
                shape = f"{kind} B={B} N={N} V={V} {'lazy' if lazy else 'full' if on_gpu else 'cpu'}"
                fn = lambda: verify_greedy(draft, logits, parents=parents, out=acc, validate=False)  # noqa: E731
                eager_us = time_fn(lambda: eager_verify(draft, logits, parents, max_depth), dev, **kw)
                rec.add("verify_greedy", "torch_eager", shape, "bf16", eager_us)
                rec.add("verify_greedy", "kangaroo", shape, "bf16", time_fn(fn, dev, **kw), gbytes=gbytes,
                        eager_us=eager_us)
                g_us = time_graph(fn, dev)
                if g_us is not None:
                    rec.add("verify_greedy", "kangaroo+graph", shape, "bf16", g_us, gbytes=gbytes, eager_us=eager_us)
    rec.finish()


def _depth(parents: torch.Tensor) -> torch.Tensor:
    d = torch.zeros_like(parents)
    for j in range(parents.shape[1]):
        p = parents[:, j].long()
        d[:, j] = torch.where(p >= 0, d.gather(1, p.clamp(min=0)[:, None])[:, 0] + 1, 1)
    return d


if __name__ == "__main__":
    main()
