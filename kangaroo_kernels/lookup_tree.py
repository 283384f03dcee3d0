"""merge_lookup_tree: the hybrid drafter's lookup branch (ngram_lookup's tokens) merged into the cycle's draft
tree, so that verify_greedy / verify_sample check both in one pass.

Design note.
  Semantics (exact spec: kangaroo_kernels/reference/lookup_tree.py). The base tree is the cycle's own draft:
  draft [B, N] with parents [B, N] (the tree mode's DecodeState.tree_parents: chain nodes 0..γ-1, then the
  siblings), or a chain (parents None). The lookup branch look [B, M] is walked down the base tree exactly as
  the verifier would walk it: token j is shared with the first child (lowest index) of the current node that
  carries the same token, so where the lookup agrees with the chain (or with a sibling) the nodes are the same
  nodes, and a private lookup node never duplicates a token the verifier would reach first (which would make
  the private node's subtree unreachable). From the first disagreement on, lookup token j is the new node
  N + j under the previous lookup node (the first one under the last shared node, or the root). Lookup node
  N + j therefore always has depth j + 1 (its position is root + j + 1 whatever was shared), and the layout is
  topological, so the merged parents go straight to build_tree / verify_greedy(parents=...) / append_attention.
  Nodes N .. N + n_shared - 1 and those past the live lookup are absent (token -1: never accepted).
  Appending after any base: N is the base's width (chain: γ; tree: γ·K); the base part of the output is the
  base unchanged, so a caller with a fixed layout of N nodes gets N + M nodes with the lookup at N.. N + M - 1.
  `source` marks each node (1: base drafter, 2: lookup, 3: both) so the decoder can count acceptances by
  source from verify's path: accepted node x came from the lookup iff source[x] & 2.
  Cost: pure torch, static shapes, no host sync. Chain: O(B·min(N, M)) elementwise work, a handful of kernels.
  Tree: the walk is done for all nodes at once: depth and "every ancestor-or-self carries the lookup token of
  its depth and is the first sibling with its token" by pointer jumping (ceil(log2 N) rounds of gathers), plus
  an O(B·N²) sibling comparison and an O(B·M·N) selection; N and M are tens, so this is a few dozen tiny kernels
  (capture them in the decoder's CUDA graph).
"""

from typing import NamedTuple, Optional

import torch

from kangaroo_kernels import _checks

__all__ = ["LookupTree", "merge_lookup_tree"]


class LookupTree(NamedTuple):
    """The merged draft tree (int32), N base nodes then M lookup slots.

    tokens [B, N+M] (-1: absent, never accepted), parents [B, N+M] (-1: child of the root; topological),
    source [B, N+M] bit flags (1: present base node, 2: on the lookup branch), n_shared [B] (lookup tokens that
    are base nodes), lookup_nodes [B, M] (the node of lookup token j, -1 past the live lookup).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    source: torch.Tensor
    n_shared: torch.Tensor
    lookup_nodes: torch.Tensor


def _validate(draft, look, n_look, parents) -> None:
    B, N = draft.shape
    M = look.shape[1]
    checks = [(draft < -1).any(), (look < -1).any()]
    checks.append(((n_look < 0) | (n_look > M)).any() if n_look is not None else
                  torch.zeros((), dtype=torch.bool, device=draft.device))
    if parents is not None:
        i = torch.arange(N, device=draft.device)
        checks.append(((parents < -1) | (parents >= i)).any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        raise ValueError("draft [B, N] must hold token ids >= -1 (-1 = absent node)")
    if flags[1]:
        raise ValueError("look [B, M] must hold token ids >= -1 (-1 = padding)")
    if flags[2]:
        raise ValueError(f"n_look [B] must be in [0, M = {M}], got {n_look.tolist()}")
    if parents is not None and flags[3]:
        raise ValueError("parents [B, N] must satisfy -1 <= parents[b, i] < i (topological order)")


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, i]] where idx >= 0, else 0 (idx is clamped for the gather)."""
    return torch.gather(x, 1, idx.clamp(min=0))


def merge_lookup_tree(draft: torch.Tensor, look: torch.Tensor, *, n_look: Optional[torch.Tensor] = None,
                      parents: Optional[torch.Tensor] = None, out: Optional[LookupTree] = None,
                      validate: Optional[bool] = None) -> LookupTree:
    """Merges the lookup branch look [B, M] into the base draft tree draft [B, N] (semantics: module docstring).

    draft [B, N] int32/int64: the base nodes' tokens, -1 = absent (the decoder's -1 padded drafts; a chain's
    first n_chain entries). parents [B, N] int32/int64 (-1 = child of the root, parents[b, i] < i) or None: a
    chain, node i under node i - 1. look [B, M] int32/int64 and n_look [B] (optional): ngram_lookup's tokens and
    n; the live lookup is the longest prefix of entries >= 0 and < n_look[b]. Returns LookupTree (int32, on
    draft's device); `out`: a LookupTree of buffers ([B, N+M] x 3, [B], [B, M]) written in place.
    Validation (validate=None: unless capturing a CUDA graph; it syncs): ids >= -1, n_look in [0, M], parents
    topological. Without it, a base node whose parent is out of range is never shared (as verify_greedy never
    reaches it).
    """
    _checks.check_tensor("draft", draft, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[B, N]")
    B, N = draft.shape
    dev = draft.device
    _checks.check_tensor("look", look, dtypes=_checks.INDEX_DTYPES, ndim=2, device=dev, expected="[B, M]")
    if look.shape[0] != B or look.shape[1] < 1:
        raise ValueError(f"look has shape {tuple(look.shape)} (expected [B, M] with B = {B}, M >= 1)")
    M = look.shape[1]
    if n_look is not None:
        _checks.check_tensor("n_look", n_look, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev, expected="[B]")
    if parents is not None:
        _checks.check_tensor("parents", parents, dtypes=_checks.INDEX_DTYPES, shape=(B, N), device=dev,
                             expected="[B, N]")
    if out is not None:
        if not isinstance(out, LookupTree):
            raise ValueError(f"out must be a LookupTree of buffers, got {type(out).__name__}")
        for name, shape in (("tokens", (B, N + M)), ("parents", (B, N + M)), ("source", (B, N + M)),
                            ("n_shared", (B,)), ("lookup_nodes", (B, M))):
            _checks.check_out(f"out.{name}", getattr(out, name), shape, torch.int32, dev)
    if _checks.validating(validate):
        _validate(draft, look, n_look, parents)

    j = torch.arange(M, device=dev)
    lk = look.long()
    live = lk >= 0
    if n_look is not None:
        live &= j < n_look.long()[:, None]
    live = live.long().cumprod(1).bool()  # the live lookup ends at its first absent entry
    lk = torch.where(live, lk, -1)
    d = draft.long()
    i = torch.arange(N, device=dev)
    if parents is None:
        base_par = (i - 1).expand(B, N)
        K = min(N, M)
        # chain node k is shared iff draft[:k+1] == look[:k+1] on live, present entries
        hit = (d[:, :K] >= 0) & (d[:, :K] == lk[:, :K])
        shared_k = hit.long().cumprod(1)
        n_shared = shared_k.sum(1)
        shared_nodes = torch.where(j < n_shared[:, None], j, -1)
        on_look = torch.zeros((B, N), dtype=torch.bool, device=dev)
        on_look[:, :K] = shared_k.bool()
    else:
        base_par = parents
        par = parents.long()
        par_ok = (par >= -1) & (par < i)
        par = torch.where(par_ok, par, -1)
        rounds = max(0, (N - 1).bit_length())
        # depth by pointer jumping
        depth = torch.ones((B, N), dtype=torch.long, device=dev)
        jump = par
        for _ in range(rounds):
            has = jump >= 0
            depth, jump = depth + torch.where(has, _gather(depth, jump), 0), torch.where(has, _gather(jump, jump), -1)
        # a sibling with the same token and a lower index is the one the verifier (and the walk) takes
        same = (parents.long()[:, :, None] == parents.long()[:, None, :]) & (d[:, :, None] == d[:, None, :])
        dominated = (same & par_ok[:, None, :] & (i[None, :] < i[:, None])[None]).any(2)
        want = _gather(lk, (depth - 1).clamp(max=M - 1))  # the lookup token of the node's depth
        ok = (d >= 0) & par_ok & ~dominated & (depth <= M) & (d == want)
        # shared iff ok on every ancestor-or-self: AND along the parent chain by pointer jumping
        jump = par
        for _ in range(rounds):
            has = jump >= 0
            ok, jump = ok & (~has | _gather(ok, jump)), torch.where(has, _gather(jump, jump), -1)
        on_look = ok
        n_shared = torch.where(on_look, depth, 0).amax(1) if N > 0 else torch.zeros(B, dtype=torch.long,
                                                                                   device=dev)
        sel = on_look[:, None, :] & (depth[:, None, :] == (j + 1)[None, :, None])  # [B, M, N]: one node or none
        shared_nodes = torch.where(sel.any(2), sel.long().argmax(2) if N > 0 else 0, -1)
    private = live & (j >= n_shared[:, None])
    last_shared = torch.where(n_shared > 0, _gather(shared_nodes, (n_shared - 1)[:, None])[:, 0], -1)
    look_par = torch.where(j == n_shared[:, None], last_shared[:, None], N + j - 1)
    res = LookupTree(
        torch.cat([draft.to(torch.int32), torch.where(private, lk, -1).to(torch.int32)], 1),
        torch.cat([base_par.to(torch.int32), torch.where(private, look_par, -1).to(torch.int32)], 1),
        torch.cat([((d >= 0).long() | on_look.long() << 1).to(torch.int32), (private.long() << 1).to(torch.int32)],
                  1),
        n_shared.to(torch.int32),
        torch.where(j < n_shared[:, None], shared_nodes, torch.where(private, N + j, -1)).to(torch.int32),
    )
    if out is None:
        return res
    for o, r in zip(out, res):
        o.copy_(r)
    return out
