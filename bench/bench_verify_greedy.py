"""Benchmark verify_greedy (native op: CUDA kernel on GPU, C++ twin on CPU) against same-run baselines.

Shapes: batch 1, 4, 16, 64 x the vocabularies of Vicuna-7B (V=32000), Llama-3-8B (128256) and Qwen2.5-7B (152064),
a chain of N=6 drafts and a random tree of N=64 nodes (each node under one of the 8 most recent ones, like top-k
drafting), bf16 logits, 80 % of the drafts planted to match; plus a draft-length sweep at V=32000 (chain N=1..8,
tree N=16/32). Headline shapes (--quick on GPU, and the only ones with a torch.compile baseline): V=32000,
B=1 and B=16, chain 6 and tree 64.

Impls, all in this run on the same inputs:
  torch-eager     argmax of every row, then a vectorised walk (cumprod for a chain, a depth loop for a tree)
  torch-compile   torch.compile of torch-eager (headline shapes)
  kangaroo        the op, eager launches (CUDA events per call, launch overhead included)
  kangaroo+graph  the op replayed from a CUDA graph (launch overhead removed)
  sglang-layout   SGLang's verify_tree_greedy layout: target_predict = torch.argmax over every row first, then a
                  walk over tokens (our op in tokens mode stands in for sgl_kernel, which we cannot install), graph
  kangaroo-tokens the tokens-mode walk alone (the part sgl_kernel.verify_tree_greedy does), graph
Published context (not measured here): SGLang tree verify 17-38 us at B=1 (as quoted in issue 6).

Bytes: the logits rows each impl reads: all B*(N+1) rows (eager, sglang-layout, the op's "full" plan) or only the
rows on the accepted paths (the op's "lazy" plan for > 32 MB of logits, csrc/include/kangaroo/verify_greedy.cuh;
the CPU twin is always lazy). Inputs rotate over enough sets to exceed L2 (> 64 MB).

  python bench/bench_verify_greedy.py [--quick] [--no-compile] [--budget-s S]
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

from kangaroo_kernels.ops.verify_greedy import verify_greedy  # noqa: E402

LAZY_BYTES = 32 << 20  # kLazyBytes of the CUDA plan
MODELS = {"vicuna-7b": 32000, "llama-3-8b": 128256, "qwen2.5-7b": 152064}
BATCHES = (1, 4, 16, 64)


def tree_parents(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """Random trees shaped like top-k drafting: 4 root children, then each node under one of the 8 most recent."""
    j = torch.arange(N)
    back = (torch.rand((B, N), generator=gen) * j.clamp(max=8)).long() + 1  # in [1, min(8, j)]
    return torch.where(j < 4, -1, j - back).to(torch.int32)


def tree_depth(parents: torch.Tensor) -> torch.Tensor:
    d = torch.zeros_like(parents)
    for j in range(parents.shape[1]):
        p = parents[:, j].long()
        d[:, j] = torch.where(p >= 0, d.gather(1, p.clamp(min=0)[:, None])[:, 0] + 1, 1)
    return d


def planted_drafts(target_tok: torch.Tensor, parents, p_match: float, V: int, gen) -> torch.Tensor:
    """Drafts equal to the target's argmax at their parent with probability p_match, else a wrong token."""
    B, N1 = target_tok.shape
    N = N1 - 1
    dev = target_tok.device
    par = parents.long() if parents is not None else (torch.arange(N, device=dev) - 1).expand(B, N)
    want = torch.gather(target_tok, 1, par + 1)
    hit = torch.rand((B, N), generator=gen).to(dev) < p_match
    return torch.where(hit, want, (want + 1) % V).to(torch.int32)


def eager_verify(draft, logits, parents, max_depth: int):
    """The straightforward PyTorch version: argmax of every row, then a vectorised walk (no host sync)."""
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


def cases(on_gpu: bool, quick: bool):
    """(kind, N, model, V, B, headline), headline shapes first."""
    if not on_gpu:  # CPU: small vocabularies, seconds in all
        Vs = {"tiny-v1000": 1000} if quick else {"tiny-v1000": 1000, "vicuna-7b": 32000}
        for kind, N in (("chain", 6), ("tree", 16 if quick else 64)):
            for m, V in Vs.items():
                for B in ((1, 4) if quick else (1, 4, 16)):
                    yield kind, N, m, V, B, B == 1
        return
    for kind, N in (("chain", 6), ("tree", 64)):
        for B in (1, 16):
            yield kind, N, "vicuna-7b", 32000, B, True
    if quick:
        return
    for kind, N in (("chain", 6), ("tree", 64)):
        for m, V in MODELS.items():
            for B in BATCHES:
                if not (m == "vicuna-7b" and B in (1, 16)):
                    yield kind, N, m, V, B, False
    for kind, Ns in (("chain", (1, 2, 4, 8)), ("tree", (16, 32))):
        for N in Ns:
            for B in (1, 16):
                yield kind, N, "vicuna-7b", 32000, B, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    rec = Recorder("verify_greedy", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator().manual_seed(0)
    dgen = torch.Generator(device=dev).manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    dtype = torch.bfloat16
    for kind, N, model, V, B, headline in cases(on_gpu, args.quick):
        shape = f"{kind} {model} B={B} N={N} V={V}"
        if rec.out_of_time(shape, reserve=5.0):
            continue
        row_bytes = V * 2
        n = n_input_sets(B * (N + 1) * row_bytes, dev)
        sets = []
        for _ in range(n):
            logits = torch.randn((B, N + 1, V), generator=dgen, device=dev, dtype=dtype)
            parents = tree_parents(B, N, gen).to(dev) if kind == "tree" else None
            draft = planted_drafts(logits.argmax(-1), parents, 0.8, V, gen)
            sets.append((draft, logits, parents))
        max_depth = N if kind == "chain" else max(int(tree_depth(s[2].cpu()).max()) for s in sets)
        accs = [verify_greedy(d, lg, parents=p) for d, lg, p in sets]  # validated once, outside timing
        tok_sets = [lg.argmax(-1).to(torch.int32) for _, lg, _ in sets]
        tok_out = [verify_greedy(d, t, parents=p) for (d, _, p), t in zip(sets, tok_sets)]

        d0, lg0, p0 = sets[0]
        e_len, e_path, e_tok = eager_verify(d0, lg0, p0, max_depth)
        a0 = accs[0]
        note = agree(torch.equal(e_len.int(), a0.accept_len) and torch.equal(e_path.int(), a0.path)
                     and torch.equal(e_tok.int(), a0.tokens[torch.arange(B, device=dev), a0.accept_len.long()]),
                     f"eager vs op, {shape}", dev)
        note += agree(torch.equal(tok_out[0].tokens, a0.tokens), f"tokens mode vs logits mode, {shape}", dev)

        all_bytes = B * (N + 1) * row_bytes
        path_rows = int((a0.accept_len + 1).sum())
        lazy = (not on_gpu) or all_bytes > LAZY_BYTES
        op_bytes = path_rows * row_bytes if lazy else all_bytes
        plan = "lazy" if lazy else "full"
        acc_mean = path_rows / B - 1

        eager_t = time_rotating(lambda i: eager_verify(*sets[i], max_depth), n, dev, **it)
        rec.add("verify_greedy", "torch-eager", shape, "bf16", eager_t, bytes_moved=all_bytes, batch=B,
                note=note)
        if want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_verify, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, *sets[0], max_depth)
                if secs is not None:
                    t = time_rotating(lambda i: compiled(*sets[i], max_depth), n, dev, **it)
                    rec.add("verify_greedy", "torch-compile", shape, "bf16", t, bytes_moved=all_bytes, batch=B,
                            note=f"compile {secs:.1f} s")

        def op(i):
            d, lg, p = sets[i]
            return verify_greedy(d, lg, parents=p, out=accs[i], validate=False)

        def op_tokens(i):
            d, _, p = sets[i]
            return verify_greedy(d, tok_sets[i], parents=p, out=tok_out[i], validate=False)

        def sglang_layout(i):
            d, lg, p = sets[i]
            return verify_greedy(d, torch.argmax(lg, dim=-1), parents=p, out=tok_out[i], validate=False)

        note_op = f"{plan} plan, mean accepted {acc_mean:.2f}"
        rec.add("verify_greedy", "kangaroo", shape, "bf16", time_rotating(op, n, dev, **it), bytes_moved=op_bytes,
                batch=B, note=note_op)
        if on_gpu:
            rec.add("verify_greedy", "kangaroo+graph", shape, "bf16", time_rotating(op, n, dev, graph=True, **it),
                    bytes_moved=op_bytes, batch=B, note=note_op)
        sg = time_rotating(sglang_layout, n, dev, graph=on_gpu, **it)
        rec.add("verify_greedy", "sglang-layout" + ("+graph" if on_gpu else ""), shape, "bf16", sg,
                bytes_moved=all_bytes, batch=B, note="torch.argmax of all rows, then a walk over tokens")
        rec.add("verify_greedy", "kangaroo-tokens" + ("+graph" if on_gpu else ""), shape, "int32",
                time_rotating(op_tokens, n, dev, graph=on_gpu, **it), bytes_moved=B * (N + 1) * 4 * 2, batch=B,
                note="walk over target tokens only (what sgl_kernel.verify_tree_greedy does)")
    rec.finish()


if __name__ == "__main__":
    main()
