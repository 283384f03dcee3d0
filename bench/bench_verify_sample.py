"""Benchmark verify_sample (lossless speculative sampling; native op: CUDA kernel, one CTA per row, or the C++ twin
on CPU) against same-run baselines.

Shapes: batch 1, 4, 16, 64 x the vocabularies of Vicuna-7B (V=32000), Llama-3-8B (128256), Qwen2.5-7B (152064),
a chain of N=6 deterministic drafts (one-hot q) and a tree of N=64 (8 children per node, breadth first), bf16
logits, T=0.7, top-p=0.9 (the likely child of each node planted). Plus FlashInfer's configuration: a chain of n=5
*sampled* drafts with their draft probabilities q [B, n, V] (fp32), T=1, no filtering, V=32000.
Headline shapes (--quick on GPU; the only ones with a torch.compile baseline): V=32000, B=1 and B=16.

Impls, all in this run on the same inputs:
  torch-eager     the vectorised PyTorch composition: softmax of every row (temperature, top-k, top-p by sort),
                  per-node acceptance tests (siblings renormalised), a depth loop for the walk, inverse-CDF sample
                  of the residual; no host sync
  torch-compile   torch.compile of torch-eager (headline shapes)
  kangaroo        the op with Philox seed/offset (eager launches, CUDA events per call)
  kangaroo+graph  the same replayed from a CUDA graph
  fi-layout-prologue  only the torch.softmax that FlashInfer's chain_speculative_sampling needs before its kernel
                  (it takes target probabilities, not logits); context for the published figure below
Published context (not measured here): FlashInfer chain sampling 27 us at B=16, n=5, V=32k on B200 (issue 6).

Bytes: the op reads the target rows its walk visits ((accept_len + 1) rows of V, counted once) and, with
draft_probs, the matching q rows; the eager composition reads every row (counted once, though it makes several
passes). Inputs rotate over enough sets to exceed L2 (> 64 MB).

  python bench/bench_verify_sample.py [--quick] [--no-compile] [--budget-s S]
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

from kangaroo_kernels.ops.verify_sample import verify_sample  # noqa: E402

MODELS = {"vicuna-7b": 32000, "llama-3-8b": 128256, "qwen2.5-7b": 152064}
BATCHES = (1, 4, 16, 64)
FILTERED = dict(temperature=0.7, top_k=0, top_p=0.9)
FLASHINFER = dict(temperature=1.0, top_k=0, top_p=1.0)


def make_case(B, N, V, tree, sampled, dtype, device, gen):
    """(draft [B,N] i32, logits [B,N+1,V], parents or None, q [B,N,V] fp32 or None, uniforms [B,N+1] f64).
    The first child of each node gets a logit above its parent row's maximum (a likely draft)."""
    logits = torch.randn(B, N + 1, V, generator=gen, device=device, dtype=torch.float32) * 2
    parents = None
    par = torch.arange(-1, N - 1, device=device).expand(B, N)
    if tree:  # 8 children per node, breadth first
        parents = torch.tensor([[-1 if j < 8 else (j - 8) // 8 for j in range(N)]] * B, device=device,
                               dtype=torch.int32)
        par = parents.long()
    draft = torch.randint(0, V, (B, N), generator=gen, device=device)
    likely = (torch.arange(N, device=device) % 8 == 0) if tree else torch.ones(N, dtype=torch.bool, device=device)
    rows = logits.gather(1, (par + 1)[:, :, None].expand(B, N, V))  # parent row of each node
    boost = rows.amax(-1) + 3.0
    b_idx, c_idx = likely.expand(B, N).nonzero(as_tuple=True)
    logits[b_idx, (par + 1)[b_idx, c_idx], draft[b_idx, c_idx]] = boost[b_idx, c_idx]
    q = None
    if sampled:  # draft distribution: a softened copy of the target's parent row, draft token likely under it
        q = torch.softmax(rows * 0.8, -1).contiguous()
    u = torch.rand(B, N + 1, generator=gen, device=device, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return draft.to(torch.int32), logits.to(dtype), parents, q, u


def filtered_probs(logits, temperature: float, top_k: int, top_p: float):
    """softmax(logits / T) with top-k then top-p (sort based, ties at the threshold kept), renormalised."""
    z = logits.float() / temperature
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, -1)
    if top_p < 1.0:
        sp, _ = torch.sort(p, dim=-1, descending=True)
        before = torch.cumsum(sp, -1) - sp
        keep_n = (before < top_p).sum(-1, keepdim=True)  # tokens needed to reach top_p
        thresh = sp.gather(-1, keep_n - 1)
        p = torch.where(p >= thresh, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return p


def eager_sample(draft, logits, parents, q, u, temperature: float, top_k: int, top_p: float, max_depth: int):
    """Vectorised speculative sampling, no host sync. Returns (accept_len [B], final token [B])."""
    B, N = draft.shape
    V = logits.shape[-1]
    dev = draft.device
    p = filtered_probs(logits, temperature, top_k, top_p)  # [B, N+1, V]
    par = parents.long() if parents is not None else (torch.arange(N, device=dev) - 1).expand(B, N)
    valid = (draft >= 0) & (draft < V)
    x = draft.long().clamp(0, V - 1)
    ar = torch.arange(B, device=dev)
    pn = p[ar[:, None], par + 1, x]  # [B, N]: p_parent(c)(x_c)
    if q is None:  # one-hot q: after rejected siblings s < c, n = 1 - sum p(x_s), r(x_c) = p(x_c)
        c = torch.arange(N, device=dev)
        same = (par[:, :, None] == par[:, None, :]) & (c[None, None, :] < c[None, :, None])
        prior = torch.bmm((same & valid[:, None, :]).float(), pn[:, :, None])[..., 0]
        test = u[:, :N] * (1.0 - prior).clamp_min(0) < pn
        qn = None
    else:  # sampled drafts (chain): accept iff u * q(x) < p(x)
        qn = q.gather(2, x[:, :, None])[..., 0]
        test = u[:, :N] * qn < pn
    test &= valid
    cur = torch.full((B,), -1, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    accept_len = torch.zeros(B, dtype=torch.long, device=dev)
    for _ in range(max_depth):
        ok = (par == cur[:, None]) & test & alive[:, None]
        has = ok.any(1)
        cur = torch.where(has, ok.int().argmax(1), cur)
        accept_len += has.long()
        alive &= has
    r = p[ar, cur + 1]  # the stop node's target row
    kids = (par == cur[:, None]) & valid
    if q is None:  # every child was tried and rejected: zero their tokens
        cnt = torch.zeros(B, V, device=dev).scatter_add_(1, x, kids.float())
        r = torch.where(cnt > 0, torch.zeros_like(r), r)
    else:  # chain: residual max(0, p - q) of the rejected child, if any
        child = (cur + 1).clamp(max=N - 1)
        rejected = kids[ar, child]
        r = torch.where(rejected[:, None], (r - q[ar, child]).clamp_min(0), r)
    cs = torch.cumsum(r.double(), -1)
    tok = torch.searchsorted(cs, (u[:, N] * cs[:, -1])[:, None].contiguous(), right=True)[:, 0].clamp(max=V - 1)
    return accept_len, tok


def cases(on_gpu: bool, quick: bool):
    """(label, kind, N, model, V, B, sampled, headline), headline shapes first."""
    if not on_gpu:
        V = 1000
        for B in (1, 4):
            yield "filtered", "chain", 6, "tiny-v1000", V, B, False, B == 1
            yield "filtered", "tree", 16 if quick else 64, "tiny-v1000", V, B, False, B == 1
        yield "flashinfer-cfg", "chain", 5, "tiny-v1000", V, 2, True, False
        return
    for B in (1, 16):
        yield "filtered", "chain", 6, "vicuna-7b", 32000, B, False, True
        yield "flashinfer-cfg", "chain", 5, "vicuna-7b", 32000, B, True, True
        yield "filtered", "tree", 64, "vicuna-7b", 32000, B, False, True
    if quick:
        return
    for B in (4, 64):
        yield "flashinfer-cfg", "chain", 5, "vicuna-7b", 32000, B, True, False
    for kind, N in (("chain", 6), ("tree", 64)):
        for m, V in MODELS.items():
            for B in BATCHES:
                if not (m == "vicuna-7b" and B in (1, 16)):
                    yield "filtered", kind, N, m, V, B, False, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    rec = Recorder("verify_sample", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dname = "bf16" if on_gpu else "fp32"
    it = dict(iters=args.iters) if args.iters else {}
    for label, kind, N, model, V, B, sampled, headline in cases(on_gpu, args.quick):
        shape = f"{label} {kind} {model} B={B} N={N} V={V}"
        if rec.out_of_time(shape, reserve=5.0):
            continue
        cfg = FLASHINFER if sampled else FILTERED
        elt = torch.finfo(dtype).bits // 8
        set_bytes = B * (N + 1) * V * elt + (B * N * V * 4 if sampled else 0)
        n = n_input_sets(set_bytes, dev)
        sets = [make_case(B, N, V, kind == "tree", sampled, dtype, dev, gen) for _ in range(n)]
        max_depth = N if kind == "chain" else 2  # the tree has depth 2 (8 + 56 nodes)
        seeds = [torch.arange(B, device=dev, dtype=torch.int64) + 1 + 1000 * i for i in range(n)]
        offsets = [torch.zeros(B, dtype=torch.int64, device=dev) for _ in range(n)]
        outs = [verify_sample(d, lg, draft_probs=q, parents=p, uniforms=u, **cfg) for d, lg, p, q, u in sets]

        d0, lg0, p0, q0, u0 = sets[0]
        e_len, e_tok = eager_sample(d0, lg0, p0, q0, u0, max_depth=max_depth, **cfg)
        note = agree(torch.equal(e_len.int(), outs[0].accept_len), f"eager vs op accept_len, {shape}", dev)
        rows_read = int((outs[0].accept_len.long() + 1).sum())
        op_bytes = rows_read * V * elt + (rows_read * V * 4 if sampled else 0)
        all_bytes = set_bytes
        acc = f"mean accepted {rows_read / B - 1:.2f}"

        def eager(i):
            d, lg, p, q, u = sets[i]
            return eager_sample(d, lg, p, q, u, max_depth=max_depth, **cfg)

        rec.add("verify_sample", "torch-eager", shape, dname, time_rotating(eager, n, dev, **it),
                bytes_moved=all_bytes, batch=B, note=note or acc)
        if want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_sample, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, d0, lg0, p0, q0, u0, max_depth=max_depth, **cfg)
                if secs is not None:
                    t = time_rotating(lambda i: compiled(*sets[i], max_depth=max_depth, **cfg), n, dev, **it)
                    rec.add("verify_sample", "torch-compile", shape, dname, t, bytes_moved=all_bytes, batch=B,
                            note=f"compile {secs:.1f} s")

        def op(i):
            d, lg, p, q, _ = sets[i]
            return verify_sample(d, lg, draft_probs=q, parents=p, seed=seeds[i], offset=offsets[i], out=outs[i],
                                 validate=False, **cfg)

        rec.add("verify_sample", "kangaroo", shape, dname, time_rotating(op, n, dev, **it), bytes_moved=op_bytes,
                batch=B, note=acc)
        if on_gpu:
            rec.add("verify_sample", "kangaroo+graph", shape, dname, time_rotating(op, n, dev, graph=True, **it),
                    bytes_moved=op_bytes, batch=B, note=acc)
        if sampled:
            def prologue(i):
                return torch.softmax(sets[i][1].float(), -1)

            rec.add("verify_sample", "fi-layout-prologue" + ("+graph" if on_gpu else ""), shape, dname,
                    time_rotating(prologue, n, dev, graph=on_gpu, **it), bytes_moved=B * (N + 1) * V * (elt + 4),
                    batch=B, context=True,
                    note="softmax to FlashInfer's target_probs only; its kernel: 27 us published (B200)")
    rec.finish()


if __name__ == "__main__":
    main()
