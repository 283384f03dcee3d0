"""Executable spec of merge_lookup_tree: the hybrid drafter's lookup branch merged into the cycle's draft tree.

Base tree: draft [B, N] (node tokens, -1 = absent node) with parents [B, N] (-1 = child of the root), or a chain
(parents None: node i's parent is i - 1). Lookup branch: look [B, M]; its live part is the longest prefix of
entries >= 0 (and < n_look[b] when given), nl[b] tokens.

Walk the lookup branch down the base tree the way verify_greedy walks it: from the root, lookup token j is
shared with the first child c (lowest index; children of q are the nodes i > q with parents[i] == q) of the
current node whose draft[c] >= 0 equals look[j]; the walk stops at the first j without such a child. The shared
tokens, n_shared[b] of them, are those base nodes. Every later live lookup token j (n_shared <= j < nl) becomes
the new node N + j with token look[j] and parent: the last shared node (or the root when n_shared = 0) for
j = n_shared, node N + j - 1 after that. Nodes N + j of other j are absent: token -1, parent -1.

Outputs (int32): tokens [B, N+M] = draft then the private lookup tokens; parents [B, N+M] = the base parents
(the chain's -1, 0, .., N-2 when parents is None) then the lookup parents; source [B, N+M] bit flags: 1 = a
present base node (token >= 0), 2 = on the lookup branch (shared base nodes have 3, private lookup nodes 2,
absent nodes 0); n_shared [B]; lookup_nodes [B, M] = the node of lookup token j (-1 for j >= nl).
"""

from typing import Optional

import torch

__all__ = ["merge_lookup_tree_ref"]


def merge_lookup_tree_ref(draft: torch.Tensor, look: torch.Tensor, *, n_look: Optional[torch.Tensor] = None,
                          parents: Optional[torch.Tensor] = None):
    """Reference of kangaroo_kernels.merge_lookup_tree. Returns LookupTree on draft's device."""
    from kangaroo_kernels.types import LookupTree

    B, N = draft.shape
    M = look.shape[1]
    d_all = draft.cpu().long().tolist()
    l_all = look.cpu().long().tolist()
    p_all = parents.cpu().long().tolist() if parents is not None else [list(range(-1, N - 1))] * B
    nlk = n_look.cpu().long().tolist() if n_look is not None else [M] * B
    tokens = torch.full((B, N + M), -1, dtype=torch.int32)
    par_out = torch.full((B, N + M), -1, dtype=torch.int32)
    source = torch.zeros((B, N + M), dtype=torch.int32)
    n_shared = torch.zeros(B, dtype=torch.int32)
    lookup_nodes = torch.full((B, M), -1, dtype=torch.int32)
    for b in range(B):
        d, lk, par = d_all[b], l_all[b], p_all[b]
        nl = 0
        while nl < M and nl < nlk[b] and lk[nl] >= 0:
            nl += 1
        shared, cur = [], -1
        for j in range(nl):
            kids = [i for i in range(cur + 1, N) if par[i] == cur]
            child = next((i for i in kids if d[i] >= 0 and d[i] == lk[j]), None)
            if child is None:
                break
            shared.append(child)
            cur = child
        ns = len(shared)
        n_shared[b] = ns
        for i in range(N):
            tokens[b, i] = d[i]
            par_out[b, i] = par[i]
            source[b, i] = (1 if d[i] >= 0 else 0) | (2 if i in shared else 0)
        for j in range(nl):
            if j < ns:
                lookup_nodes[b, j] = shared[j]
                continue
            node = N + j
            lookup_nodes[b, j] = node
            tokens[b, node] = lk[j]
            par_out[b, node] = (shared[-1] if ns else -1) if j == ns else node - 1
            source[b, node] = 2
    dev = draft.device
    return LookupTree(tokens.to(dev), par_out.to(dev), source.to(dev), n_shared.to(dev), lookup_nodes.to(dev))
