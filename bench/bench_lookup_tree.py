"""Benchmark merge_lookup_tree (native op: one CUDA thread per row on GPU, its C++ twin on CPU) against the
same-run pure-torch formulation it replaced.

Shapes: the decoder's cycle trees, B = 1, 16, 64, 256 rows: chain γ = 6 with M = 4 and 8 lookup tokens, and the
tree layout γ = 4, K = 2 (N = 8) with M = 8. Drafts over a vocabulary of 4 so that the lookup shares 0..N nodes;
n_look uniform in 0..M. Headline (--quick on GPU): chain M = 4 at B = 1 and 64. --quick on CPU: chain, B = 1, 16.

Impls, all in this run on the same inputs:
  torch-eager     the pure-torch formulation (chain: cumulative products, ~40 ops; tree: pointer jumping,
                  ~140 ops), which the op used before the native kernel
  torch-compile   torch.compile of torch-eager (GPU, headline shapes)
  kangaroo        merge_lookup_tree(validate=False), eager launches (CUDA events per call; perf_counter on CPU)
  kangaroo+graph  the op replayed from a CUDA graph (GPU)

No bytes floor: a few hundred bytes a row, launch- or latency-bound at every shape.

  python bench/bench_lookup_tree.py [--quick] [--no-compile] [--budget-s S]
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

from kangaroo_kernels.ops.lookup_tree import merge_lookup_tree  # noqa: E402
from kangaroo_kernels.types import LookupTree  # noqa: E402

BATCHES = (1, 16, 64, 256)
VOCAB = 4


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.clamp(min=0))


def eager_merge(draft: torch.Tensor, look: torch.Tensor, n_look: torch.Tensor, parents):
    """merge_lookup_tree's result for int32 inputs with valid parents (or None: a chain), in torch ops only."""
    B, N = draft.shape
    M = look.shape[1]
    dev = draft.device
    i32 = torch.int32
    j = torch.arange(M, device=dev, dtype=i32)
    live = look >= 0
    if n_look is not None:
        live &= j < n_look[:, None]
    live = torch.cumprod(live, 1, dtype=i32) > 0  # the live lookup ends at its first absent entry
    i = torch.arange(N, device=dev, dtype=i32)
    if parents is None:
        base_par = (i - 1).expand(B, N)
        K = min(N, M)
        # chain node k is shared iff draft[:k+1] == look[:k+1] on live entries (live ids are >= 0)
        hit = (draft[:, :K] == look[:, :K]) & live[:, :K]
        n_shared = torch.cumprod(hit, 1, dtype=i32).sum(1, dtype=i32)
        on_look = i < n_shared[:, None]
        last_shared = n_shared - 1  # the chain node where the prefix last agreed (-1: the root)
        shared_nodes = j.expand(B, M)
    else:
        base_par = parents
        d = draft.long()
        lk = torch.where(live, look.long(), -1)
        par = parents.long()
        il = i.long()
        par_ok = (par >= -1) & (par < il)
        par = torch.where(par_ok, par, -1)
        rounds = max(0, (N - 1).bit_length())
        # depth by pointer jumping
        depth = torch.ones((B, N), dtype=torch.long, device=dev)
        jump = par
        for _ in range(rounds):
            has = jump >= 0
            depth, jump = depth + torch.where(has, _gather(depth, jump), 0), torch.where(has, _gather(jump, jump), -1)
        # a sibling with the same token and a lower index is the one the verifier (and the walk) takes
        same = (par[:, :, None] == par[:, None, :]) & (d[:, :, None] == d[:, None, :])
        dominated = (same & par_ok[:, None, :] & (il[None, :] < il[:, None])[None]).any(2)
        want = _gather(lk, (depth - 1).clamp(max=M - 1))  # the lookup token of the node's depth
        ok = (d >= 0) & par_ok & ~dominated & (depth <= M) & (d == want)
        # shared iff ok on every ancestor-or-self: AND along the parent chain by pointer jumping
        jump = par
        for _ in range(rounds):
            has = jump >= 0
            ok, jump = ok & (~has | _gather(ok, jump)), torch.where(has, _gather(jump, jump), -1)
        on_look = ok
        # the shared nodes have distinct depths 1..n_shared: lookup token depth - 1 is that node (slot M: others)
        slots = torch.full((B, M + 1), -1, dtype=torch.long, device=dev)
        slots.scatter_(1, torch.where(on_look, depth - 1, M), il.expand(B, N))
        shared_nodes = slots[:, :M].to(i32)
        n_shared = (shared_nodes >= 0).sum(1, dtype=i32)
        last_shared = torch.gather(shared_nodes, 1, (n_shared - 1).clamp(min=0)[:, None].long())[:, 0]
        last_shared = torch.where(n_shared > 0, last_shared, -1)
    ns = n_shared[:, None]
    private = live & (j >= ns)
    look_par = torch.where(j == ns, last_shared[:, None], N - 1 + j)
    return LookupTree(
        torch.cat([draft.to(i32), torch.where(private, look, -1).to(i32)], 1),
        torch.cat([base_par.to(i32), torch.where(private, look_par, -1)], 1),
        torch.cat([(draft >= 0).to(i32) + 2 * on_look.to(i32), 2 * private.to(i32)], 1),
        n_shared,
        torch.where(j < ns, shared_nodes, torch.where(private, N + j, -1)),
    )


def tree_parents(gamma: int, K: int):
    """The decoder's tree layout (kangaroo.state.TreeLayout): chain 0..γ-1, then K-1 leaf siblings a step."""
    return list(range(-1, gamma - 1)) + [i - 1 for i in range(gamma) for _ in range(K - 1)]


def make_inputs(kind: str, B: int, M: int, gen: torch.Generator, dev):
    N = 6 if kind == "chain" else 8
    draft = torch.randint(0, VOCAB, (B, N), generator=gen).to(torch.int32)
    look = torch.randint(0, VOCAB, (B, M), generator=gen).to(torch.int32)
    n_look = torch.randint(0, M + 1, (B,), generator=gen).to(torch.int32)
    parents = None if kind == "chain" else torch.tensor([tree_parents(4, 2)] * B, dtype=torch.int32).to(dev)
    return draft.to(dev), look.to(dev), n_look.to(dev), parents


def cases(on_gpu: bool, quick: bool):
    """(kind, B, M, headline), headline first."""
    if quick and not on_gpu:
        yield from (("chain", 1, 4, True), ("chain", 16, 4, False))
        return
    yield from (("chain", 1, 4, True), ("chain", 64, 4, True))
    if quick:
        return
    for kind, M in (("chain", 4), ("chain", 8), ("tree", 8)):
        for B in BATCHES:
            if not (kind == "chain" and M == 4 and B in (1, 64)):
                yield kind, B, M, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    rec = Recorder("merge_lookup_tree", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator().manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    for kind, B, M, headline in cases(on_gpu, args.quick):
        N = 6 if kind == "chain" else 8
        shape = f"{kind} B={B} N={N} M={M}"
        if rec.out_of_time(shape, reserve=5.0):
            continue
        n = n_input_sets(B * (N + M) * 4 * 4, dev, max_sets=16)
        sets = [make_inputs(kind, B, M, gen, dev) for _ in range(n)]
        got = merge_lookup_tree(*sets[0][:2], n_look=sets[0][2], parents=sets[0][3])
        want = eager_merge(*sets[0])
        note = agree(all(torch.equal(g, w) for g, w in zip(got, want)), f"eager vs op, {shape}", dev)
        shared = f"mean shared {got.n_shared.float().mean().item():.2f} of N = {N}"

        def op(i):
            d, lk, nl, par = sets[i]
            return merge_lookup_tree(d, lk, n_look=nl, parents=par, validate=False)

        rec.add("merge_lookup_tree", "torch-eager", shape, "int32", time_rotating(lambda i: eager_merge(*sets[i]),
                                                                                   n, dev, **it), batch=B, note=note)
        if want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_merge, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, *sets[0])
                if secs is not None:
                    t = time_rotating(lambda i: compiled(*sets[i]), n, dev, **it)
                    rec.add("merge_lookup_tree", "torch-compile", shape, "int32", t, batch=B,
                            note=f"compile {secs:.1f} s")
        rec.add("merge_lookup_tree", "kangaroo", shape, "int32", time_rotating(op, n, dev, **it), batch=B,
                note=shared)
        if on_gpu:
            rec.add("merge_lookup_tree", "kangaroo+graph", shape, "int32", time_rotating(op, n, dev, graph=True, **it),
                    batch=B, note=shared)

    rec.finish()


if __name__ == "__main__":
    main()
