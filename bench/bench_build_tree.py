"""Benchmark build_tree (native op: CUDA kernel on GPU, C++ twin on CPU) and the converters to the FlashInfer /
SGLang tree layouts, against same-run baselines.

Shapes: random draft trees (4 root children, then each node under one of the 8 most recent: top-k drafting) of
N = 8, 16, 32, 64, 128 nodes, batch 1, 4, 16, 64 (the tree does not depend on the model). Headline (--quick on
GPU; the only shapes with a torch.compile baseline): N=64, B=1 and B=16.

Impls, all in this run on the same parents:
  torch-eager      the vectorised PyTorch build: one-hot parent matrix, ancestor closure by repeated squaring
                   (log2 N batched matmuls), bit packing, first-child / next-sibling by masked min; no host sync
  torch-compile    torch.compile of torch-eager (headline shapes)
  kangaroo         build_tree, eager launches (CUDA events per call)
  kangaroo+graph   build_tree replayed from a CUDA graph
  +sglang          build_tree then tree_to_sglang (SGLang's retrive_index / retrive_next_token /
                   retrive_next_sibling / candidates layout), graph
  +flashinfer      build_tree then tree_to_flashinfer_mask (FlashInfer's custom_mask + packed bits + byte
                   indptr for a 1024-token prefix, 64 on CPU; its output size depends on host integers, so
                   events, no graph)
Context: SGLang builds its retrive_* tensors (build_tree_kernel_efficient) and FlashInfer packs its mask
(segment_packbits) in a prologue of the same kind; no published per-op figure is quoted.

Bytes: parents read + every output written (the floor of a launch-bound op is far below its launch cost).
Inputs rotate over many parent sets (tiny inputs: the cap of 256 sets).

  python bench/bench_build_tree.py [--quick] [--no-compile] [--budget-s S]
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

from kangaroo_kernels.ops.tree import build_tree, tree_to_flashinfer_mask, tree_to_sglang  # noqa: E402

BATCHES = (1, 4, 16, 64)
PREFIX = 1024


def random_parents(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    j = torch.arange(N)
    back = (torch.rand((B, N), generator=gen) * j.clamp(max=8)).long() + 1  # in [1, min(8, j)]
    return torch.where(j < 4, -1, j - back).to(torch.int32)


def eager_build_tree(parents: torch.Tensor):
    """(depth, mask words, first_child, next_sibling, root_first_child) for valid topological parents."""
    B, N = parents.shape
    dev = parents.device
    W = (N + 31) // 32
    par = parents.long()
    j = torch.arange(N, device=dev)
    onehot = (par[:, :, None] == j[None, None, :]).float()  # [B, j, p]
    reach = onehot + torch.eye(N, device=dev)  # ancestor-or-self within 1 step
    for _ in range(max(1, (N - 1).bit_length())):
        reach = (torch.bmm(reach, reach) > 0).float()
    depth = reach.sum(-1).to(torch.int32)
    bits = torch.zeros(B, N, W * 32, device=dev)
    bits[..., :N] = reach
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=dev), torch.arange(32, device=dev))
    words = (bits.view(B, N, W, 32).long() * weights).sum(-1)
    mask = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    big = torch.full((), N, device=dev)
    first_child = torch.where(onehot.transpose(1, 2) > 0, j[None, None, :], big).amin(-1)  # [B, p]
    first_child = torch.where(first_child == N, -1, first_child).to(torch.int32)
    sib = (par[:, :, None] == par[:, None, :]) & (j[None, None, :] > j[None, :, None])  # [B, j, k]: k later sibling
    next_sibling = torch.where(sib, j[None, None, :], big).amin(-1)
    next_sibling = torch.where(next_sibling == N, -1, next_sibling).to(torch.int32)
    root = torch.where(par == -1, j[None, :], big).amin(-1)
    root_first_child = torch.where(root == N, -1, root).to(torch.int32)
    return depth, mask, first_child, next_sibling, root_first_child


def cases(on_gpu: bool, quick: bool):
    """(N, B, headline), headline first."""
    if not on_gpu:
        for N, B in ((16, 1), (16, 4)) if quick else ((16, 1), (64, 4), (128, 16)):
            yield N, B, B == 1
        return
    for B in (1, 16):
        yield 64, B, True
    if quick:
        return
    for N in (8, 16, 32, 64, 128):
        for B in BATCHES:
            if not (N == 64 and B in (1, 16)):
                yield N, B, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    rec = Recorder("build_tree", dev, quick=args.quick, budget_s=args.budget_s)
    prefix = PREFIX if on_gpu else 64
    gen = torch.Generator().manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    for N, B, headline in cases(on_gpu, args.quick):
        shape = f"random-tree B={B} N={N}"
        if rec.out_of_time(shape, reserve=5.0):
            continue
        W = (N + 31) // 32
        nbytes = B * N * 4 + B * N * W * 4 + 3 * B * N * 4 + B * 4
        n = n_input_sets(nbytes, dev)
        parents = [random_parents(B, N, gen).to(dev) for _ in range(n)]
        trees = [build_tree(p) for p in parents]  # validated once; the timed calls reuse these buffers
        drafts = [torch.randint(0, 32000, (B, N), generator=gen, dtype=torch.int32).to(dev) for _ in range(n)]

        got = eager_build_tree(parents[0])
        t0 = trees[0]
        note = agree(all(torch.equal(a, b) for a, b in zip(got, (t0.depth, t0.mask, t0.first_child, t0.next_sibling,
                                                                  t0.root_first_child))), f"eager vs op, {shape}", dev)

        rec.add("build_tree", "torch-eager", shape, "int32", time_rotating(lambda i: eager_build_tree(parents[i]), n,
                                                                           dev, **it), bytes_moved=nbytes, batch=B,
                note=note)
        if want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_build_tree, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, parents[0])
                if secs is not None:
                    rec.add("build_tree", "torch-compile", shape, "int32",
                            time_rotating(lambda i: compiled(parents[i]), n, dev, **it), bytes_moved=nbytes,
                            batch=B, note=f"compile {secs:.1f} s")

        def op(i):
            return build_tree(parents[i], out=trees[i], validate=False)

        def op_sglang(i):
            return tree_to_sglang(build_tree(parents[i], out=trees[i], validate=False), drafts[i])

        def op_flashinfer(i):
            return tree_to_flashinfer_mask(build_tree(parents[i], out=trees[i], validate=False), prefix)

        rec.add("build_tree", "kangaroo", shape, "int32", time_rotating(op, n, dev, **it), bytes_moved=nbytes,
                batch=B)
        if on_gpu:
            rec.add("build_tree", "kangaroo+graph", shape, "int32", time_rotating(op, n, dev, graph=True, **it),
                    bytes_moved=nbytes, batch=B)
        sg_bytes = nbytes + B * N * 4 + 4 * B * (N + 1) * 8
        rec.add("build_tree", "kangaroo+sglang" + ("+graph" if on_gpu else ""), shape, "int32",
                time_rotating(op_sglang, n, dev, graph=on_gpu, **it), bytes_moved=sg_bytes, batch=B,
                note="build_tree + tree_to_sglang")
        fi_bits = B * N * (prefix + N)
        rec.add("build_tree", "kangaroo+flashinfer", shape, "int32",
                time_rotating(op_flashinfer, min(n, 8), dev, **it), bytes_moved=nbytes + fi_bits + fi_bits // 8,
                batch=B, note=f"build_tree + tree_to_flashinfer_mask, prefix {prefix} (host sizes: no graph)")
    rec.finish()


if __name__ == "__main__":
    main()
