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
  Cost: pure torch, static shapes, no host sync. Chain: O(B·min(N, M)) elementwise work by cumulative products,
  ~40 small ATen ops. Tree: the walk is done for all nodes at once: depth, and "every ancestor-or-self carries
  the lookup token of its depth and is the first sibling with its token", by pointer jumping (ceil(log2 N)
  rounds of gathers), plus an O(B·N²) sibling comparison; ~140 small ops at N = 12, M = 8 (counted with the
  profiler). On CUDA they belong in the decoder's captured graph (or under torch.compile, which traces the
  function with fullgraph=True), not in eager launches.
"""

from typing import Optional

import torch

from kangaroo_kernels import _checks
from kangaroo_kernels.types import LookupTree

__all__ = ["LookupTree", "merge_lookup_tree"]



def _validate(draft, look, n_look, parents) -> None:
    B, N = draft.shape
    M = look.shape[1]
    top = 2**31 - 1  # ids are narrowed to int32: an int64 id above it must not wrap
    checks = [((draft < -1) | (draft > top)).any(), ((look < -1) | (look > top)).any()]
    checks.append(((n_look < 0) | (n_look > M)).any() if n_look is not None else
                  torch.zeros((), dtype=torch.bool, device=draft.device))
    if parents is not None:
        i = torch.arange(N, device=draft.device)
        checks.append(((parents < -1) | (parents >= i)).any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        raise ValueError("draft [B, N] must hold token ids in [-1, 2^31) (-1 = absent node)")
    if flags[1]:
        raise ValueError("look [B, M] must hold token ids in [-1, 2^31) (-1 = padding)")
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
    Validation (validate=None: unless capturing a CUDA graph; it syncs): ids in [-1, 2^31), n_look in [0, M],
    parents topological. Without it, a base node whose parent is out of range is never shared (as verify_greedy never
    reaches it), and int64 ids outside int32 count as absent (-1).
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
    # int64 ids outside int32 are absent (-1) and int64 parents saturate (out of range): nothing wraps around
    draft, look = _checks.to_int32(draft, pad=-1), _checks.to_int32(look, pad=-1)
    if parents is not None:
        parents = _checks.to_int32(parents)

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
    res = LookupTree(
        torch.cat([draft.to(i32), torch.where(private, look, -1).to(i32)], 1),
        torch.cat([base_par.to(i32), torch.where(private, look_par, -1)], 1),
        torch.cat([(draft >= 0).to(i32) + 2 * on_look.to(i32), 2 * private.to(i32)], 1),
        n_shared,
        torch.where(j < ns, shared_nodes, torch.where(private, N + j, -1)),
    )
    if out is None:
        return res
    for o, r in zip(out, res):
        o.copy_(r)
    return out
