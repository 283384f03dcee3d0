"""Executable spec of build_tree: the topology of a draft tree given by parent indices.

parents[b, j] = -1: node j is a child of the root (the last committed token); otherwise its parent index,
which must be < j (topological order). Node j is real iff j < num_nodes[b] and its parent is -1 or a real
node p < j; anything else (j >= num_nodes[b], an out-of-range or non-topological parent, a padding parent)
is padding: depth -1, mask row 0, no links. Real nodes: depth = 1 for root children, depth(parent) + 1
otherwise; mask [B, N, ceil(N/32)] int32 with bit (i % 32) of word i // 32 of row j set iff i is an ancestor
of j or i == j; children linked in increasing index order by first_child / next_sibling (-1: none) and the
root's by root_first_child [B].
"""

from typing import Optional

import torch

from kangaroo_kernels.types import Tree

__all__ = ["build_tree_ref"]


def build_tree_ref(parents: torch.Tensor, num_nodes: Optional[torch.Tensor] = None):
    """Reference of kangaroo_kernels.build_tree. Returns Tree(depth, mask, first_child, next_sibling,
    root_first_child, parents) on the device of `parents` (parents as int32, unchanged)."""

    B, N = parents.shape
    W = (N + 31) // 32
    par = parents.cpu().long().tolist()
    nn = num_nodes.cpu().long().tolist() if num_nodes is not None else [N] * B
    depth = torch.full((B, N), -1, dtype=torch.int32)
    mask = torch.zeros((B, N, W), dtype=torch.int64)
    first_child = torch.full((B, N), -1, dtype=torch.int32)
    next_sibling = torch.full((B, N), -1, dtype=torch.int32)
    root_first_child = torch.full((B,), -1, dtype=torch.int32)
    for b in range(B):
        n = min(max(nn[b], 0), N)
        d = [-1] * N
        anc = [set() for _ in range(N)]
        children = {}
        for j in range(n):
            q = par[b][j]
            if not (q == -1 or (0 <= q < j and d[q] > 0)):
                continue
            d[j] = 1 if q == -1 else d[q] + 1
            anc[j] = ({j} | anc[q]) if q >= 0 else {j}
            children.setdefault(q, []).append(j)
        for j in range(N):
            depth[b, j] = d[j]
            for i in anc[j]:
                mask[b, j, i // 32] |= 1 << (i % 32)
        for q, kids in children.items():
            if q == -1:
                root_first_child[b] = kids[0]
            else:
                first_child[b, q] = kids[0]
            for x, y in zip(kids, kids[1:]):
                next_sibling[b, x] = y
    # the bit words as int32 (bit 31 is the sign bit)
    mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)
    dev = parents.device
    return Tree(depth.to(dev), mask.to(dev), first_child.to(dev), next_sibling.to(dev),
                root_first_child.to(dev), parents.to(torch.int32))
